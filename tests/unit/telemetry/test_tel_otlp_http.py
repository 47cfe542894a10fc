"""The event-loop OTLP/HTTP client against a real HTTP/1.1 server (the standard library's, on
loopback): what it sends is what a collector receives, on one kept-alive connection; 429 and
5xx-unavailable answers are retried (after ``Retry-After`` when given), other answers are
not and their message is logged; a dead or garbling collector costs a bounded wait."""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from test_tel_otlp_grpc import finish_hops, no_backoff

from meshproxy.config import model
from meshproxy.telemetry import Telemetry
from meshproxy.telemetry.otlp_http import OtlpHttpClient
from meshproxy.telemetry.otlp_loop import SLICE, parse_headers
from tests.support.otlp import closed_port
from tests.support.otlp import export_request as payload


@dataclass
class Answer:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    raw: bytes | None = None  # sent as is instead of an HTTP answer


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    connection: int


class Collector:
    """An OTLP/HTTP receiver: records requests, answers from ``script`` first, then 200."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.script: list[Answer] = []
        self.connections = 0
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as collectors do

            def setup(self) -> None:
                super().setup()
                with collector.lock:
                    collector.connections += 1
                    self.connection_no = collector.connections

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with collector.lock:
                    collector.received.append(
                        Received(
                            self.path,
                            {k.lower(): v for k, v in self.headers.items()},
                            body,
                            self.connection_no,
                        )
                    )
                    answer = collector.script.pop(0) if collector.script else Answer(200)
                if answer.raw is not None:
                    self.wfile.write(answer.raw)
                    self.close_connection = True
                    return
                self.send_response(answer.status)
                for k, v in answer.headers.items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}/v1/traces"

    @property
    def spans(self) -> int:
        return sum(
            len(ss.spans)
            for r in self.received
            for rs in ExportTraceServiceRequest.FromString(r.body).resource_spans
            for ss in rs.scope_spans
        )

    def trace_ids(self) -> list[str]:
        return [
            s.trace_id.hex()
            for r in self.received
            for rs in ExportTraceServiceRequest.FromString(r.body).resource_spans
            for ss in rs.scope_spans
            for s in ss.spans
        ]


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    t = threading.Thread(target=c.server.serve_forever, name="otlp-http-collector", daemon=True)
    t.start()
    yield c
    c.server.shutdown()
    c.server.server_close()
    t.join(5)


PROTOBUF = {"content-type": "application/x-protobuf"}


async def test_exports_arrive_whole_on_one_kept_alive_connection(collector: Collector) -> None:
    client = OtlpHttpClient(collector.url, timeout=5)
    big = payload(400)  # several slices, the loop free between them
    assert len(big) > 4 * SLICE
    for p in (payload(1), big, payload(2)):
        assert await client.export(p)
    await client.aclose()
    assert [ExportTraceServiceRequest.FromString(r.body) for r in collector.received] == [
        ExportTraceServiceRequest.FromString(p) for p in (payload(1), big, payload(2))
    ]
    assert {r.connection for r in collector.received} == {1}
    first = collector.received[0]
    assert first.path == "/v1/traces"
    assert first.headers["content-type"] == "application/x-protobuf"
    assert first.headers["host"] == f"127.0.0.1:{collector.port}"
    assert first.headers["user-agent"].startswith("meshproxy-otlp-http/")


async def test_the_loop_serves_other_work_between_the_slices_of_a_large_body(collector: Collector) -> None:
    client = OtlpHttpClient(collector.url, timeout=5)
    assert await client.export(payload(1))  # the connection is open
    conn = client._conn
    assert conn is not None and conn.transport is not None
    ticks = 0
    at_write: list[int] = []  # the ticker's count at each write

    class Recording:
        def __init__(self, inner: object) -> None:
            self.inner = inner

        def write(self, data: bytes) -> None:
            at_write.append(ticks)
            self.inner.write(data)  # type: ignore[attr-defined]

        def __getattr__(self, name: str) -> object:
            return getattr(self.inner, name)

    conn.transport = Recording(conn.transport)  # type: ignore[assignment]

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    big = payload(400)
    assert await client.export(big)
    task.cancel()
    await client.aclose()
    # The head, then one write per slice, and the ticker ran before each slice.
    assert len(at_write) == 1 + -(-len(big) // SLICE)
    assert all(b > a for a, b in itertools.pairwise(at_write))
    assert ExportTraceServiceRequest.FromString(
        collector.received[-1].body
    ) == ExportTraceServiceRequest.FromString(big)


async def test_unavailable_answers_are_retried_after_retry_after(collector: Collector) -> None:
    collector.script = [Answer(503, {"retry-after": "0"}), Answer(429, {"retry-after": "0"}), Answer(502)]
    waits: list[int] = []

    def backoff(attempt: int) -> float:
        waits.append(attempt)
        return 0.01

    client = OtlpHttpClient(collector.url, timeout=5, backoff=backoff)
    assert await client.export(payload(3))
    await client.aclose()
    assert [r.body for r in collector.received] == [payload(3)] * 4  # the same request, 4 times
    assert waits == [2]  # only the 502 without Retry-After used the backoff (third attempt)


async def test_a_rejected_request_is_not_retried_and_its_message_is_logged(
    collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    status = Status(code=3, message="span.trace_id must be 16 bytes").SerializeToString()
    collector.script = [Answer(400, PROTOBUF, status)]
    client = OtlpHttpClient(collector.url, timeout=5, backoff=no_backoff)
    with caplog.at_level(logging.WARNING):
        assert not await client.export(payload(1))
    await client.aclose()
    assert len(collector.received) == 1
    assert any("HTTP 400" in r.getMessage() and "must be 16 bytes" in r.getMessage() for r in caplog.records)


async def test_a_partial_success_counts_as_exported_and_is_logged(
    collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    partial = ExportTraceServiceResponse(
        partial_success=ExportTracePartialSuccess(rejected_spans=2, error_message="too old")
    ).SerializeToString()
    collector.script = [Answer(200, PROTOBUF, partial)]
    client = OtlpHttpClient(collector.url, timeout=5)
    with caplog.at_level(logging.WARNING):
        assert await client.export(payload(3))
    await client.aclose()
    assert any("rejected 2 spans: too old" in r.getMessage() for r in caplog.records)


async def test_configured_headers_are_sent_and_own_headers_kept(collector: Collector) -> None:
    headers = parse_headers("Authorization=Bearer%20abc,x-tenant=blue,content-type=text/plain")
    client = OtlpHttpClient(collector.url, timeout=5, headers=headers)
    assert await client.export(payload(1))
    await client.aclose()
    got = collector.received[0].headers
    assert (got["authorization"], got["x-tenant"]) == ("Bearer abc", "blue")
    assert got["content-type"] == "application/x-protobuf"


def test_headers_that_cannot_travel_as_one_line_are_refused(caplog: pytest.LogCaptureFixture) -> None:
    raw = "good=1,x-evil=a%0D%0Ainjected: yes,bad name=2,x-nul=%00"
    with caplog.at_level(logging.WARNING):
        assert parse_headers(raw) == (("good", "1"),)
    assert len([r for r in caplog.records if "malformed OTLP header" in r.getMessage()]) == 3


async def test_a_closed_connection_is_replaced_and_a_garbled_answer_retried(collector: Collector) -> None:
    collector.script = [
        Answer(200, {"connection": "close"}),
        Answer(0, raw=b"HTTP/1.1 2OO NOT A STATUS\r\n\r\n"),
    ]
    client = OtlpHttpClient(collector.url, timeout=5, backoff=no_backoff)
    for n in (1, 2):
        assert await client.export(payload(n))
    await client.aclose()
    assert collector.spans == 1 + 2 + 2  # the garbled answer's request was sent again
    assert [r.connection for r in collector.received] == [1, 2, 3]


async def test_a_dead_collector_fails_within_the_timeout() -> None:
    client = OtlpHttpClient(f"http://127.0.0.1:{closed_port()}/v1/traces", timeout=0.5, backoff=no_backoff)
    started = time.monotonic()
    assert not await client.export(payload(1))
    assert time.monotonic() - started < 5  # bounded by the timeout, not a hang
    await client.aclose()


async def test_retrying_a_dead_collector_leaves_no_exception_behind() -> None:
    # The retry waits between attempts; compiled, a wait inside the except handler made the
    # connect error every task's sys.exc_info() and then left it there for good.
    client = OtlpHttpClient(f"http://127.0.0.1:{closed_port()}/v1/traces", timeout=0.3, backoff=no_backoff)
    assert not await client.export(payload(1))
    await client.aclose()
    assert sys.exc_info() == (None, None, None)


async def test_a_silent_collector_fails_within_the_timeout() -> None:
    with socket.socket() as listener:  # accepts connections, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client = OtlpHttpClient(f"http://127.0.0.1:{listener.getsockname()[1]}/", timeout=0.3)
        started = time.monotonic()
        assert not await client.export(payload(1))
        assert time.monotonic() - started < 5
        await client.aclose()


def test_endpoints_that_are_not_plain_http_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="ftp://c:21"):
        OtlpHttpClient("ftp://c:21/v1/traces", timeout=1)
    client = OtlpHttpClient("collector.observability:4318", timeout=1)
    assert (client.host, client.port, client.path) == ("collector.observability", 4318, "/")
    client = OtlpHttpClient("http://[::1]/otlp/v1/traces?tenant=a", timeout=1)
    assert (client.host, client.port, client.path) == ("::1", 80, "/otlp/v1/traces?tenant=a")


async def test_telemetry_exports_over_http_from_the_loop_without_a_thread(collector: Collector) -> None:
    # The standard variables, as a pod's environment sets them.
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.port}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=blue",
    }
    threads_before = threading.active_count()
    tel = Telemetry.build(
        model.Telemetry(), model.Workload(name="a", namespace="demo"), env=env, schedule_delay_millis=20
    )
    (queue,) = tel.tracing.async_queues
    assert isinstance(queue.client, OtlpHttpClient)
    hops = finish_hops(tel, 5)
    assert threading.active_count() == threads_before
    await tel.tracing.flush()
    assert collector.trace_ids() == hops
    assert collector.received[0].path == "/v1/traces"
    assert collector.received[0].headers["x-tenant"] == "blue"
    await tel.shutdown(grace=2)


async def test_the_sdk_http_exporter_is_kept_for_what_the_loop_client_does_not_do(
    collector: Collector,
) -> None:
    settings = model.Telemetry(tracing=model.Tracing(otlp_http_endpoint=collector.url))
    tel = Telemetry.build(
        settings, model.Workload(name="a", namespace="demo"), env={"MESHPROXY_OTLP_HTTP_CLIENT": "sdk"}
    )
    assert not tel.tracing.async_queues and len(tel.tracing.queues) == 1
    hops = finish_hops(tel, 3)
    assert await asyncio.to_thread(tel.tracing.force_flush, 5000)
    assert collector.trace_ids() == hops
    await tel.shutdown(grace=2)
