"""A -> B -> C through three sidecars' telemetry, as the pipeline drives it (shared by the trace tests).

A's outbound hop injects its context, B's inbound hop extracts it, B's app forwards the headers
it got to its own outbound hop, and C's inbound hop ends the chain. Only telemetry is real here
(spans exported over OTLP/gRPC or OTLP/HTTP, the caller's choice); the data path is exercised by
test_telemetry_chain.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshproxy.config import model
from meshproxy.core.http import RequestHead
from meshproxy.telemetry import HttpHop, Telemetry

APP_TRACE_HEADERS = (
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-sampled",
    "x-request-id",
)


@dataclass
class Chain:
    a_out: HttpHop
    b_in: HttpHop
    b_out: HttpHop
    c_in: HttpHop

    @property
    def trace_id(self) -> str:
        return self.a_out.trace_id


def sidecar(name: str, tracing: model.Tracing) -> Telemetry:
    settings = model.Telemetry(tracing=tracing)
    return Telemetry.build(
        settings, model.Workload(name=name, namespace="demo"), env={}, schedule_delay_millis=50
    )


def app_forward(received: RequestHead, path: str, authority: str) -> RequestHead:
    """What an instrumented-by-hand app does: copy the trace headers it got onto its own call."""
    fwd = tuple((k, v) for k, v in received.headers if k in APP_TRACE_HEADERS)
    return RequestHead("GET", path, authority, fwd)


async def run_chain(
    propagation: tuple[model.Propagation, ...] = (model.Propagation.W3C,),
    *,
    otlp_grpc_endpoint: str | None = None,
    otlp_http_endpoint: str | None = None,
) -> Chain:
    """One request a -> b -> c; returns the four hops once every span was flushed to the endpoint.

    ``otlp_grpc_endpoint`` is a collector's address (``http://host:4317``),
    ``otlp_http_endpoint`` its full traces URL (``http://host:4318/v1/traces``)."""
    if not (otlp_grpc_endpoint or otlp_http_endpoint):
        raise ValueError("run_chain needs an OTLP endpoint: without one no span leaves the sidecars")
    tracing = model.Tracing(
        propagation=propagation,
        otlp_grpc_endpoint=otlp_grpc_endpoint,
        otlp_http_endpoint=otlp_http_endpoint,
    )
    a, b, c = (sidecar(n, tracing) for n in ("a", "b", "c"))
    try:
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
        return Chain(a_out, b_in, b_out, c_in)
    finally:
        for t in (a, b, c):
            await t.shutdown(grace=10)  # flushes the exporters
