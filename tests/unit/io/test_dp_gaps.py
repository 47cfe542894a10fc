"""Pipeline behaviours that close known gaps: panic mode, connection/pending limits, stalled
bodies, the upstream protocol by declaration, DC vs UC. Real loopback upstreams, in-process sidecar."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from collections.abc import Iterator

import httpx
import pytest
from dp_rig import (
    VIP,
    RawServer,
    Sidecar,
    Upstream,
    event_loop_policy,
    requests_by_flag,
    service,
    snapshot,
    wait_for,
)
from prometheus_client import CollectorRegistry

from meshproxy.config.model import (
    CircuitBreaker,
    Endpoint,
    OutlierDetection,
    Protocol,
    Tracing,
    TrafficPolicy,
    Workload,
)
from meshproxy.config.model import Telemetry as TelemetrySettings
from meshproxy.core.breaker import Limit
from meshproxy.core.clock import FakeClock
from meshproxy.core.http import RequestHead
from meshproxy.io.body import BytesBody
from meshproxy.io.exchange import DownstreamContext
from meshproxy.io.http1_client import Http1Client
from meshproxy.io.http2_client import Http2Client
from meshproxy.io.proxy import Call, Proxy
from meshproxy.io.runtime import Runtime
from meshproxy.telemetry.hop import Telemetry

__all__ = ["event_loop_policy"]  # the fixture: run every test on asyncio and uvloop


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream() as u:
        yield u


async def test_a_single_endpoint_service_stays_reachable_after_its_endpoint_is_ejected(
    upstream: Upstream,
) -> None:
    clock = FakeClock(1000.0)
    registry = CollectorRegistry()
    tel = Telemetry.build(
        TelemetrySettings(tracing=Tracing(sampling_ratio=0.0)), Workload(name="c"), registry=registry
    )
    od = OutlierDetection(consecutive_gateway_errors=2, base_ejection_time=30.0)
    policy = TrafficPolicy(retry=None, outlier_detection=od)
    try:
        async with (
            Sidecar(
                snapshot(service(upstream.port, policy=policy)), (VIP, 80), clock=clock, telemetry=tel
            ) as sc,
            httpx.AsyncClient(base_url=sc.url) as client,
        ):
            for _ in range(2):
                assert (await client.get("/status/503")).status_code == 503
            pool = sc.runtime.pools[next(iter(sc.runtime.pools))]
            assert pool.ejections_total == 1
            # Before panic mode this was 503 UH for 30 s; now the only endpoint keeps serving.
            r = await client.get("/hello")
            assert r.status_code == 200 and r.text == "hello\n"
            assert "x-meshproxy-flag" not in r.headers
            dest = {"destination": "web.demo:80"}
            assert registry.get_sample_value("meshproxy_lb_panic_requests_total", dest) == 1.0
            clock.advance(30.0)  # ejection over: normal balancing, no more panic picks
            assert (await client.get("/hello")).status_code == 200
            assert registry.get_sample_value("meshproxy_lb_panic_requests_total", dest) == 1.0
    finally:
        await tel.shutdown(grace=1.0)


async def test_http2_client_reaches_an_http1_only_service_declared_http1(upstream: Upstream) -> None:
    svc = service(upstream.port, protocol=Protocol.HTTP1)
    h2 = Http2Client()
    async with Sidecar(snapshot(svc), (VIP, 80)) as sc:
        sc.proxy.clients = {"1.1": sc.client, "2": h2}
        # HTTP/2 with prior knowledge (h2c), as gRPC and many service clients speak it.
        async with httpx.AsyncClient(base_url=sc.url, http1=False, http2=True) as client:
            for _ in range(2):
                r = await client.post("/echo", content=b"ping")
                assert r.http_version == "HTTP/2"
                assert r.status_code == 200 and r.content == b"ping"
        # The stdlib upstream speaks HTTP/1.1 only: it saw the requests, the h2 client nothing.
        assert upstream.server.requests == 2
        assert sc.client.connects == 1
        assert h2.connection_count(Endpoint("127.0.0.1", upstream.port)) == 0
    await h2.close()


async def test_upstream_version_follows_the_declaration_and_grpc_and_upgrades_stay_put() -> None:
    proxy = Proxy(
        Runtime(clock=FakeClock(), rng=random.Random(1)), {"1.1": Http1Client(), "2": Http2Client()}
    )
    ctx = DownstreamContext("outbound", "127.0.0.1", 1, VIP, 80, 1)

    def version(protocol: Protocol, head_version: str, *, grpc: bool = False, upgrade: bool = False) -> str:
        svc = service(1, protocol=protocol)
        head = RequestHead("POST", "/x", "web", (), version=head_version)
        call = Call(ctx, None, head, BytesBody(), None, grpc, service=svc, upgrade=upgrade)  # type: ignore[arg-type]
        return proxy._upstream_version(call)

    assert version(Protocol.HTTP1, "2") == "1.1"
    assert version(Protocol.HTTP2, "1.1") == "2"
    assert version(Protocol.AUTO, "2") == "2"
    assert version(Protocol.AUTO, "1.1") == "1.1"
    assert version(Protocol.HTTP1, "2", grpc=True) == "2"
    assert version(Protocol.HTTP2, "1.1", upgrade=True) == "1.1"


async def test_a_client_gone_mid_response_is_counted_dc() -> None:
    stalled = asyncio.Event()

    async def half_body(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nfirst-part")
        await w.drain()
        stalled.set()
        await r.read()  # the rest never comes; wait for the proxy to give up

    registry = CollectorRegistry()
    tel = Telemetry.build(
        TelemetrySettings(tracing=Tracing(sampling_ratio=0.0)), Workload(name="c"), registry=registry
    )
    try:
        async with (
            RawServer(half_body) as srv,
            Sidecar(snapshot(), ("127.0.0.1", srv.port), telemetry=tel) as sc,
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", sc.listener.port)
            writer.write(b"GET /x HTTP/1.1\r\nhost: up\r\n\r\n")
            await writer.drain()
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
            await stalled.wait()
            # The client leaves in the middle of the body with a reset (a FIN alone would be a
            # half-close, after which an HTTP/1 client may still wait for its response).
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            await wait_for(lambda: requests_by_flag(registry).get("DC", 0.0) == 1.0)
            assert "UC" not in requests_by_flag(registry)
    finally:
        await tel.shutdown(grace=1.0)


async def test_a_stalled_response_body_is_reset_after_the_stream_idle_timeout() -> None:
    async def stall(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nfirst-part")
        await w.drain()
        await r.read()  # and then nothing, for ever

    registry = CollectorRegistry()
    tel = Telemetry.build(
        TelemetrySettings(tracing=Tracing(sampling_ratio=0.0)), Workload(name="c"), registry=registry
    )
    try:
        async with (
            RawServer(stall) as srv,
            Sidecar(snapshot(), ("127.0.0.1", srv.port), telemetry=tel) as sc,
        ):
            sc.proxy.stream_idle_timeout = 0.3
            reader, writer = await asyncio.open_connection("127.0.0.1", sc.listener.port)
            writer.write(b"GET /x HTTP/1.1\r\nhost: up\r\n\r\n")
            await writer.drain()
            # The client gets what the upstream sent, then the connection ends (it cannot be a
            # clean end: 90 announced bytes are missing) instead of hanging for ever.
            with contextlib.suppress(ConnectionResetError):
                await asyncio.wait_for(reader.read(), 10)  # TimeoutError here: the bug
            await wait_for(lambda: requests_by_flag(registry).get("SI", 0.0) == 1.0)
            writer.close()
    finally:
        await tel.shutdown(grace=1.0)


async def test_max_connections_queues_pending_requests_and_max_pending_overflows_with_uo(
    upstream: Upstream,
) -> None:
    limits = CircuitBreaker(max_connections=1, max_pending_requests=1)
    policy = TrafficPolicy(retry=None, outlier_detection=None, circuit_breaker=limits)
    async with (
        Sidecar(snapshot(service(upstream.port, policy=policy)), (VIP, 80)) as sc,
        httpx.AsyncClient(base_url=sc.url, timeout=10) as client,
    ):
        breaker = sc.runtime.breakers[next(iter(sc.runtime.breakers))]
        first = asyncio.create_task(client.get("/slow"))  # holds the only connection
        await wait_for(lambda: upstream.server.requests == 1)
        second = asyncio.create_task(client.get("/hello"))  # waits for that connection
        await wait_for(lambda: breaker.count(Limit.PENDING) == 1)
        third = await client.get("/hello")  # nothing left to wait in: overflow
        assert third.status_code == 503
        assert third.headers["x-meshproxy-flag"] == "UO"
        assert "max_pending_requests=1" in third.headers["x-meshproxy-reason"]
        assert upstream.server.requests == 1  # neither the second nor the third reached it yet
        upstream.server.release.set()
        r1, r2 = await asyncio.gather(first, second)
        assert (r1.status_code, r2.status_code) == (200, 200)
        assert r2.text == "hello\n"
        assert len(upstream.server.connections) == 1  # the pending request reused the connection
        assert sc.client.connects == 1
        assert breaker.count(Limit.PENDING) == 0 and breaker.count(Limit.CONNECTIONS) == 1
    assert breaker.count(Limit.CONNECTIONS) == 0  # given back when the pool closed it


async def test_a_client_gone_while_waiting_for_the_head_is_dc_not_a_timeout(upstream: Upstream) -> None:
    registry = CollectorRegistry()
    tel = Telemetry.build(
        TelemetrySettings(tracing=Tracing(sampling_ratio=0.0)), Workload(name="c"), registry=registry
    )
    policy = TrafficPolicy(timeout=5.0, retry=None, outlier_detection=None)
    try:
        async with Sidecar(snapshot(service(upstream.port, policy=policy)), (VIP, 80), telemetry=tel) as sc:
            _reader, writer = await asyncio.open_connection("127.0.0.1", sc.listener.port)
            writer.write(b"GET /slow HTTP/1.1\r\nhost: web\r\n\r\n")
            await writer.drain()
            await wait_for(lambda: upstream.server.requests == 1)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()  # gone (RST) inside the request timeout
            await wait_for(lambda: requests_by_flag(registry).get("DC", 0.0) == 1.0)
            assert "UT" not in requests_by_flag(registry)
            upstream.server.release.set()
    finally:
        await tel.shutdown(grace=1.0)


async def test_breaker_gauge_follows_the_circuit_through_open_and_closed(upstream: Upstream) -> None:
    clock = FakeClock(1000.0)
    registry = CollectorRegistry()
    tel = Telemetry.build(
        TelemetrySettings(tracing=Tracing(sampling_ratio=0.0)), Workload(name="c"), registry=registry
    )
    breaker = CircuitBreaker(consecutive_failures=2, open_duration=5.0)
    policy = TrafficPolicy(retry=None, outlier_detection=None, circuit_breaker=breaker)

    def gauge() -> float | None:
        return registry.get_sample_value("meshproxy_circuit_breaker_state", {"destination": "web.demo:80"})

    try:
        async with (
            Sidecar(
                snapshot(service(upstream.port, policy=policy)), (VIP, 80), clock=clock, telemetry=tel
            ) as sc,
            httpx.AsyncClient(base_url=sc.url) as client,
        ):
            assert (await client.get("/hello")).status_code == 200
            assert gauge() == 0.0  # closed
            for _ in range(2):
                assert (await client.get("/status/500")).status_code == 500
            assert gauge() == 1.0  # open
            for _ in range(3):  # repeated identical states are not re-written, still open
                assert (await client.get("/hello")).headers["x-meshproxy-flag"] == "CO"
            assert gauge() == 1.0
            clock.advance(5.0)
            assert (await client.get("/hello")).status_code == 200  # the probe closes it
            assert gauge() == 0.0
    finally:
        await tel.shutdown(grace=1.0)


async def test_breaker_gauge_reads_open_while_max_requests_is_saturated(upstream: Upstream) -> None:
    registry = CollectorRegistry()
    tel = Telemetry.build(
        TelemetrySettings(tracing=Tracing(sampling_ratio=0.0)), Workload(name="c"), registry=registry
    )
    policy = TrafficPolicy(retry=None, outlier_detection=None, circuit_breaker=CircuitBreaker(max_requests=1))

    def gauge() -> float | None:
        return registry.get_sample_value("meshproxy_circuit_breaker_state", {"destination": "web.demo:80"})

    try:
        async with (
            Sidecar(snapshot(service(upstream.port, policy=policy)), (VIP, 80), telemetry=tel) as sc,
            httpx.AsyncClient(base_url=sc.url, timeout=10) as client,
        ):
            slow = asyncio.create_task(client.get("/slow"))
            await wait_for(lambda: upstream.server.requests == 1)
            assert (await client.get("/hello")).headers["x-meshproxy-flag"] == "UO"
            assert gauge() == 1.0  # open while the limit is saturated
            upstream.server.release.set()
            assert (await slow).status_code == 200
            await wait_for(lambda: gauge() == 0.0)  # closed once the request ended
    finally:
        await tel.shutdown(grace=1.0)


async def test_ejected_endpoints_gauge_returns_to_zero_when_the_ejection_ends(upstream: Upstream) -> None:
    clock = FakeClock(1000.0)
    registry = CollectorRegistry()
    tel = Telemetry.build(
        TelemetrySettings(tracing=Tracing(sampling_ratio=0.0)), Workload(name="c"), registry=registry
    )
    od = OutlierDetection(consecutive_gateway_errors=2, base_ejection_time=30.0)
    policy = TrafficPolicy(retry=None, outlier_detection=od)

    def gauge() -> float | None:
        return registry.get_sample_value("meshproxy_ejected_endpoints", {"destination": "web.demo:80"})

    try:
        async with (
            Sidecar(
                snapshot(service(upstream.port, policy=policy)), (VIP, 80), clock=clock, telemetry=tel
            ) as sc,
            httpx.AsyncClient(base_url=sc.url) as client,
        ):
            assert (await client.get("/hello")).status_code == 200
            assert gauge() is None  # nothing ejected yet: no series
            for _ in range(2):
                await client.get("/status/503")
            assert gauge() == 1.0
            clock.advance(30.0)
            assert (await client.get("/hello")).status_code == 200
            assert gauge() == 0.0
    finally:
        await tel.shutdown(grace=1.0)
