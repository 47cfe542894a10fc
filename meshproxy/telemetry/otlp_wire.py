"""A fast OTLP/gRPC span exporter: spans written straight to protobuf wire format.

Owns: ``WireSpanEncoder`` (SDK spans -> serialized ``ExportTraceServiceRequest``) and
``FastOTLPSpanExporter``, the OpenTelemetry OTLP/gRPC exporter with its encoding step
replaced.

Why: the stock encoder builds a Python protobuf object per span, per attribute and per
attribute value, and hashes each span's ``Resource`` (a JSON dump) to group spans; at one
span per request that was the largest single CPU cost of a sidecar with tracing on. Here
a span's common shape (scalar attributes, status, parent, no events or links) is written
as bytes directly, the encoded resource/scope headers are cached, and the result is parsed
once by the C protobuf runtime so the exporter's retry/timeout machinery is untouched.

Invariants:
  * Output is the same message the stock encoder builds (field for field, including
    proto3 presence rules: oneof values are always written, scalar defaults never); the
    tests compare both encoders on spans of every shape.
  * Anything uncommon (events, links, array/map attribute values, non-UTF-8 text) is
    delegated span by span to the stock encoder, so correctness never depends on this
    module knowing every corner of the schema.

Concurrency: an encoder belongs to one exporter, which the batch processor calls from its
single worker thread; its caches are touched by that thread only and are bounded.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind

_PACK_Q = struct.Struct("<Q").pack
_PACK_I = struct.Struct("<I").pack
_PACK_D = struct.Struct("<d").pack
_U64 = (1 << 64) - 1

# OTLP Span.SpanKind numbers (UNSPECIFIED is 0, so they are the SDK's values plus one).
_KIND = {
    SpanKind.INTERNAL: 1,
    SpanKind.SERVER: 2,
    SpanKind.CLIENT: 3,
    SpanKind.PRODUCER: 4,
    SpanKind.CONSUMER: 5,
}
# Span.flags: bit 8 "has is_remote", bit 9 "parent is remote".
_FLAGS_LOCAL = _PACK_I(0x100)
_FLAGS_REMOTE = _PACK_I(0x300)
_MAX_KEYS = 1024  # distinct attribute keys cached; real spans use a few dozen


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: int, payload: bytes) -> bytes:
    """A length-delimited field (``tag`` is the pre-shifted key byte(s))."""
    return bytes((tag,)) + _varint(len(payload)) + payload


class _Fallback(Exception):
    """This span needs the stock encoder."""


class WireSpanEncoder:
    """SDK spans -> serialized ``ExportTraceServiceRequest`` (see module doc)."""

    def __init__(self) -> None:
        self._keys: dict[str, bytes] = {}
        # id(resource), id(scope) -> (resource, scope, ResourceSpans prefix, ScopeSpans prefix, suffix)
        self._heads: dict[tuple[int, int], tuple[Any, Any, bytes, bytes, bytes]] = {}

    def encode(self, spans: Sequence[ReadableSpan]) -> bytes:
        groups: dict[tuple[int, int], list[bytes]] = {}
        for span in spans:
            key = (id(span.resource), id(span.instrumentation_scope))
            if key not in self._heads:
                self._remember_head(key, span)
            try:
                body = self._span(span)
            except (_Fallback, UnicodeEncodeError):
                body = self._stock_span(span)
            groups.setdefault(key, []).append(b"\x12" + _varint(len(body)) + body)
        out = bytearray()
        for key, encoded in groups.items():
            _, _, resource_field, scope_field, scope_schema = self._heads[key]
            scope_spans = scope_field + b"".join(encoded) + scope_schema
            resource_spans = resource_field + _field(0x12, scope_spans)
            schema = self._heads[key][0].schema_url
            if schema:
                resource_spans += _field(0x1A, schema.encode())
            out += _field(0x0A, resource_spans)
        return bytes(out)

    def _remember_head(self, key: tuple[int, int], span: ReadableSpan) -> None:
        """Encode the span's resource and scope once (via the stock encoder) and cache them."""
        if len(self._heads) >= 64:
            self._heads.clear()  # pipelines are replaced on reconfigure; never grows for long
        rs = encode_spans([span]).resource_spans[0]
        ss = rs.scope_spans[0]
        resource_field = _field(0x0A, rs.resource.SerializeToString()) if rs.HasField("resource") else b""
        scope_field = _field(0x0A, ss.scope.SerializeToString()) if ss.HasField("scope") else b""
        scope_schema = _field(0x1A, ss.schema_url.encode()) if ss.schema_url else b""
        self._heads[key] = (
            span.resource,
            span.instrumentation_scope,
            resource_field,
            scope_field,
            scope_schema,
        )

    @staticmethod
    def _stock_span(span: ReadableSpan) -> bytes:
        request = encode_spans([span])
        data: bytes = request.resource_spans[0].scope_spans[0].spans[0].SerializeToString()
        return data

    def _span(self, span: ReadableSpan) -> bytes:
        if span.events or span.links or span.dropped_events or span.dropped_links:
            raise _Fallback
        ctx = span.get_span_context()
        if ctx is None:
            raise _Fallback
        parts = [
            b"\x0a\x10" + ctx.trace_id.to_bytes(16, "big"),
            b"\x12\x08" + ctx.span_id.to_bytes(8, "big"),
        ]
        if ctx.trace_state:
            state = ",".join(f"{k}={v}" for k, v in ctx.trace_state.items())
            parts.append(_field(0x1A, state.encode()))
        parent = span.parent
        if parent is not None:
            parts.append(b"\x22\x08" + parent.span_id.to_bytes(8, "big"))
        if span.name:
            parts.append(_field(0x2A, span.name.encode()))
        parts.append(b"\x30" + _varint(_KIND[span.kind]))
        if span.start_time:
            parts.append(b"\x39" + _PACK_Q(span.start_time))
        if span.end_time:
            parts.append(b"\x41" + _PACK_Q(span.end_time))
        attributes = span.attributes
        if attributes:
            keys = self._keys
            for k, v in attributes.items():
                kf = keys.get(k)
                if kf is None:
                    if len(keys) >= _MAX_KEYS:
                        keys.clear()
                    kf = keys[k] = _field(0x0A, k.encode())
                kv = kf + _field(0x12, _any_value(v))
                parts.append(b"\x4a" + _varint(len(kv)) + kv)
        if span.dropped_attributes:
            parts.append(b"\x50" + _varint(span.dropped_attributes))
        status = span.status
        if status is not None:
            st = b""
            if status.description:
                st += _field(0x12, status.description.encode())
            code = status.status_code.value
            if code:
                st += b"\x18" + _varint(code)
            parts.append(_field(0x7A, st))
        parts.append(
            b"\x85\x01" + (_FLAGS_REMOTE if parent is not None and parent.is_remote else _FLAGS_LOCAL)
        )
        return b"".join(parts)


def _any_value(v: object) -> bytes:
    """An ``AnyValue`` (the oneof field is always written, even for "" or 0)."""
    if isinstance(v, str):
        return _field(0x0A, v.encode())
    if isinstance(v, bool):
        return b"\x10\x01" if v else b"\x10\x00"
    if isinstance(v, int):
        return b"\x18" + _varint(v & _U64)
    if isinstance(v, float):
        return b"\x21" + _PACK_D(v)
    raise _Fallback


class FastOTLPSpanExporter(OTLPSpanExporter):
    """``OTLPSpanExporter`` (gRPC) whose request is built by ``WireSpanEncoder``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._wire = WireSpanEncoder()

    def _translate_data(self, data: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
        # Parsing the bytes back is done by the C protobuf runtime; it keeps the parent
        # class's retry, timeout and metrics code exactly as it is.
        return ExportTraceServiceRequest.FromString(self._wire.encode(data))
