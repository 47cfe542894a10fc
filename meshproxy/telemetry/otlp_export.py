"""The OpenTelemetry OTLP span exporters, sending requests already encoded by ``otlp_wire``.

Owns: ``WireOTLPGrpcExporter`` and ``WireOTLPHttpExporter``: the SDK's OTLP/gRPC and
OTLP/HTTP (protobuf) exporters with one method added, ``export_encoded(payload, count)``,
which sends a serialized ``ExportTraceServiceRequest``. Everything else is the SDK's:
channel or session, TLS, headers, compression, timeout, retry with backoff on retryable
codes, reconnect on UNAVAILABLE, the exporters' own metrics.

Invariants: only ``export_encoded`` is used; ``export`` (SDK spans) is refused on the gRPC
one so a wrong wiring fails loudly instead of encoding spans on a worker thread again.

Concurrency: called from one export worker thread (``tracing.ExportQueue``).
"""

from __future__ import annotations

from typing import Any

import grpc
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.trace.export import SpanExportResult

_EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


class _Encoded:
    """An export batch already encoded: the payload and how many spans it holds."""

    __slots__ = ("count", "payload")

    def __init__(self, payload: bytes, count: int) -> None:
        self.payload = payload
        self.count = count


class _RawTraceStub:
    """A ``TraceServiceStub`` whose ``Export`` sends a request that is already serialized."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.Export = channel.unary_unary(
            _EXPORT_METHOD,
            request_serializer=None,  # the request is bytes already
            response_deserializer=ExportTraceServiceResponse.FromString,
        )


class WireOTLPGrpcExporter(GrpcSpanExporter):
    """The SDK's OTLP/gRPC span exporter sending pre-encoded requests (``export_encoded``).

    Everything but the encoding is the SDK's: channel, TLS, headers, compression, timeout,
    retry with backoff on retryable codes, reconnect on UNAVAILABLE."""

    def _initialize_channel_and_stub(self) -> None:
        super()._initialize_channel_and_stub()  # type: ignore[no-untyped-call]
        assert self._channel is not None
        self._client = _RawTraceStub(self._channel)

    def _translate_data(self, data: Any) -> Any:
        return data.payload  # always an _Encoded: export() refuses SDK spans

    def _count_data(self, data: Any) -> int:
        return int(data.count)

    def export(self, spans: Any) -> SpanExportResult:
        raise TypeError("WireOTLPGrpcExporter sends encoded batches: use export_encoded")

    def export_encoded(self, payload: bytes, count: int) -> bool:
        result = self._export(_Encoded(payload, count))  # type: ignore[arg-type]
        return result is SpanExportResult.SUCCESS


class WireOTLPHttpExporter(HttpSpanExporter):
    """The SDK's OTLP/HTTP (protobuf) span exporter sending pre-encoded requests."""

    def export_encoded(self, payload: bytes, count: int) -> bool:
        if self._shutdown:
            return False
        with self._metrics.export_operation(count) as result:
            outcome = self._client.export(payload)
            if not outcome.success:
                result.error = outcome.error
                return False
        return True
