"""Resilience layers of the pipeline against a real loopback upstream: breaker, timeout, faults, rate limit."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from dp_rig import VIP, RawServer, Sidecar, Upstream, event_loop_policy, service, snapshot, wait_for

from meshproxy.config.model import (
    CircuitBreaker,
    Endpoint,
    FaultInjection,
    Inbound,
    InboundPort,
    LbPolicy,
    RateLimit,
    RetryPolicy,
    Snapshot,
    TrafficPolicy,
)
from meshproxy.core.clock import FakeClock

__all__ = ["event_loop_policy"]  # the fixture: run every test on asyncio and uvloop


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream() as u:
        yield u


async def test_breaker_limit_rejects_overload_with_uo_then_admits_again(upstream: Upstream) -> None:
    policy = TrafficPolicy(retry=None, circuit_breaker=CircuitBreaker(max_requests=2), outlier_detection=None)
    async with (
        Sidecar(snapshot(service(upstream.port, policy=policy)), (VIP, 80)) as sc,
        httpx.AsyncClient(base_url=sc.url, timeout=10) as client,
    ):
        slow = [asyncio.create_task(client.get("/slow")) for _ in range(2)]
        await wait_for(lambda: upstream.server.requests == 2)
        r = await client.get("/hello")
        assert r.status_code == 503
        assert r.headers["x-meshproxy-flag"] == "UO"
        upstream.server.release.set()
        assert [t.status_code for t in await asyncio.gather(*slow)] == [200, 200]
        r = await client.get("/hello")
        assert r.status_code == 200
    assert "/hello" in upstream.server.paths


async def test_failure_accrual_opens_the_circuit_and_a_probe_closes_it(upstream: Upstream) -> None:
    clock = FakeClock(1000.0)
    breaker = CircuitBreaker(consecutive_failures=2, open_duration=5.0)
    policy = TrafficPolicy(retry=None, circuit_breaker=breaker, outlier_detection=None)
    async with (
        Sidecar(snapshot(service(upstream.port, policy=policy)), (VIP, 80), clock=clock) as sc,
        httpx.AsyncClient(base_url=sc.url) as client,
    ):
        for _ in range(2):
            assert (await client.get("/status/500")).status_code == 500
        seen = upstream.server.requests
        r = await client.get("/hello")
        assert r.status_code == 503
        assert r.headers["x-meshproxy-flag"] == "CO"
        assert upstream.server.requests == seen  # rejected without touching the upstream
        clock.advance(5.0)
        assert (await client.get("/hello")).status_code == 200  # the half-open probe succeeds
        assert (await client.get("/hello")).status_code == 200  # and the circuit is closed


async def test_request_timeout_is_504_ut(upstream: Upstream) -> None:
    policy = TrafficPolicy(timeout=0.2, retry=None, outlier_detection=None)
    async with (
        Sidecar(snapshot(service(upstream.port, policy=policy)), (VIP, 80)) as sc,
        httpx.AsyncClient(base_url=sc.url) as client,
    ):
        r = await client.get("/slow")
        assert r.status_code == 504
        assert r.headers["x-meshproxy-flag"] == "UT"
        upstream.server.release.set()
        assert (await client.get("/hello")).status_code == 200


async def test_request_timeouts_fire_on_time_for_each_request_among_finished_ones(upstream: Upstream) -> None:
    # Requests with the same timeout share one deadline queue: a deadline behind finished
    # requests, or after one that fired, must still fire, and never before its own time.
    policy = TrafficPolicy(timeout=0.3, retry=None, outlier_detection=None)
    loop = asyncio.get_running_loop()

    async def timed(client: httpx.AsyncClient, path: str) -> tuple[httpx.Response, float]:
        start = loop.time()
        r = await client.get(path)
        return r, loop.time() - start

    async with (
        Sidecar(snapshot(service(upstream.port, policy=policy)), (VIP, 80)) as sc,
        httpx.AsyncClient(base_url=sc.url, timeout=10) as client,
    ):
        first = asyncio.create_task(timed(client, "/slow"))
        await wait_for(lambda: upstream.server.requests == 1)
        for _ in range(3):
            assert (await client.get("/hello")).status_code == 200
        second = asyncio.create_task(timed(client, "/slow"))
        for r, took in await asyncio.gather(first, second):
            assert r.status_code == 504 and r.headers["x-meshproxy-flag"] == "UT"
            assert 0.3 <= took < 5.0
        upstream.server.release.set()
        assert (await client.get("/hello")).status_code == 200


async def test_fault_injection_aborts_with_the_configured_status(upstream: Upstream) -> None:
    policy = TrafficPolicy(fault=FaultInjection(abort_percent=100, abort_status=418))
    async with (
        Sidecar(snapshot(service(upstream.port, policy=policy)), (VIP, 80)) as sc,
        httpx.AsyncClient(base_url=sc.url) as client,
    ):
        r = await client.get("/hello")
        assert r.status_code == 418
        assert r.headers["x-meshproxy-flag"] == "FI"
    assert upstream.server.requests == 0


async def test_inbound_rate_limit_answers_429_rl(upstream: Upstream) -> None:
    clock = FakeClock()
    port = InboundPort(
        port=upstream.port, service="web", rate_limit=RateLimit(requests_per_second=1, burst=2)
    )
    snap = Snapshot(inbound=Inbound(app_address="127.0.0.1", ports=(port,))).with_version()
    async with (
        Sidecar(snap, ("198.18.0.20", upstream.port), direction="inbound", clock=clock) as sc,
        httpx.AsyncClient(base_url=sc.url) as client,
    ):
        statuses = [(await client.get("/hello")).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        clock.advance(1.0)
        assert (await client.get("/hello")).status_code == 200
    assert upstream.server.requests == 3


async def test_inbound_port_without_a_limit_uses_its_services_rate_limit(upstream: Upstream) -> None:
    clock = FakeClock()
    limited = service(
        upstream.port, policy=TrafficPolicy(rate_limit=RateLimit(requests_per_second=1, burst=1))
    )
    port = InboundPort(port=upstream.port, service=limited.name)
    snap = Snapshot(
        services=(limited,), inbound=Inbound(app_address="127.0.0.1", ports=(port,))
    ).with_version()
    async with (
        Sidecar(snap, ("198.18.0.20", upstream.port), direction="inbound", clock=clock) as sc,
        httpx.AsyncClient(base_url=sc.url) as client,
    ):
        assert (await client.get("/hello")).status_code == 200
        r = await client.get("/hello")
        assert r.status_code == 429
        assert r.headers["x-meshproxy-flag"] == "RL"
        assert "service:web.demo" in r.headers["x-meshproxy-reason"]
        clock.advance(1.0)
        assert (await client.get("/hello")).status_code == 200


async def test_no_config_yet_is_503_nc(upstream: Upstream) -> None:
    async with (
        Sidecar(None, ("127.0.0.1", upstream.port)) as sc,
        httpx.AsyncClient(base_url=sc.url) as client,
    ):
        r = await client.get("/hello")
        assert r.status_code == 503
        assert r.headers["x-meshproxy-flag"] == "NC"
        sc.runtime.apply(snapshot())
        assert (await client.get("/hello")).status_code == 200


async def test_per_try_timeout_retries_on_another_endpoint(upstream: Upstream) -> None:
    async def black_hole(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read()  # takes the request, never answers

    async with RawServer(black_hole) as stuck:
        eps = (
            Endpoint(address="127.0.0.1", port=stuck.port),
            Endpoint(address="127.0.0.1", port=upstream.port),
        )
        retry = RetryPolicy(
            attempts=1,
            per_try_timeout=0.2,
            retry_on=frozenset({"gateway-error"}),
            backoff_base=0.001,
            backoff_max=0.002,
        )
        policy = TrafficPolicy(retry=retry, lb=LbPolicy.ROUND_ROBIN, outlier_detection=None)
        async with (
            Sidecar(snapshot(service(0, endpoints=eps, policy=policy)), (VIP, 80)) as sc,
            httpx.AsyncClient(base_url=sc.url) as client,
        ):
            # Round robin sends one of the two first tries to the black hole; both succeed.
            statuses = [(await client.get("/hello")).status_code for _ in range(2)]
        assert statuses == [200, 200]
        assert stuck.accepted >= 1
        assert upstream.server.requests == 2


async def test_a_split_keeps_the_addressed_services_retries_and_timeout(upstream: Upstream) -> None:
    """inventory -> 100% inventory-v2: inventory's policy retries; v2's own policy (none) does not apply."""
    from meshproxy.config.model import Route, Service, ServiceKey, WeightedBackend

    backend = Service(
        name="web-v2",
        namespace="demo",
        port=80,
        endpoints=(Endpoint(address="127.0.0.1", port=upstream.port),),
        policy=TrafficPolicy(retry=None, outlier_detection=None),
    )
    parent = service(
        upstream.port,
        endpoints=(),
        routes=(Route(name="split", backends=(WeightedBackend(ServiceKey("web-v2.demo:80"), 100),)),),
        policy=TrafficPolicy(retry=RetryPolicy(attempts=2, retry_on=frozenset({"5xx"}), backoff_base=0.001)),
    )
    async with (
        Sidecar(snapshot(parent, backend), (VIP, 80)) as sc,
        httpx.AsyncClient(base_url=sc.url, timeout=10) as client,
    ):
        upstream.server.flaky_failures = 2
        r = await client.get("/flaky")
        assert r.status_code == 200, r.headers
        assert upstream.server.paths.count("/flaky") == 3
