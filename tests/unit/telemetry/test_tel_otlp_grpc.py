"""The event-loop OTLP/gRPC client against a real grpcio server: what it sends is what a
collector receives, transient failures are retried, permanent ones are not, and a dead
collector costs a bounded wait."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from meshproxy.config import model
from meshproxy.telemetry import Telemetry
from meshproxy.telemetry.otlp_grpc import OtlpGrpcClient
from meshproxy.telemetry.otlp_loop import parse_headers
from tests.support.otlp import closed_port, export_request


@dataclass
class Collector:
    port: int
    requests: list[ExportTraceServiceRequest] = field(default_factory=list)
    metadata: list[dict[str, str]] = field(default_factory=list)
    # Codes to answer the next calls with, in order; then OK.
    failures: list[grpc.StatusCode] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # set by each accepted request

    @property
    def spans(self) -> int:
        return sum(len(ss.spans) for r in self.requests for rs in r.resource_spans for ss in rs.scope_spans)

    async def wait_for_spans(self, n: int) -> None:
        """Until ``n`` spans arrived (callers bound the wait with ``asyncio.timeout``)."""
        while self.spans < n:
            self.arrived.clear()
            await self.arrived.wait()

    def trace_ids(self) -> list[str]:
        """The trace id of every span received, in arrival order."""
        return [
            s.trace_id.hex()
            for r in self.requests
            for rs in r.resource_spans
            for ss in rs.scope_spans
            for s in ss.spans
        ]


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    server = grpc.aio.server()
    state = Collector(0)

    async def export(request: ExportTraceServiceRequest, context: grpc.aio.ServicerContext) -> object:
        state.metadata.append({k: v for k, v in context.invocation_metadata() or ()})  # type: ignore[misc]
        if state.failures:
            await context.abort(state.failures.pop(0), "try again")
        state.requests.append(request)
        state.arrived.set()
        return ExportTraceServiceResponse()

    handler = grpc.method_handlers_generic_handler(
        "opentelemetry.proto.collector.trace.v1.TraceService",
        {
            "Export": grpc.unary_unary_rpc_method_handler(
                export,
                request_deserializer=ExportTraceServiceRequest.FromString,
                response_serializer=ExportTraceServiceResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    state.port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield state
    await server.stop(None)


payload = export_request


def no_backoff(attempt: int) -> float:
    return 0.01


async def test_export_arrives_whole_even_beyond_the_flow_control_window(collector: Collector) -> None:
    client = OtlpGrpcClient(f"http://127.0.0.1:{collector.port}", timeout=5)
    big = payload(2000)  # ~0.5 MB: many DATA frames, several window updates
    assert len(big) > 4 * 65535
    assert await client.export(payload(1))
    assert await client.export(big)
    await client.aclose()
    assert ExportTraceServiceRequest.FromString(big) == collector.requests[1]
    assert collector.spans == 2001


async def test_transient_failures_are_retried_on_the_same_or_a_new_connection(collector: Collector) -> None:
    collector.failures = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED]
    client = OtlpGrpcClient(f"127.0.0.1:{collector.port}", timeout=5, backoff=no_backoff)
    assert await client.export(payload(3))
    assert len(collector.metadata) == 3 and collector.spans == 3
    await client.aclose()


async def test_a_permanent_failure_is_not_retried(collector: Collector) -> None:
    collector.failures = [grpc.StatusCode.INVALID_ARGUMENT]
    client = OtlpGrpcClient(f"127.0.0.1:{collector.port}", timeout=5, backoff=no_backoff)
    assert not await client.export(payload(1))
    assert len(collector.metadata) == 1 and collector.spans == 0
    await client.aclose()


async def test_configured_headers_are_sent_as_metadata(collector: Collector) -> None:
    headers = parse_headers("Authorization=Bearer%20abc, x-tenant = blue ,bad-entry")
    assert headers == (("authorization", "Bearer abc"), ("x-tenant", "blue"))
    client = OtlpGrpcClient(f"http://127.0.0.1:{collector.port}", timeout=5, headers=headers)
    assert await client.export(payload(1))
    assert collector.metadata[0]["authorization"] == "Bearer abc"
    assert collector.metadata[0]["x-tenant"] == "blue"
    await client.aclose()


async def test_a_dead_collector_fails_within_the_timeout() -> None:
    client = OtlpGrpcClient(f"127.0.0.1:{closed_port()}", timeout=0.5, backoff=no_backoff)
    started = time.monotonic()
    assert not await client.export(payload(1))
    assert time.monotonic() - started < 5  # bounded by the timeout, not a hang
    await client.aclose()


def finish_hops(tel: Telemetry, n: int) -> list[str]:
    """Start and finish ``n`` outbound HTTP hops; their trace ids, in order."""
    from tel_rig import head

    ids = []
    for _ in range(n):
        hop = tel.start_http(
            direction="outbound", head=head(), peer=("127.0.0.1", 1), destination_service="b"
        )
        hop.finish(status=200, flag=None, request_bytes=0, response_bytes=0)
        ids.append(hop.trace_id)
    return ids


async def test_telemetry_exports_from_the_loop_without_a_thread(collector: Collector) -> None:
    import threading

    settings = model.Telemetry(tracing=model.Tracing(otlp_grpc_endpoint=f"http://127.0.0.1:{collector.port}"))
    threads_before = threading.active_count()
    tel = Telemetry.build(
        settings, model.Workload(name="a", namespace="demo"), env={}, schedule_delay_millis=20
    )
    hops = finish_hops(tel, 5)
    assert threading.active_count() == threads_before
    await tel.tracing.flush()
    assert collector.trace_ids() == hops
    await tel.shutdown(grace=2)


async def test_the_sdk_grpc_exporter_sends_the_same_encoded_spans(collector: Collector) -> None:
    # MESHPROXY_OTLP_GRPC_CLIENT=sdk (and TLS or compression) take the OpenTelemetry SDK's
    # grpcio exporter, fed the bytes the event loop encoded, from a worker thread.
    from meshproxy.telemetry.otlp_export import WireOTLPGrpcExporter

    settings = model.Telemetry(tracing=model.Tracing(otlp_grpc_endpoint=f"http://127.0.0.1:{collector.port}"))
    tel = Telemetry.build(
        settings, model.Workload(name="a", namespace="demo"), env={"MESHPROXY_OTLP_GRPC_CLIENT": "sdk"}
    )
    assert not tel.tracing.async_queues and len(tel.tracing.queues) == 1
    hops = finish_hops(tel, 3)
    assert await asyncio.to_thread(tel.tracing.force_flush, 5000)
    assert collector.trace_ids() == hops
    with pytest.raises(TypeError):  # SDK spans would be encoded on the worker thread again
        WireOTLPGrpcExporter(endpoint="127.0.0.1:1", insecure=True).export([])
    await tel.shutdown(grace=2)


async def test_otel_bsp_variables_set_the_batch_size_and_the_schedule_delay(collector: Collector) -> None:
    # The OpenTelemetry SDK's batch variables, as a pod's env sets them: 7 spans in batches
    # of at most 3, and the partial last batch leaves on the 30 ms timer, with no flush asked.
    settings = model.Telemetry(tracing=model.Tracing(otlp_grpc_endpoint=f"http://127.0.0.1:{collector.port}"))
    env = {"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "3", "OTEL_BSP_SCHEDULE_DELAY": "30"}
    tel = Telemetry.build(settings, model.Workload(name="a", namespace="demo"), env=env)
    (queue,) = tel.tracing.async_queues
    assert (queue.batch, queue.delay) == (3, 0.03)
    hops = finish_hops(tel, 7)
    async with asyncio.timeout(10):
        await collector.wait_for_spans(7)  # no flush: the last, partial batch goes on the timer
    sizes = [
        sum(len(ss.spans) for rs in r.resource_spans for ss in rs.scope_spans) for r in collector.requests
    ]
    assert sizes == [3, 3, 1]
    assert collector.trace_ids() == hops
    await tel.shutdown(grace=2)


BSP_DELAY, BSP_BATCH = "OTEL_BSP_SCHEDULE_DELAY", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE"


@pytest.mark.parametrize(
    ("env", "expected", "named"),
    [
        ({}, (1000.0, 128), []),
        ({BSP_DELAY: "5000", BSP_BATCH: "512"}, (5000.0, 512), []),
        ({BSP_BATCH: "100000"}, (1000.0, 2048), []),  # never above the queue
        ({BSP_DELAY: "soon", BSP_BATCH: "0"}, (1000.0, 128), [BSP_DELAY, BSP_BATCH]),
        ({BSP_DELAY: "-5", BSP_BATCH: "2.5"}, (1000.0, 128), [BSP_DELAY, BSP_BATCH]),
    ],
)
def test_batch_settings_take_valid_values_and_name_the_invalid_ones(
    env: dict[str, str], expected: tuple[float, int], named: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    from meshproxy.telemetry.tracing import batch_settings

    assert batch_settings(env, 2048) == expected
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert [name for name in (BSP_DELAY, BSP_BATCH) if any(name in w for w in warned)] == named
