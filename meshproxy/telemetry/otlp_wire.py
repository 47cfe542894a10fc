"""OTLP wire format for the proxy's spans.

Owns: ``WireEncoder`` (``SpanRecord`` -> the bytes of an OTLP ``Span``, and a batch of them
-> a serialized ``ExportTraceServiceRequest``). The exporters that send those bytes are in
``otlp_export`` (imported only when an OTLP backend is configured: grpc and the HTTP client
cost ~15 MB of RSS).

Why: a span is encoded once, on the event loop, when its hop finishes (about 10 us: most
attribute key/value pairs repeat request after request and are cached as encoded bytes).
An export batch is then a ``b"".join`` behind a cached resource/scope head, sent by the
OpenTelemetry exporter's own transport, retry, timeout, header, TLS and compression code,
with only the encoding step swapped: the worker threads hold the GIL for microseconds per
batch, so they never stall the event loop (with the SDK's encoder on the worker thread,
the loop waited up to a GIL switch interval, 5 ms, behind every batch: p99 x8).

Invariants:
  * The bytes are the message the SDK's encoder builds from the same span seen as a
    ``ReadableSpan`` (``spans.to_readable``), field for field, including proto3 presence
    rules (oneof values always written, scalar defaults never); tests compare the two.
  * Caches are bounded (``_MAX_CACHED`` entries, then cleared: high-cardinality values such
    as paths with ids cost a re-encode, never memory); request ids are never cached.

Concurrency: ``WireEncoder.span`` runs on the event-loop thread only; ``request`` is a pure
function of its arguments, called by export worker threads.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping, Sequence

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from meshproxy.telemetry.spans import AttrValue, SpanEnd, SpanRecord

log = logging.getLogger(__name__)

_PACK_Q = struct.Struct("<Q").pack
_PACK_D = struct.Struct("<d").pack
_U64 = (1 << 64) - 1
_MAX_CACHED = 4096
# Span.flags (fixed32, field 16): bit 8 "has is_remote", bit 9 "parent is remote".
_FLAGS_ROOT = b"\x85\x01" + struct.pack("<I", 0x100)
_FLAGS_REMOTE_PARENT = b"\x85\x01" + struct.pack("<I", 0x300)
_KIND = {2: b"\x30\x02", 3: b"\x30\x03"}
_STATUS_UNSET = b"\x7a\x00"
# Attributes whose values differ on every request: encoded each time, never cached. (The
# peer port repeats for every request of a keep-alive connection, so it is cached.)
VOLATILE = frozenset({"mesh.request_id"})


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
    """A length-delimited field (``tag`` is the one-byte field key)."""
    return bytes((tag,)) + _varint(len(payload)) + payload


def _any_value(v: AttrValue) -> bytes:
    """An ``AnyValue`` (the oneof field is always written, even for "" or 0)."""
    if isinstance(v, str):
        return _field(0x0A, v.encode("utf-8", "surrogateescape"))
    if isinstance(v, bool):
        return b"\x10\x01" if v else b"\x10\x00"
    if isinstance(v, int):
        return b"\x18" + _varint(v & _U64)
    return b"\x21" + _PACK_D(v)


def _key_value(key: str, value: AttrValue) -> bytes:
    """A ``Span.attributes`` entry: field 9, a ``KeyValue``."""
    kv = _field(0x0A, key.encode()) + _field(0x12, _any_value(value))
    return b"\x4a" + _varint(len(kv)) + kv


class WireEncoder:
    """Encodes finished ``SpanRecord``s; one per tracing pipeline (see module doc).

    Most attribute pairs (method, workload, route, status, path, user agent, the peer port of
    a keep-alive connection) repeat request after request: their encoded bytes are cached,
    so a span is mostly dictionary lookups and one join (~8 us here)."""

    def __init__(self, resource: Resource, scope: InstrumentationScope) -> None:
        self._kv: dict[tuple[str, AttrValue], bytes] = {}
        self._names: dict[str, bytes] = {}
        # A volatile string attribute's bytes up to its value, by (key, value length): a
        # request id (36 bytes, every request) is then one lookup and one concatenation.
        self._heads: dict[tuple[str, int], bytes] = {}
        # The attributes a hop learns by its end (status, route, backend, flag...), encoded
        # together: requests of one kind end alike.
        self._ends: dict[SpanEnd, bytes] = {}
        self._frame = _Frame(resource, scope)

    def span(self, record: SpanRecord) -> bytes:
        """``record`` as a ``ScopeSpans.spans`` entry (field 2, length-prefixed)."""
        name = self._names.get(record.name)
        if name is None:
            if len(self._names) >= _MAX_CACHED:
                self._names.clear()
            name = self._names[record.name] = _field(0x2A, record.name.encode())
        parts = [
            b"\x0a\x10",
            record.trace_id.to_bytes(16, "big"),
            b"\x12\x08",
            record.span_id.to_bytes(8, "big"),
        ]
        if record.trace_state:
            parts.append(_field(0x1A, record.trace_state.encode()))
        if record.parent_id:
            parts.append(b"\x22\x08")
            parts.append(record.parent_id.to_bytes(8, "big"))
        parts.append(name)
        parts.append(_KIND[record.kind])
        parts.append(b"\x39" + _PACK_Q(record.start_ns) + b"\x41" + _PACK_Q(record.end_ns))
        if record.static_wire:
            parts.append(record.static_wire)
        elif record.static:
            parts.append(self.attributes(record.static))
        cache = self._kv
        for item in record.attributes:
            kv = cache.get(item)
            if kv is None:
                key, value = item
                if key in VOLATILE:
                    kv = self._volatile(key, value)
                else:
                    kv = _key_value(key, value)
                    if len(cache) >= _MAX_CACHED:
                        cache.clear()
                    cache[item] = kv
            parts.append(kv)
        end = record.end
        if end is not None:
            tail = self._ends.get(end)
            if tail is None:
                if len(self._ends) >= _MAX_CACHED:
                    self._ends.clear()
                tail = self._ends[end] = self.attributes(end.attributes())
            parts.append(tail)
        if record.error is None:
            parts.append(_STATUS_UNSET)
        else:
            status = (_field(0x12, record.error.encode()) if record.error else b"") + b"\x18\x02"
            parts.append(_field(0x7A, status))
        parts.append(_FLAGS_REMOTE_PARENT if record.parent_id else _FLAGS_ROOT)
        body = b"".join(parts)
        n = len(body)
        if n < 0x80:
            return bytes((0x12, n)) + body
        if n < 0x4000:
            return bytes((0x12, (n & 0x7F) | 0x80, n >> 7)) + body
        return b"\x12" + _varint(n) + body

    def _volatile(self, key: str, value: AttrValue) -> bytes:
        """``_key_value(key, value)`` for a value never cached: strings reuse the bytes before
        the value, which depend only on the key and the value's length."""
        if not isinstance(value, str):
            return _key_value(key, value)
        data = value.encode("utf-8", "surrogateescape")
        head = self._heads.get((key, len(data)))
        if head is None:
            kv = _key_value(key, value)  # the value's bytes come last: the rest is the head
            head = kv[: len(kv) - len(data)]
            if len(self._heads) >= _MAX_CACHED:
                self._heads.clear()
            self._heads[(key, len(data))] = head
        return head + data

    def attributes(self, attributes: Sequence[tuple[str, AttrValue]]) -> bytes:
        """``Span.attributes`` entries for ``attributes``, encoded once (not cached here)."""
        return b"".join(_key_value(k, v) for k, v in attributes)

    def request(self, spans: Sequence[bytes]) -> bytes:
        """A serialized ``ExportTraceServiceRequest`` holding ``spans`` (from ``span``)."""
        f = self._frame
        scope_spans = f.scope_head + b"".join(spans) + f.scope_tail
        return _field(0x0A, f.resource_head + _field(0x12, scope_spans) + f.resource_tail)


class _Frame:
    """The encoded parts of a request around its spans; the same for every batch.

    Written here, field by field as the SDK's encoder fills them (``resource`` and ``scope``
    always present, strings and counts only when set), so that exporting spans never loads
    the protobuf runtime and the generated OTLP modules (~3 MB of a sidecar's RSS)."""

    __slots__ = ("resource_head", "resource_tail", "scope_head", "scope_tail")

    def __init__(self, resource: Resource, scope: InstrumentationScope) -> None:
        # Resource: attributes (1).
        self.resource_head = _field(0x0A, _attribute_list(0x0A, resource.attributes))
        self.resource_tail = _field(0x1A, resource.schema_url.encode()) if resource.schema_url else b""
        # InstrumentationScope: name (1), version (2), attributes (3).
        body = _field(0x0A, scope.name.encode()) if scope.name else b""
        if scope.version:
            body += _field(0x12, scope.version.encode())
        body += _attribute_list(0x1A, scope.attributes)
        self.scope_head = _field(0x0A, body)
        self.scope_tail = _field(0x1A, scope.schema_url.encode()) if scope.schema_url else b""


def _attribute_list(tag: int, attributes: Mapping[str, object] | None) -> bytes:
    """Repeated ``KeyValue`` entries (field key ``tag``) of a resource or scope; a value no
    OTLP type holds is left out and logged, as the SDK's encoder does."""
    out = []
    for key, value in (attributes or {}).items():
        try:
            out.append(_field(tag, _key_value_of(key, value)))
        except TypeError:
            log.warning("resource or scope attribute %s: %r is not an OTLP value; left out", key, value)
    return b"".join(out)


def _key_value_of(key: str, value: object) -> bytes:
    """The body of a ``KeyValue`` holding any OTLP value."""
    return _field(0x0A, key.encode("utf-8", "surrogateescape")) + _field(0x12, _any_value_of(value))


def _any_value_of(v: object) -> bytes:
    """An ``AnyValue`` of any type OTLP has (resource and scope attributes may hold arrays,
    maps, bytes and None, unlike the proxy's span attributes)."""
    if v is None:
        return b""
    if isinstance(v, (str, bool, int, float)):
        return _any_value(v)
    if isinstance(v, bytes):
        return _field(0x3A, v)
    if isinstance(v, Mapping):
        return _field(0x32, b"".join(_field(0x0A, _key_value_of(str(k), x)) for k, x in v.items()))
    if isinstance(v, Sequence):
        return _field(0x2A, b"".join(_field(0x0A, _any_value_of(x)) for x in v))
    raise TypeError(type(v).__name__)
