"""Shared by the OTLP exporter tests: serialized export requests and a port nobody listens on."""

from __future__ import annotations

import socket

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from meshproxy.telemetry.otlp_wire import WireEncoder
from meshproxy.telemetry.spans import KIND_CLIENT, SpanRecord

ENCODER = WireEncoder(Resource.create({"service.name": "frontend"}), InstrumentationScope("meshproxy"))


def export_request(n: int) -> bytes:
    """A serialized ``ExportTraceServiceRequest`` of ``n`` spans (~250 bytes each)."""
    spans = []
    for i in range(n):
        r = SpanRecord(
            trace_id=i + 1,
            span_id=i + 1,
            parent_id=0,
            trace_state="",
            name="GET",
            kind=KIND_CLIENT,
            start_ns=1,
        )
        r.end_ns = 2
        r.attributes = [("url.path", f"/items/{i}" + "x" * 200)]
        spans.append(ENCODER.span(r))
    return ENCODER.request(spans)


def closed_port() -> int:
    """A loopback port that was free a moment ago: connecting to it is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
