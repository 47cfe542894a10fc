"""Exporters: selection from config and environment, real delivery, and a dead backend."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from tel_rig import eventually, head

from meshproxy.config import model
from meshproxy.telemetry import Telemetry, exporters


def dropped(tel: Telemetry, reason: str) -> float:
    text = generate_latest(tel.metrics.registry).decode()
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "meshproxy_spans_dropped_total" and s.labels["reason"] == reason
    )


def test_config_endpoints_win_over_the_environment() -> None:
    t = model.Tracing(
        otlp_grpc_endpoint="http://jaeger:4317", zipkin_endpoint="http://zipkin:9411/api/v2/spans"
    )
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://other:4317"}
    assert exporters.describe(t, env) == [
        ("otlp_grpc", "http://jaeger:4317"),
        ("zipkin", "http://zipkin:9411/api/v2/spans"),
    ]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, [("otlp_grpc", "http://c:4317")]),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
            [("otlp_http", "http://c:4318/v1/traces")],
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:4318/custom",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
            },
            [("otlp_http", "http://t:4318/custom")],
        ),
        (
            {
                "OTEL_TRACES_EXPORTER": "zipkin,otlp",
                "OTEL_EXPORTER_ZIPKIN_ENDPOINT": "http://z:9411/api/v2/spans",
            },
            [("zipkin", "http://z:9411/api/v2/spans"), ("otlp_grpc", "http://localhost:4317")],
        ),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, []),
        # The injected sidecar environment comes before the generic OTEL_* variables.
        (
            {
                "MESHPROXY_OTLP_GRPC_ENDPOINT": "http://jaeger-collector.meshproxy-system:4317",
                "MESHPROXY_ZIPKIN_ENDPOINT": "http://zipkin:9411/api/v2/spans",
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317",
            },
            [
                ("otlp_grpc", "http://jaeger-collector.meshproxy-system:4317"),
                ("zipkin", "http://zipkin:9411/api/v2/spans"),
            ],
        ),
    ],
)
def test_environment_selection(env: dict[str, str], expected: list[tuple[str, str]]) -> None:
    assert exporters.describe(model.Tracing(), env) == expected


class _Collector(BaseHTTPRequestHandler):
    bodies: list[tuple[str, bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        self.server.bodies.append((self.path, body))  # type: ignore[attr-defined]
        self.send_response(200 if self.path == "/v1/traces" else 202)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_collector() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    server.bodies = []  # type: ignore[attr-defined]
    t = threading.Thread(target=server.serve_forever, name="test-collector", daemon=True)
    t.start()
    yield server
    server.shutdown()
    server.server_close()
    t.join(5)


async def test_otlp_http_and_zipkin_deliver_spans(http_collector: ThreadingHTTPServer) -> None:
    port = http_collector.server_address[1]
    settings = model.Telemetry(
        tracing=model.Tracing(
            otlp_http_endpoint=f"http://127.0.0.1:{port}/v1/traces",
            zipkin_endpoint=f"http://127.0.0.1:{port}/api/v2/spans",
        )
    )
    tel = Telemetry.build(settings, model.Workload(name="frontend", namespace="demo"), env={})
    hop = tel.start_http(direction="outbound", head=head(), peer=("127.0.0.1", 1), destination_service="inv")
    hop.annotate(route="items")
    hop.finish(status=200, flag=None, request_bytes=0, response_bytes=0)
    await tel.shutdown(grace=10)  # shutdown flushes every exporter

    bodies = dict(http_collector.bodies)  # type: ignore[attr-defined]
    req = ExportTraceServiceRequest.FromString(bodies["/v1/traces"])
    (span,) = [s for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert span.trace_id.hex() == hop.trace_id and span.name == "GET items"
    (zspan,) = json.loads(bodies["/api/v2/spans"])
    assert zspan["traceId"] == hop.trace_id and zspan["kind"] == "CLIENT"
    assert zspan["localEndpoint"]["serviceName"] == "frontend"
    assert dropped(tel, "export_failed") == 0


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_dead_backend_drops_and_counts_and_never_blocks_finish() -> None:
    settings = model.Telemetry(
        tracing=model.Tracing(otlp_grpc_endpoint=f"http://127.0.0.1:{_closed_port()}", max_queue_size=8)
    )
    env = {"OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "300"}  # ms: each failed export gives up quickly
    tel = Telemetry.build(settings, model.Workload(name="a"), env=env, schedule_delay_millis=20)
    n = 100
    for _ in range(n):
        # Traffic goes on while the exporter retries a closed port: finish() only enqueues.
        tel.start_http(
            direction="outbound", head=head(), peer=("127.0.0.1", 1), destination_service="b"
        ).finish(status=200, flag=None, request_bytes=0, response_bytes=0)
    assert dropped(tel, "queue_full") > 0
    # Every span is lost, and each loss is counted exactly once.
    assert await eventually(lambda: dropped(tel, "queue_full") + dropped(tel, "export_failed") >= n)
    assert dropped(tel, "export_failed") > 0
    assert dropped(tel, "queue_full") + dropped(tel, "export_failed") == n
    await tel.shutdown(grace=2)
