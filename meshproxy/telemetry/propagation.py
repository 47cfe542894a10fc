"""Trace-context propagation over the proxy's ``Headers`` tuples.

Owns: extracting a remote parent from a request's headers (W3C ``traceparent``/
``tracestate``, B3 single ``b3``, B3 multi ``x-b3-*``), injecting a span's
context in the configured formats, and ``x-request-id`` handling.

Invariants:
  * Extraction always understands every format, whatever the config says, so a
    B3-only caller and a W3C-only caller both join their trace. If a request
    carries both, W3C wins (it is the standard; B3 is the compatibility path).
  * ``context_headers`` writes the hop's own context in exactly the configured
    formats; the caller (``hop.HttpHop.upstream_headers``) first removes every
    trace header the request arrived with, so the next hop never sees a stale parent.
  * Malformed context (wrong lengths, non-hex, all-zero ids, W3C version ``ff``)
    is ignored as OpenTelemetry's propagators ignore it: the request starts a new
    trace. A B3 parent without a sampling state is *deferred* (``Parent.sampled``
    is None) and the sampler decides, as the B3 spec says.

Why by hand: these are three fixed text formats of a few fields. OpenTelemetry's
propagators go through ``Context`` objects and a getter/setter protocol per call,
about 20 us per request on this machine for something a regular expression and an
f-string do. ``tests/unit/telemetry/test_tel_propagation.py`` checks both directions
against OpenTelemetry's own propagators (what they write, we read, and vice versa).

Concurrency: none; pure functions over immutable tuples.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterable, Sequence

from meshproxy.config.model import Propagation
from meshproxy.telemetry.spans import Parent

REQUEST_ID = "x-request-id"

TRACE_HEADERS = frozenset(
    {
        "traceparent",
        "tracestate",
        "b3",
        "x-b3-traceid",
        "x-b3-spanid",
        "x-b3-parentspanid",
        "x-b3-sampled",
        "x-b3-flags",
    }
)
"""Every header that carries trace context; stripped before injecting our own."""

_TRACEPARENT = re.compile(r"[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?[ \t]*")
_TRACEPARENT_00 = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_ODD_HEX = frozenset("13579bdf")  # the last flags digit of a sampled context (bit 0 set)
_HEX_ID = re.compile(r"[0-9a-f]{16}|[0-9a-f]{32}")
_HEX_SPAN = re.compile(r"[0-9a-f]{16}")
_MAX_TRACESTATE = 512  # W3C: vendors must propagate at least 512 characters
_MAX_TRACESTATE_MEMBERS = 32
_B3_SAMPLED = frozenset({"1", "true", "d"})
_UUID_MASK = ~((0xF << 76) | (0x3 << 62)) & ((1 << 128) - 1)
_UUID_V4 = (0x4 << 76) | (0x2 << 62)


def _w3c(traceparent: str, tracestate: list[str]) -> Parent | None:
    if not tracestate and len(traceparent) == 55 and _TRACEPARENT_00.fullmatch(traceparent):
        # What a sidecar or an SDK sends (version 00, no padding, no tracestate): sliced
        # instead of taken apart by the general pattern's groups.
        trace_id, span_id = int(traceparent[3:35], 16), int(traceparent[36:52], 16)
        if not trace_id or not span_id:
            return None
        return Parent(trace_id, span_id, traceparent[54] in _ODD_HEX)
    m = _TRACEPARENT.fullmatch(traceparent)
    if m is None:
        return None
    version, tid, sid, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    trace_id, span_id = int(tid, 16), int(sid, 16)
    if not trace_id or not span_id:
        return None
    state = ",".join(tracestate).strip() if tracestate else ""
    if state and (
        len(state) > _MAX_TRACESTATE
        or state.count(",") >= _MAX_TRACESTATE_MEMBERS
        or any("=" not in member for member in state.split(",") if member.strip())
    ):
        state = ""  # an invalid tracestate is dropped, the parent is kept (W3C 3.3.1.1)
    return Parent(trace_id, span_id, bool(int(flags, 16) & 1), state)


def _b3_parts(trace: str | None, span: str | None, sampled: str | None, debug: str | None) -> Parent | None:
    if trace is None or span is None:
        return None
    trace, span = trace.strip().lower(), span.strip().lower()
    if not _HEX_ID.fullmatch(trace) or not _HEX_SPAN.fullmatch(span):
        return None
    trace_id, span_id = int(trace, 16), int(span, 16)
    if not trace_id or not span_id:
        return None
    if debug is not None and debug.strip() == "1":
        decision: bool | None = True
    elif sampled is None:
        decision = None
    else:
        decision = sampled.strip().lower() in _B3_SAMPLED
    return Parent(trace_id, span_id, decision)


def _b3(carrier: dict[str, str]) -> Parent | None:
    single = carrier.get("b3")
    if single is not None:
        parts = single.split("-")
        if len(parts) >= 2:
            return _b3_parts(parts[0], parts[1], parts[2] if len(parts) > 2 else None, None)
        return None  # "0", "1" or "d" alone: a decision without ids, nothing to join
    return _b3_parts(
        carrier.get("x-b3-traceid"),
        carrier.get("x-b3-spanid"),
        carrier.get("x-b3-sampled"),
        carrier.get("x-b3-flags"),
    )


def extract(headers: Sequence[tuple[str, str]]) -> Parent | None:
    """The remote parent carried by ``headers``, or None when there is none (or it is invalid).

    One pass over the headers; only trace headers are looked at after that."""
    carrier: dict[str, str] | None = None
    states: list[str] = []
    for k, v in headers:
        if k in TRACE_HEADERS:
            if k == "tracestate":
                states.append(v)
            elif carrier is None:
                carrier = {k: v}
            else:
                carrier.setdefault(k, v)
    if carrier is None:
        return None
    tp = carrier.get("traceparent")
    if tp is not None:
        parent = _w3c(tp, states)
        if parent is not None:
            return parent
    return _b3(carrier)


def context_headers(
    trace_id: int, span_id: int, sampled: bool, trace_state: str, formats: Sequence[Propagation]
) -> list[tuple[str, str]]:
    """A span's context as headers, in ``formats``."""
    out: list[tuple[str, str]] = []
    # bytes.hex() formats twice as fast as an f-string's ":032x" (two ids per request).
    tid = trace_id.to_bytes(16, "big").hex()
    sid = span_id.to_bytes(8, "big").hex()
    for fmt in formats:
        if fmt is Propagation.W3C:
            out.append(("traceparent", f"00-{tid}-{sid}-{'01' if sampled else '00'}"))
            if trace_state:
                out.append(("tracestate", trace_state))
        elif fmt is Propagation.B3:
            out.append(("b3", f"{tid}-{sid}-{'1' if sampled else '0'}"))
        else:
            out.append(("x-b3-traceid", tid))
            out.append(("x-b3-spanid", sid))
            out.append(("x-b3-sampled", "1" if sampled else "0"))
    return out


def request_id(headers: Iterable[tuple[str, str]]) -> str | None:
    """The incoming ``x-request-id`` (first value), if any and sane (bounded length)."""
    for k, v in headers:
        if k == REQUEST_ID:
            return v if 0 < len(v) <= 128 else None
    return None


def new_request_id(rng: random.Random | None = None) -> str:
    """A random (version 4) UUID in its canonical text form, as Envoy generates them.

    Formatted by hand: ``str(uuid.uuid4())`` builds a ``UUID`` object per request. With
    ``rng`` (the caller's generator, seeded from the OS) no system call is made per id:
    request ids need to be unique, not secret (OpenTelemetry's trace ids are made the
    same way)."""
    bits = rng.getrandbits(128) if rng is not None else int.from_bytes(os.urandom(16), "big")
    # Version 4 and the RFC 4122 variant set in the integer, then one formatting pass.
    bits = (bits & _UUID_MASK) | _UUID_V4
    h = f"{bits:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
