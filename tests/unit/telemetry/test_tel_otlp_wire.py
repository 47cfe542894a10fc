"""The telemetry hot path's hand-made pieces: the fast OTLP encoder writes the very message the
stock OpenTelemetry encoder builds; request ids stay canonical UUIDs."""

from __future__ import annotations

import random
import uuid

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    set_span_in_context,
)
from opentelemetry.trace.span import TraceState

from meshproxy.telemetry.otlp_wire import WireSpanEncoder
from meshproxy.telemetry.propagation import new_request_id


def _spans() -> list[ReadableSpan]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(
        resource=Resource.create({"service.name": "meshproxy", "k8s.pod.name": "client-1"})
    )
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("meshproxy", "0.1.0")
    remote = SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=True,
        trace_flags=TraceFlags(1),
        trace_state=TraceState([("vendor", "v1"), ("other", "x")]),
    )
    parent = set_span_in_context(NonRecordingSpan(remote))
    # The proxy's common shapes: client and server spans with scalar attributes.
    with tracer.start_as_current_span("GET", kind=SpanKind.CLIENT) as s:
        s.set_attributes(
            {
                "http.request.method": "GET",
                "url.path": "/api/items",
                "network.peer.port": 45678,
                "mesh.retries": 0,
                "negative": -5,
                "big": 2**62,
                "ratio": 0.25,
                "sampled": True,
                "off": False,
                "empty": "",
                "unicode": "grüße ✓",
            }
        )
        s.set_status(Status(StatusCode.ERROR, "UF"))
    span = tracer.start_span("helloworld.Greeter/SayHello", context=parent, kind=SpanKind.SERVER)
    span.set_attribute("rpc.grpc.status_code", 14)
    span.set_status(Status(StatusCode.OK))
    span.end()
    tracer.start_span("internal", kind=SpanKind.INTERNAL).end()  # no attributes, unset status
    # Shapes handed to the stock encoder: events, links, array values.
    with tracer.start_as_current_span("events", kind=SpanKind.PRODUCER) as s:
        s.add_event("retry", {"attempt": 2})
        s.set_attribute("tags", ("a", "b"))
    tracer.start_span("links", kind=SpanKind.CONSUMER, links=[Link(remote, {"why": "batch"})]).end()
    return list(memory.get_finished_spans())


def test_fast_encoding_equals_the_stock_encoding_for_every_span_shape() -> None:
    spans = _spans()
    ours = ExportTraceServiceRequest.FromString(WireSpanEncoder().encode(spans))
    assert ours == encode_spans(spans)


def test_each_span_alone_encodes_identically_and_the_cache_is_reused() -> None:
    encoder = WireSpanEncoder()
    for span in _spans() * 2:  # the second round runs on cached resource/scope/key bytes
        assert ExportTraceServiceRequest.FromString(encoder.encode([span])) == encode_spans([span])


def test_an_empty_batch_is_an_empty_request() -> None:
    assert WireSpanEncoder().encode([]) == b""
    assert encode_spans([]).SerializeToString() == b""


@pytest.mark.parametrize("rng", [None, random.Random()], ids=["os", "rng"])
def test_generated_request_ids_are_distinct_canonical_version4_uuids(rng: random.Random | None) -> None:
    ids = [new_request_id(rng) for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        u = uuid.UUID(text)
        assert (u.version, u.variant, str(u)) == (4, uuid.RFC_4122, text)
