"""Spans of several sidecars, exported over real OTLP/gRPC (loopback) to the lab receiver, form one trace.

Three proxies' telemetry (A's, B's and C's sidecars) handle one request the way the
pipeline does: A's outbound hop injects its context, B's inbound hop extracts it,
B's app forwards the headers it got to its own outbound hop, and so on. No sockets
for the data path here (that is test_telemetry_chain.py); the export path is real.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from meshproxy.config import model
from meshproxy.core.http import RequestHead
from meshproxy.lab.otlp_receiver import OtlpReceiver, ReceivedSpan
from meshproxy.telemetry import Telemetry

APP_TRACE_HEADERS = (
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-sampled",
    "x-request-id",
)


@pytest.fixture
async def receiver() -> AsyncIterator[OtlpReceiver]:
    async with OtlpReceiver("127.0.0.1", 0) as r:
        yield r


def sidecar(name: str, receiver: OtlpReceiver, propagation: tuple[model.Propagation, ...]) -> Telemetry:
    settings = model.Telemetry(
        tracing=model.Tracing(otlp_grpc_endpoint=receiver.endpoint, propagation=propagation)
    )
    return Telemetry.build(
        settings, model.Workload(name=name, namespace="demo"), env={}, schedule_delay_millis=50
    )


def app_forward(received: RequestHead, path: str, authority: str) -> RequestHead:
    """What an instrumented-by-hand app does: copy the trace headers it got onto its own call."""
    fwd = tuple((k, v) for k, v in received.headers if k in APP_TRACE_HEADERS)
    return RequestHead("GET", path, authority, fwd)


@pytest.mark.parametrize(
    "propagation",
    [(model.Propagation.W3C,), (model.Propagation.B3_MULTI,), (model.Propagation.B3,)],
    ids=["w3c", "b3multi", "b3"],
)
async def test_a_b_c_chain_is_one_trace(
    receiver: OtlpReceiver, propagation: tuple[model.Propagation, ...]
) -> None:
    a, b, c = (sidecar(n, receiver, propagation) for n in ("a", "b", "c"))
    try:
        # A's app calls B (no trace context yet: A's sidecar starts the trace).
        req = RequestHead("GET", "/b", "b.demo:80", (("user-agent", "test"),))
        a_out = a.start_http(
            direction="outbound", head=req, peer=("127.0.0.1", 50000), destination_service="b"
        )
        a_out.annotate(route="b-default")
        wire_ab = req.with_headers(a_out.upstream_headers(req))
        b_in = b.start_http(
            direction="inbound", head=wire_ab, peer=("198.18.0.1", 40000), destination_service="b"
        )
        to_b_app = wire_ab.with_headers(b_in.upstream_headers(wire_ab))
        # B's app calls C, forwarding the trace headers it received.
        req2 = app_forward(to_b_app, "/c", "c.demo:80")
        b_out = b.start_http(
            direction="outbound", head=req2, peer=("127.0.0.1", 50001), destination_service="c"
        )
        wire_bc = req2.with_headers(b_out.upstream_headers(req2))
        c_in = c.start_http(
            direction="inbound", head=wire_bc, peer=("198.18.0.2", 40001), destination_service="c"
        )
        for hop in (c_in, b_out, b_in, a_out):
            hop.finish(status=200, flag=None, request_bytes=0, response_bytes=5)
        trace_id = a_out.trace_id
        assert {h.trace_id for h in (b_in, b_out, c_in)} == {trace_id}
        assert b_in.request_id == a_out.request_id == c_in.request_id

        def complete(spans: list[ReceivedSpan]) -> bool:
            return len([s for s in spans if s.trace_id == trace_id]) == 4

        await receiver.wait_for(complete, timeout=15)
        spans = {(s.service, s.kind): s for s in receiver.trace(trace_id)}
        a_client, b_server = spans["a", "CLIENT"], spans["b", "SERVER"]
        b_client, c_server = spans["b", "CLIENT"], spans["c", "SERVER"]
        assert a_client.parent_span_id == ""
        assert b_server.parent_span_id == a_client.span_id
        assert b_client.parent_span_id == b_server.span_id
        assert c_server.parent_span_id == b_client.span_id
        assert a_client.name == "GET b-default"
        assert b_server.attributes["mesh.source.workload"] == "a"
        assert c_server.attributes["mesh.source.workload"] == "b"
        assert c_server.attributes["http.response.status_code"] == 200
        tree = receiver.trace_tree(trace_id)
        assert tree.splitlines()[1].strip().startswith("CLIENT GET b-default [a]")
        assert tree.splitlines()[4].strip().startswith("SERVER GET [c]")
    finally:
        for t in (a, b, c):
            await t.shutdown(grace=5)
