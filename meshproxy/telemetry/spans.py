"""The proxy's own span record, its sampler, and its view as an OpenTelemetry SDK span.

Owns: ``SpanRecord`` (one hop's span, built on the event loop) and its ``SpanEnd``,
``Parent`` (a trace context extracted from request headers), ``RatioSampler`` (parent-based,
trace-id ratio), ``new_ids`` and ``to_readable`` (a record as the SDK's ``ReadableSpan``,
for the exporters that take SDK spans: Zipkin, and any exporter a caller adds).

Why not the SDK's ``Tracer``: a proxy's span has one fixed shape (two kinds, a dozen
scalar attributes, no events, no links, no children in this process), and it is made once
per request. The SDK's general machinery (context objects, a lock and a validation pass per
attribute, span processors, a fork check per span) cost ~75 us per hop on this machine,
a fifth of the proxy's whole CPU per request. Here a span is a slot object filled once;
it is encoded to OTLP bytes on the loop (``otlp_wire``) or converted to a ``ReadableSpan``
for SDK exporters, so the wire output is exactly what the SDK would export
(``tests/unit/telemetry/test_tel_otlp_wire.py`` compares the two field for field).

Sampling is OpenTelemetry's ``ParentBased(TraceIdRatioBased(ratio))``, to the bit: a parent
that carries a decision is followed; otherwise the trace is sampled when the low 64 bits of
its id are below ``ratio * 2**64``, so every hop of a trace without a decision agrees. A B3
parent with no sampling state ("defer") is decided the same way, as the B3 spec asks.

Concurrency: records are built and finished on the event-loop thread, then handed to
export queues; after ``finish`` nothing writes to a record again, so the worker threads
read it without locks.
"""

from __future__ import annotations

import random
from typing import NamedTuple

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

SCOPE = "meshproxy"
_U64 = (1 << 64) - 1
_U128 = (1 << 128) - 1

KIND_SERVER = 2  # OTLP Span.SpanKind numbers
KIND_CLIENT = 3
_SDK_KIND = {KIND_SERVER: SpanKind.SERVER, KIND_CLIENT: SpanKind.CLIENT}

AttrValue = str | int | float | bool


class Parent(NamedTuple):
    """A remote parent from request headers. ``sampled`` is None when the caller deferred.

    A named tuple: one is built per request that carries trace context, and a tuple is
    built in less than half the time of a frozen dataclass."""

    trace_id: int
    span_id: int
    sampled: bool | None
    trace_state: str = ""


class RatioSampler:
    """``ParentBased(TraceIdRatioBased(ratio))`` as a two-line decision."""

    __slots__ = ("_bound", "ratio")

    def __init__(self, ratio: float) -> None:
        self.ratio = min(1.0, max(0.0, ratio))
        # The SDK's bound: round(rate * (TRACE_ID_LIMIT + 1)) on the trace id's low 64 bits.
        self._bound = round(self.ratio * (_U64 + 1))

    def sampled(self, trace_id: int, parent: Parent | None) -> bool:
        if parent is not None and parent.sampled is not None:
            return parent.sampled
        return (trace_id & _U64) < self._bound


def new_ids(rng: random.Random, parent: Parent | None) -> tuple[int, int]:
    """``(trace_id, span_id)`` for a new span: the parent's trace, or a new one. Never zero.

    ``rng`` is seeded from the OS, as the SDK's ``RandomIdGenerator`` (the module-level
    ``random``) is: ids must be unique, not secret."""
    span_id = rng.getrandbits(64) or 1
    if parent is not None:
        return parent.trace_id, span_id
    return rng.getrandbits(128) or 1, span_id


class SpanEnd(NamedTuple):
    """What a hop learnt by its end, which becomes the span's last attributes.

    Requests of one kind end alike (same status, route, backend, flag...), so the encoder
    caches the bytes of these attributes by this tuple: one lookup per span instead of one
    per attribute."""

    status: int
    route: str | None = None
    backend: str | None = None
    retries: int = 0
    decision: str | None = None
    destination_workload: str | None = None
    flag: str | None = None
    grpc_code: int | None = None
    error_type: str | None = None

    def attributes(self) -> list[tuple[str, AttrValue]]:
        """The attributes, in the order they are written (the encoder's and the SDK view's)."""
        out: list[tuple[str, AttrValue]] = [("http.response.status_code", self.status)]
        if self.route is not None:
            out.append(("mesh.route", self.route))
            out.append(("http.route", self.route))
        if self.backend is not None:
            out.append(("mesh.backend", self.backend))
        if self.retries:
            out.append(("mesh.retries", self.retries))
        if self.decision is not None:
            out.append(("mesh.decision", self.decision))
        if self.destination_workload is not None:
            out.append(("mesh.destination.workload", self.destination_workload))
        if self.flag:
            out.append(("mesh.response_flag", self.flag))
        if self.grpc_code is not None:
            out.append(("rpc.grpc.status_code", self.grpc_code))
        if self.error_type is not None:
            out.append(("error.type", self.error_type))
        return out


class SpanRecord:
    """One hop's span. Filled by ``meshproxy.telemetry.hop``; read-only once ``end_ns`` is set."""

    __slots__ = (
        "attributes",
        "end",
        "end_ns",
        "error",
        "kind",
        "name",
        "parent_id",
        "span_id",
        "start_ns",
        "static",
        "static_wire",
        "trace_id",
        "trace_state",
    )

    def __init__(  # positional in the hot path (hop.start_http): a keyword call costs more
        self,
        trace_id: int,
        span_id: int,
        parent_id: int,
        trace_state: str,
        name: str,
        kind: int,
        start_ns: int,
    ) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id  # 0: a root span (this sidecar started the trace)
        self.trace_state = trace_state
        self.name = name
        self.kind = kind
        self.start_ns = start_ns
        self.end_ns = 0
        self.attributes: list[tuple[str, AttrValue]] = []
        # Attributes shared by every request of one kind (method, workloads, peer, user agent...):
        # one tuple per distinct set, and its OTLP bytes, both cached by the pipeline.
        self.static: tuple[tuple[str, AttrValue], ...] = ()
        self.static_wire = b""
        self.error: str | None = None  # the ERROR status description; None: status UNSET
        self.end: SpanEnd | None = None  # the attributes known at the end, after ``attributes``


def to_readable(record: SpanRecord, resource: Resource, scope: InstrumentationScope) -> ReadableSpan:
    """``record`` as the SDK's ``ReadableSpan`` (what SDK span exporters take)."""
    state = TraceState.from_header([record.trace_state]) if record.trace_state else TraceState()
    sampled = TraceFlags(TraceFlags.SAMPLED)
    context = SpanContext(record.trace_id, record.span_id, False, sampled, state)
    parent = (
        SpanContext(record.trace_id, record.parent_id, True, sampled, state) if record.parent_id else None
    )
    status = Status(StatusCode.ERROR, record.error) if record.error is not None else Status(StatusCode.UNSET)
    return ReadableSpan(
        name=record.name,
        context=context,
        parent=parent,
        resource=resource,
        attributes=dict(
            (*record.static, *record.attributes, *(record.end.attributes() if record.end else ()))
        ),
        kind=_SDK_KIND[record.kind],
        status=status,
        start_time=record.start_ns,
        end_time=record.end_ns,
        instrumentation_scope=scope,
    )
