"""Telemetry: OpenTelemetry spans, trace-context propagation, Prometheus metrics, access logs.

The request pipeline uses one entry point, ``meshproxy.telemetry.hop.Telemetry``
(re-exported here); see ``hop.py`` for the API and its contract. One module per
concern: ``propagation`` (headers), ``tracing`` (provider, sampler, batching),
``exporters`` (OTLP/gRPC, OTLP/HTTP, Zipkin), ``metrics`` (Prometheus families),
``accesslog`` (JSON lines).
"""

from meshproxy.telemetry.hop import HttpHop, TcpHop, Telemetry
from meshproxy.telemetry.metrics import ProxyMetrics

__all__ = ["HttpHop", "ProxyMetrics", "TcpHop", "Telemetry"]
