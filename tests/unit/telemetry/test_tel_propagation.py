"""Trace context across hops: what a caller sends is joined, what we send upstream is our own span."""

from __future__ import annotations

import pytest
from opentelemetry.trace import SpanKind
from tel_rig import MakeRig, head

from meshproxy.config import model
from meshproxy.core.http import get_header
from meshproxy.telemetry import propagation
from meshproxy.telemetry.hop import SOURCE_WORKLOAD_HEADER
from meshproxy.telemetry.spans import Parent

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def finish(hop: object) -> None:
    hop.finish(status=200, flag=None, request_bytes=0, response_bytes=0)  # type: ignore[attr-defined]


def values(headers: tuple[tuple[str, str], ...], name: str) -> list[str]:
    return [v for k, v in headers if k == name]


async def test_w3c_in_joins_and_w3c_and_b3_out_carry_our_span(make_rig: MakeRig) -> None:
    rig = make_rig()
    h = head(headers=(("traceparent", f"00-{TRACE}-{PARENT}-01"), ("tracestate", "vendor=x")))
    hop = rig.tel.start_http(direction="outbound", head=h, peer=("10.0.0.1", 1234), destination_service="b")
    up = hop.upstream_headers(h)
    finish(hop)

    (span,) = rig.spans()
    assert span.kind is SpanKind.CLIENT
    assert f"{span.context.trace_id:032x}" == TRACE
    assert span.parent is not None and f"{span.parent.span_id:016x}" == PARENT
    own = f"{span.context.span_id:016x}"
    assert own != PARENT
    # Exactly one traceparent: the incoming one was replaced, not appended to.
    assert values(up, "traceparent") == [f"00-{TRACE}-{own}-01"]
    assert values(up, "tracestate") == ["vendor=x"]
    assert get_header(up, "x-b3-traceid") == TRACE
    assert get_header(up, "x-b3-spanid") == own
    assert get_header(up, "x-b3-sampled") == "1"
    assert hop.trace_id == TRACE


async def test_b3_multi_only_caller_joins(make_rig: MakeRig) -> None:
    rig = make_rig()
    h = head(headers=(("x-b3-traceid", TRACE), ("x-b3-spanid", PARENT), ("x-b3-sampled", "1")))
    hop = rig.tel.start_http(direction="inbound", head=h, peer=("10.0.0.1", 1234), destination_service="b")
    up = hop.upstream_headers(h)
    finish(hop)
    (span,) = rig.spans()
    assert span.kind is SpanKind.SERVER
    assert f"{span.context.trace_id:032x}" == TRACE
    assert span.parent is not None and f"{span.parent.span_id:016x}" == PARENT
    assert values(up, "traceparent")[0].startswith(f"00-{TRACE}-{span.context.span_id:016x}-")
    assert values(up, "x-b3-spanid") == [f"{span.context.span_id:016x}"]


async def test_b3_single_caller_joins(make_rig: MakeRig) -> None:
    rig = make_rig()
    h = head(headers=(("b3", f"{TRACE}-{PARENT}-1"),))
    finish(rig.tel.start_http(direction="inbound", head=h, peer=("10.0.0.1", 1), destination_service=None))
    (span,) = rig.spans()
    assert f"{span.context.trace_id:032x}" == TRACE
    assert span.parent is not None and f"{span.parent.span_id:016x}" == PARENT


async def test_w3c_wins_when_both_formats_disagree(make_rig: MakeRig) -> None:
    rig = make_rig()
    other = "a" * 32
    h = head(
        headers=(
            ("x-b3-traceid", other),
            ("x-b3-spanid", "b" * 16),
            ("x-b3-sampled", "1"),
            ("traceparent", f"00-{TRACE}-{PARENT}-01"),
        )
    )
    finish(rig.tel.start_http(direction="outbound", head=h, peer=("10.0.0.1", 1), destination_service="b"))
    (span,) = rig.spans()
    assert f"{span.context.trace_id:032x}" == TRACE


async def test_unsampled_parent_is_honoured_even_at_ratio_one(make_rig: MakeRig) -> None:
    rig = make_rig(ratio=1.0)
    h = head(headers=(("traceparent", f"00-{TRACE}-{PARENT}-00"),))
    hop = rig.tel.start_http(direction="outbound", head=h, peer=("10.0.0.1", 1), destination_service="b")
    up = hop.upstream_headers(h)
    finish(hop)
    assert rig.spans() == []
    assert not hop.sampled
    # The decision travels on: same trace, not sampled, in both formats.
    tp = values(up, "traceparent")[0]
    assert tp.startswith(f"00-{TRACE}-") and tp.endswith("-00")
    assert get_header(up, "x-b3-sampled") == "0"


async def test_sampled_parent_is_followed_even_at_ratio_zero(make_rig: MakeRig) -> None:
    rig = make_rig(ratio=0.0)
    h = head(headers=(("traceparent", f"00-{TRACE}-{PARENT}-01"),))
    finish(rig.tel.start_http(direction="inbound", head=h, peer=("10.0.0.1", 1), destination_service="b"))
    assert len(rig.spans()) == 1


async def test_no_context_starts_a_new_trace_and_ratio_zero_records_nothing(make_rig: MakeRig) -> None:
    rig = make_rig(ratio=0.0)
    h = head()
    hop = rig.tel.start_http(direction="outbound", head=h, peer=("10.0.0.1", 1), destination_service="b")
    up = hop.upstream_headers(h)
    finish(hop)
    assert rig.spans() == []
    tp = values(up, "traceparent")[0]
    _version, trace_id, span_id, flags = tp.split("-")
    assert trace_id == hop.trace_id and int(trace_id, 16) != 0 and int(span_id, 16) != 0
    assert int(flags, 16) & 1 == 0


async def test_new_trace_at_first_sidecar_is_sampled_at_ratio_one(make_rig: MakeRig) -> None:
    rig = make_rig(ratio=1.0)
    finish(
        rig.tel.start_http(direction="outbound", head=head(), peer=("10.0.0.1", 1), destination_service="b")
    )
    (span,) = rig.spans()
    assert span.parent is None


async def test_only_configured_formats_are_injected(make_rig: MakeRig) -> None:
    rig = make_rig(propagation=(model.Propagation.B3,))
    h = head(headers=(("traceparent", f"00-{TRACE}-{PARENT}-01"), ("x-b3-traceid", TRACE)))
    hop = rig.tel.start_http(direction="outbound", head=h, peer=("10.0.0.1", 1), destination_service="b")
    up = hop.upstream_headers(h)
    names = {k for k, _ in up}
    assert "b3" in names
    assert not names & {"traceparent", "x-b3-traceid", "x-b3-spanid"}
    assert get_header(up, "b3") == f"{TRACE}-{hop.span_id}-1"
    finish(hop)


async def test_request_id_is_kept_or_added(make_rig: MakeRig) -> None:
    rig = make_rig()
    h1 = head(headers=(("x-request-id", "abc-123"),))
    hop1 = rig.tel.start_http(direction="outbound", head=h1, peer=("10.0.0.1", 1), destination_service="b")
    assert hop1.request_id == "abc-123"
    assert values(hop1.upstream_headers(h1), "x-request-id") == ["abc-123"]
    h2 = head()
    hop2 = rig.tel.start_http(direction="outbound", head=h2, peer=("10.0.0.1", 1), destination_service="b")
    assert values(hop2.upstream_headers(h2), "x-request-id") == [hop2.request_id]
    assert hop2.request_id != hop1.request_id and len(hop2.request_id) == 36
    finish(hop1)
    finish(hop2)


async def test_identity_headers_added_outbound_and_stripped_inbound(make_rig: MakeRig) -> None:
    rig = make_rig(workload="frontend", namespace="demo")
    h = head(headers=((SOURCE_WORKLOAD_HEADER, "spoofed"),))
    out = rig.tel.start_http(direction="outbound", head=h, peer=("10.0.0.1", 1), destination_service="b")
    assert values(out.upstream_headers(h), SOURCE_WORKLOAD_HEADER) == ["frontend"]
    inbound = rig.tel.start_http(direction="inbound", head=h, peer=("10.0.0.1", 1), destination_service="b")
    assert values(inbound.upstream_headers(h), SOURCE_WORKLOAD_HEADER) == []
    finish(out)
    finish(inbound)


# --- the hand-written formats against OpenTelemetry's own propagators -------------------


def _otel_carrier(fmt: str, trace_id: int, span_id: int, sampled: bool, state: str) -> list[tuple[str, str]]:
    from opentelemetry.propagators.b3 import B3MultiFormat, B3SingleFormat
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState, set_span_in_context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    prop = {"w3c": TraceContextTextMapPropagator(), "b3": B3SingleFormat(), "b3multi": B3MultiFormat()}[fmt]
    ctx = SpanContext(
        trace_id,
        span_id,
        True,
        TraceFlags(1 if sampled else 0),
        TraceState.from_header([state]) if state else None,
    )
    carrier: dict[str, str] = {}
    prop.inject(carrier, context=set_span_in_context(NonRecordingSpan(ctx)))
    return list(carrier.items())


@pytest.mark.parametrize("fmt", ["w3c", "b3", "b3multi"])
@pytest.mark.parametrize("sampled", [True, False])
def test_what_opentelemetry_writes_we_read(fmt: str, sampled: bool) -> None:
    state = "vendor=v1,other=x" if fmt == "w3c" else ""
    carrier = _otel_carrier(fmt, int(TRACE, 16), int(PARENT, 16), sampled, state)
    parent = propagation.extract(tuple(carrier))
    assert parent == Parent(int(TRACE, 16), int(PARENT, 16), sampled, state)


@pytest.mark.parametrize(
    ("fmt", "ours"),
    [("w3c", model.Propagation.W3C), ("b3", model.Propagation.B3), ("b3multi", model.Propagation.B3_MULTI)],
)
@pytest.mark.parametrize("sampled", [True, False])
def test_what_we_write_opentelemetry_reads(fmt: str, ours: model.Propagation, sampled: bool) -> None:
    from opentelemetry.propagators.b3 import B3MultiFormat
    from opentelemetry.trace import get_current_span
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    state = "vendor=v1" if fmt == "w3c" else ""
    carrier = dict(propagation.context_headers(int(TRACE, 16), 0x1234, sampled, state, (ours,)))
    # B3MultiFormat's extract reads the single b3 header too.
    prop = TraceContextTextMapPropagator() if fmt == "w3c" else B3MultiFormat()
    ctx = get_current_span(prop.extract(carrier)).get_span_context()
    assert (ctx.trace_id, ctx.span_id, ctx.trace_flags.sampled) == (int(TRACE, 16), 0x1234, sampled)
    if state:
        assert ctx.trace_state.to_header() == state


@pytest.mark.parametrize(
    "headers",
    [
        (("traceparent", f"00-{'0' * 32}-{PARENT}-01"),),  # all-zero trace id
        (("traceparent", f"00-{TRACE}-{'0' * 16}-01"),),  # all-zero span id
        (("traceparent", f"ff-{TRACE}-{PARENT}-01"),),  # forbidden version
        (("traceparent", f"00-{TRACE}-{PARENT}-01-extra"),),  # version 00 has exactly four fields
        (("traceparent", f"00-{TRACE.upper()}-{PARENT}-01"),),  # W3C hex is lowercase
        (("traceparent", f"00-{TRACE[:-1]}-{PARENT}-01"),),
        (("x-b3-traceid", "xyz"), ("x-b3-spanid", PARENT)),
        (("x-b3-traceid", TRACE),),  # no span id
        (("b3", "1"),),  # a decision without ids: nothing to join
        (("b3", f"{TRACE}"),),
    ],
)
def test_malformed_context_is_ignored(headers: tuple[tuple[str, str], ...]) -> None:
    assert propagation.extract(headers) is None


def test_a_future_w3c_version_may_carry_more_fields() -> None:
    parent = propagation.extract((("traceparent", f"01-{TRACE}-{PARENT}-01-more"),))
    assert parent is not None and parent.trace_id == int(TRACE, 16)


def test_b3_without_sampling_state_defers_to_our_sampler_and_64_bit_ids_are_widened() -> None:
    parent = propagation.extract((("x-b3-traceid", TRACE[16:]), ("x-b3-spanid", PARENT)))
    assert parent == Parent(int(TRACE[16:], 16), int(PARENT, 16), None)
    debug = propagation.extract((("x-b3-traceid", TRACE), ("x-b3-spanid", PARENT), ("x-b3-flags", "1")))
    assert debug is not None and debug.sampled is True


async def test_deferred_b3_parent_is_sampled_by_ratio(make_rig: MakeRig) -> None:
    h = head(headers=(("x-b3-traceid", TRACE), ("x-b3-spanid", PARENT)))
    for ratio, expected in ((1.0, 1), (0.0, 0)):
        rig = make_rig(ratio=ratio)
        hop = rig.tel.start_http(direction="inbound", head=h, peer=("10.0.0.1", 1), destination_service="b")
        assert hop.trace_id == TRACE  # joined either way
        finish(hop)
        assert len(rig.spans()) == expected


def test_invalid_tracestate_is_dropped_but_the_parent_kept() -> None:
    parent = propagation.extract(
        (("traceparent", f"00-{TRACE}-{PARENT}-01"), ("tracestate", "no-equals-sign"))
    )
    assert parent == Parent(int(TRACE, 16), int(PARENT, 16), True, "")


@pytest.mark.parametrize(
    "flags", ["00", "01", "02", "03", "05", "07", "08", "09", "0a", "0b", "0d", "fe", "ff"]
)
@pytest.mark.parametrize("state", ["", "vendor=v1"])
def test_the_sampled_bit_is_read_as_opentelemetry_reads_it(flags: str, state: str) -> None:
    """Any flags byte, with and without a tracestate (the short and the general parse)."""
    from opentelemetry.trace import get_current_span
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier = {"traceparent": f"00-{TRACE}-{PARENT}-{flags}", **({"tracestate": state} if state else {})}
    theirs = get_current_span(TraceContextTextMapPropagator().extract(carrier)).get_span_context()
    parent = propagation.extract(tuple(carrier.items()))
    assert parent is not None
    assert (parent.trace_id, parent.span_id, parent.sampled, parent.trace_state) == (
        theirs.trace_id,
        theirs.span_id,
        theirs.trace_flags.sampled,
        state,
    )
