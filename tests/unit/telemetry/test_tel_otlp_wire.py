"""The telemetry hot path's hand-made pieces: the span encoder writes the very message the
stock OpenTelemetry encoder builds from the same span; request ids stay canonical UUIDs."""

from __future__ import annotations

import random
import uuid

import pytest
from opentelemetry.exporter.otlp.proto.common._internal import _encode_value
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as Resource_pb
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from meshproxy.telemetry.otlp_wire import WireEncoder, _any_value_of, _attribute_list
from meshproxy.telemetry.propagation import new_request_id
from meshproxy.telemetry.spans import KIND_CLIENT, KIND_SERVER, SpanEnd, SpanRecord, to_readable

RESOURCE = Resource.create({"service.name": "meshproxy", "k8s.pod.name": "client-1"})
SCOPE = InstrumentationScope("meshproxy")


def _record(**kw: object) -> SpanRecord:
    r = SpanRecord(
        trace_id=int(kw.get("trace_id", 0x0AF7651916CD43DD8448EB211C80319C)),  # type: ignore[call-overload]
        span_id=int(kw.get("span_id", 0xB7AD6B7169203331)),  # type: ignore[call-overload]
        parent_id=int(kw.get("parent_id", 0)),  # type: ignore[call-overload]
        trace_state=str(kw.get("trace_state", "")),
        name=str(kw.get("name", "GET")),
        kind=int(kw.get("kind", KIND_CLIENT)),  # type: ignore[call-overload]
        start_ns=1_764_000_000_123_456_789,
    )
    r.end_ns = r.start_ns + 1_234_567
    return r


def _records() -> list[SpanRecord]:
    # The proxy's shapes: a root client span with every attribute type, an errored one,
    # a server span under a remote parent with a tracestate, a span with no attributes.
    root = _record()
    root.attributes = [
        ("http.request.method", "GET"),
        ("url.path", "/api/items"),
        ("network.peer.port", 45678),
        ("mesh.retries", 0),
        ("negative", -5),
        ("big", 2**62),
        ("ratio", 0.25),
        ("sampled", True),
        ("off", False),
        ("empty", ""),
        ("unicode", "grüße ✓"),
    ]
    failed = _record(span_id=7, name="GET items")
    failed.attributes = [("http.response.status_code", 503), ("error.type", "UF")]
    failed.error = "UF"
    empty_error = _record(span_id=8)
    empty_error.error = ""
    server = _record(
        span_id=9,
        parent_id=0x00F067AA0BA902B7,
        trace_state="vendor=v1,other=x",
        name="helloworld.Greeter/SayHello",
        kind=KIND_SERVER,
    )
    server.attributes = [("rpc.grpc.status_code", 14)]
    bare = _record(span_id=10, name="")
    # Shared attributes as the pipeline caches them: as a tuple with its bytes, or without.
    shared = _record(span_id=11)
    shared.static = (("http.request.method", "GET"), ("server.port", 8080), ("mesh.source.workload", "web"))
    shared.static_wire = WireEncoder(RESOURCE, SCOPE).attributes(shared.static)
    shared.attributes = [("url.path", "/a"), ("mesh.request_id", "r-1")]
    # Request ids are never cached, only the bytes before them, by length: ids of one length
    # (canonical UUIDs), of another, one long enough for two-byte lengths, non-ASCII.
    ids = _record(span_id=13)
    ids.attributes = [("mesh.request_id", new_request_id(None)), ("url.path", "/b")]
    long_id = _record(span_id=14)
    long_id.attributes = [("mesh.request_id", "x" * 200)]
    non_ascii_id = _record(span_id=15)
    non_ascii_id.attributes = [("mesh.request_id", "ünï-1")]
    unencoded = _record(span_id=12)
    unencoded.static = shared.static
    # What a hop learns by its end, encoded as one cached group after the other attributes:
    # every field set, and only the status.
    ended = _record(span_id=16, name="GET default")
    ended.static = shared.static
    ended.attributes = [("url.path", "/c"), ("mesh.request_id", "r-2")]
    ended.end = SpanEnd(503, "default", "web.prod:80", 2, "circuit_open", "web-v2", "UO", 14, "UO")
    ended.error = "UO"
    plain_end = _record(span_id=17)
    plain_end.end = SpanEnd(200)
    return [
        root, failed, empty_error, server, bare, shared, unencoded, ids, long_id, non_ascii_id, ended, plain_end,
    ]  # fmt: skip


def _stock(records: list[SpanRecord]) -> ExportTraceServiceRequest:
    return encode_spans([to_readable(r, RESOURCE, SCOPE) for r in records])


def test_a_batch_encodes_as_the_stock_encoder_encodes_the_same_spans() -> None:
    encoder = WireEncoder(RESOURCE, SCOPE)
    records = _records()
    ours = ExportTraceServiceRequest.FromString(encoder.request([encoder.span(r) for r in records]))
    assert ours == _stock(records)


def test_each_span_alone_encodes_identically_and_the_caches_are_reused() -> None:
    encoder = WireEncoder(RESOURCE, SCOPE)
    for record in _records() * 2:  # the second round runs on cached key/value and name bytes
        ours = ExportTraceServiceRequest.FromString(encoder.request([encoder.span(record)]))
        assert ours == _stock([record])


def test_schema_urls_of_resource_and_scope_are_kept() -> None:
    resource = Resource.create({"service.name": "x"}, schema_url="https://opentelemetry.io/schemas/1.21.0")
    scope = InstrumentationScope("meshproxy", "1.0", "https://opentelemetry.io/schemas/1.20.0")
    encoder = WireEncoder(resource, scope)
    records = _records()[:2]
    ours = ExportTraceServiceRequest.FromString(encoder.request([encoder.span(r) for r in records]))
    assert ours == encode_spans([to_readable(r, resource, scope) for r in records])


def test_resource_and_scope_of_every_attribute_type_encode_as_the_stock_encoder_does() -> None:
    # OTEL_RESOURCE_ATTRIBUTES gives strings; resource detectors and scopes may give the rest.
    attrs = {
        "service.name": "web",
        "empty": "",
        "port": 8080,
        "negative": -1,
        "ratio": 0.5,
        "on": True,
        "off": False,
        "process.command_args": ["meshproxy", "run", "--config", "ü.yaml"],
        "ints": [1, -2, 2**40],
        "none": [],
    }
    resource = Resource(attrs)
    scope = InstrumentationScope("meshproxy", "9.9", None, {"scope.attr": "x", "flags": [True, False]})
    records = _records()[:3]
    encoder = WireEncoder(resource, scope)
    ours = ExportTraceServiceRequest.FromString(encoder.request([encoder.span(r) for r in records]))
    assert ours == encode_spans([to_readable(r, resource, scope) for r in records])
    bare_resource, bare_scope = Resource({}), InstrumentationScope("")
    encoder = WireEncoder(bare_resource, bare_scope)
    ours = ExportTraceServiceRequest.FromString(encoder.request([encoder.span(r) for r in records]))
    assert ours == encode_spans([to_readable(r, bare_resource, bare_scope) for r in records])


@pytest.mark.parametrize(
    "value",
    [None, b"\x00\xff", {"k": 1, "nested": {"a": [1.5, "x"]}}, ["a", None], (True, 2)],
    ids=["none", "bytes", "map", "array-with-none", "tuple"],
)
def test_any_value_of_the_types_only_resources_carry_is_the_stock_encoding(value: object) -> None:
    assert AnyValue.FromString(_any_value_of(value)) == _encode_value(value)


def test_a_value_otlp_cannot_hold_is_left_out_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    encoded = _attribute_list(0x0A, {"ok": "yes", "bad": object(), "after": 1})
    keys = [kv.key for kv in Resource_pb.FromString(encoded).attributes]
    assert keys == ["ok", "after"]
    assert "bad" in caplog.text and "not an OTLP value" in caplog.text


@pytest.mark.parametrize("rng", [None, random.Random()], ids=["os", "rng"])
def test_generated_request_ids_are_distinct_canonical_version4_uuids(rng: random.Random | None) -> None:
    ids = [new_request_id(rng) for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        u = uuid.UUID(text)
        assert (u.version, u.variant, str(u)) == (4, uuid.RFC_4122, text)


def test_encoding_holds_no_memory_once_a_request_is_dropped() -> None:
    # The encoder runs compiled (meshproxy.compiled); mypyc 1.18-1.20's ``a + b + c`` on bytes
    # leaked its temporary: every export request of 128 spans (~26 KB) stayed in memory,
    # +20 MB of RSS per sidecar within a ten-second benchmark. Allocations are traced, so
    # anything an encoded span or request leaves behind shows as growth here.
    import gc
    import tracemalloc

    encoder = WireEncoder(RESOURCE, SCOPE)
    records = _records()

    def export_rounds(n: int) -> None:
        for _ in range(n):
            encoder.request([encoder.span(r) for r in records] * 32)

    export_rounds(50)  # caches filled
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        export_rounds(2000)  # a leak of one request each would be tens of MB
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 256 * 1024, f"{grown} bytes held after 2000 export requests"
