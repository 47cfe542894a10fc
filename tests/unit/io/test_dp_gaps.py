"""Pipeline behaviours that close known gaps: panic mode, connection/pending limits, stalled
bodies, the upstream protocol by declaration, DC vs UC. Real loopback upstreams, in-process sidecar."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from dp_rig import VIP, Sidecar, Upstream, event_loop_policy, service, snapshot
from prometheus_client import CollectorRegistry

from meshproxy.config.model import OutlierDetection, Tracing, TrafficPolicy, Workload
from meshproxy.config.model import Telemetry as TelemetrySettings
from meshproxy.core.clock import FakeClock
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
