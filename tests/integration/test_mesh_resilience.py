"""Routing and resilience as a caller sees them through two real sidecars: split, retries, breaker, outliers.

Topology (one lab for the module): pod ``client`` runs the load, pods ``s1`` and ``s2`` each
run the HTTP app on 8080, every pod intercepted and sidecar'd. The client's sidecar knows
four services, one per behaviour under test, each on its own VIP and with its own policy:

* ``split``   90/10 between ``split-v1`` (s1) and ``split-v2`` (s2)
* ``flaky``   s1 and s2, retries on gateway errors, no outlier detection
* ``breaker`` s1 only, ``max_requests: 2``, no retries
* ``outlier`` s1 and s2, ejection after 3 consecutive 5xx for 5 s, no retries
* ``accrual`` s1 only, circuit opens after 3 consecutive failures for 4 s, no retries

The apps' behaviour per area (``/flaky/...`` and so on) is switched from inside their pod
over loopback, and every wait polls a state (the app's counters, the sidecar's metrics).
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from mesh_rig import PY, RIG, client, control, mesh_lab, mesh_pods, metric, spawn_app, wait_for

from meshproxy.config.model import (
    CircuitBreaker,
    Endpoint,
    Inbound,
    InboundPort,
    LbPolicy,
    OutlierDetection,
    Protocol,
    RetryPolicy,
    Route,
    Service,
    ServiceKey,
    Snapshot,
    TrafficPolicy,
    WeightedBackend,
    Workload,
)
from meshproxy.lab.mesh import admin_get
from meshproxy.lab.netns import Lab, Pod

pytestmark = [pytest.mark.netns, pytest.mark.slow]

SPLIT_VIP, FLAKY_VIP, BREAKER_VIP, OUTLIER_VIP = "198.19.0.20", "198.19.0.21", "198.19.0.22", "198.19.0.23"
ACCRUAL_VIP = "198.19.0.24"
EJECTION_SECONDS = 5.0


@dataclass
class Mesh:
    lab: Lab
    client: Pod
    s1: Pod
    s2: Pod

    def load(self, url: str, n: int, concurrency: int = 4) -> Any:
        return client(self.lab, self.client, "load", url, "-n", str(n), "-c", str(concurrency), timeout=180)

    def metrics(self) -> str:
        return admin_get(self.lab, self.client, "/metrics")


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    with mesh_lab() as lab:
        cl, s1, s2 = lab.add_pod("client"), lab.add_pod("s1"), lab.add_pod("s2")
        for pod in (s1, s2):
            spawn_app(lab, pod, "http-app", "--name", pod.name, "--port", "8080", port=8080)
        ep1 = Endpoint(s1.ip, 8080, pod="s1-0", workload="s1")
        ep2 = Endpoint(s2.ip, 8080, pod="s2-0", workload="s2")

        def svc(name: str, vip: str | None, endpoints: tuple[Endpoint, ...], **kw: Any) -> Service:
            return Service(
                name=name,
                namespace="demo",
                port=80,
                protocol=Protocol.HTTP1,
                vips=(vip,) if vip else (),
                endpoints=endpoints,
                **kw,
            )

        services: tuple[Service, ...] = (
            svc(
                "split",
                SPLIT_VIP,
                (),
                routes=(
                    Route(
                        "canary",
                        backends=(
                            WeightedBackend(ServiceKey("split-v1.demo:80"), 90),
                            WeightedBackend(ServiceKey("split-v2.demo:80"), 10),
                        ),
                    ),
                ),
            ),
            svc("split-v1", None, (ep1,)),
            svc("split-v2", None, (ep2,)),
            svc(
                "flaky",
                FLAKY_VIP,
                (ep1, ep2),
                policy=TrafficPolicy(
                    lb=LbPolicy.ROUND_ROBIN,
                    retry=RetryPolicy(attempts=2, retry_on=frozenset({"gateway-error"})),
                    outlier_detection=None,
                    # Envoy's default of 3 concurrent retries (answered UO beyond) is less than
                    # 4 callers hitting a 50% failing endpoint can need at the same moment.
                    circuit_breaker=CircuitBreaker(max_retries=16),
                ),
            ),
            svc(
                "breaker",
                BREAKER_VIP,
                (ep1,),
                policy=TrafficPolicy(
                    retry=None, outlier_detection=None, circuit_breaker=CircuitBreaker(max_requests=2)
                ),
            ),
            svc(
                "outlier",
                OUTLIER_VIP,
                (ep1, ep2),
                policy=TrafficPolicy(
                    lb=LbPolicy.ROUND_ROBIN,
                    retry=None,
                    outlier_detection=OutlierDetection(
                        consecutive_5xx=3,
                        consecutive_gateway_errors=3,
                        base_ejection_time=EJECTION_SECONDS,
                        max_ejection_percent=50,
                    ),
                ),
            ),
        )
        services += (
            svc(
                "accrual",
                ACCRUAL_VIP,
                (ep1,),
                policy=TrafficPolicy(
                    retry=None,
                    outlier_detection=None,
                    circuit_breaker=CircuitBreaker(consecutive_failures=3, open_duration=4.0),
                ),
            ),
        )
        inbound = Inbound(ports=(InboundPort(8080, Protocol.HTTP1, service="app"),))
        mesh_pods(
            lab,
            {
                cl: Snapshot(workload=Workload(name="client", namespace="demo"), services=services),
                s1: Snapshot(workload=Workload(name="s1", namespace="demo"), inbound=inbound),
                s2: Snapshot(workload=Workload(name="s2", namespace="demo"), inbound=inbound),
            },
        )
        yield Mesh(lab, cl, s1, s2)


def test_90_10_split_over_1000_requests(mesh: Mesh) -> None:
    n = 1000
    r = mesh.load(f"http://{SPLIT_VIP}/split/who", n)
    assert r["status"] == {"200": n} and not r["errors"], r
    v2 = r["names"].get("s2", 0)
    assert r["names"].get("s1", 0) + v2 == n
    # Binomial(1000, 0.1): mean 100, sd 9.5; 4 sd either way fails by chance ~1 in 16000 runs.
    sd = math.sqrt(n * 0.1 * 0.9)
    assert abs(v2 - n * 0.1) <= 4 * sd, r["names"]
    # The sidecar recorded the backend chosen for each request.
    text = mesh.metrics()
    by_backend = {
        b: metric(text, "meshproxy_requests_total", reporter="source", route="canary", backend=b)
        for b in ("split-v1.demo:80", "split-v2.demo:80")
    }
    assert by_backend == {"split-v1.demo:80": n - v2, "split-v2.demo:80": v2}


def test_retries_mask_an_endpoint_failing_half_its_requests(mesh: Mesh) -> None:
    control(mesh.lab, mesh.s2, "mode", area="flaky", mode="alternate")  # every 2nd request: 503
    n = 200
    r = mesh.load(f"http://{FLAKY_VIP}/flaky/item", n)
    assert r["status"] == {"200": n} and not r["errors"], r  # the caller never saw a failure
    # ... although s2 did fail, and each failure was retried by the client's sidecar.
    failed = control(mesh.lab, mesh.s2, "stats")["hits"]["flaky"].get("503", 0)
    assert failed >= 10, failed
    retries = metric(mesh.metrics(), "meshproxy_retries_total", destination="flaky.demo:80")
    assert retries >= failed


@contextlib.contextmanager
def breaker_overload(mesh: Mesh, result: dict[str, Any]) -> Iterator[None]:
    """Six concurrent callers against a backend that holds every request until released.

    Two fit in ``max_requests: 2`` and are held by s1 for the duration of the ``with`` body;
    the other four must be turned away at once. On exit the held ones are released and the
    load's summary is stored in ``result``.
    """
    lab = mesh.lab
    load = subprocess.Popen(
        lab.command(
            mesh.client, [PY, RIG, "load", f"http://{BREAKER_VIP}/breaker/hold", "-n", "6", "-c", "6"]
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: control(lab, mesh.s1, "stats")["held"] == 2, 30, "two requests held by s1")
        yield
        assert control(lab, mesh.s1, "stats")["held"] == 2  # never more than the limit
    finally:
        control(lab, mesh.s1, "release")
        out, err = load.communicate(timeout=60)
    assert out.strip(), err
    result.update(json.loads(out.strip().splitlines()[-1]))


def breaker_gauge(mesh: Mesh) -> float:
    return metric(mesh.metrics(), "meshproxy_circuit_breaker_state", destination="breaker.demo:80")


def test_circuit_breaker_turns_overload_away_with_uo_and_recovers(mesh: Mesh) -> None:
    rejected_before = metric(
        mesh.metrics(), "meshproxy_circuit_breaker_rejections_total", destination="breaker.demo:80"
    )
    r: dict[str, Any] = {}
    with breaker_overload(mesh, r):
        # The sidecar's own view of the breaker, while the overload lasts.
        breakers = json.loads(admin_get(mesh.lab, mesh.client, "/stats/breakers"))
        assert {"service": "breaker.demo:80", "state": "open"}.items() <= next(
            b for b in breakers if b["service"] == "breaker.demo:80"
        ).items()
    assert r["status"] == {"200": 2, "503": 4}, r
    assert r["flags"] == {"UO": 4}
    rejected = metric(
        mesh.metrics(),
        "meshproxy_circuit_breaker_rejections_total",
        destination="breaker.demo:80",
        limit="max_requests",
    )
    assert rejected - rejected_before == 4
    # Load gone: requests flow again and the gauge reads closed.
    after = mesh.load(f"http://{BREAKER_VIP}/breaker/ok", 20, concurrency=1)
    assert after["status"] == {"200": 20} and not after["errors"], after
    assert breaker_gauge(mesh) == 0


def test_breaker_gauge_reads_open_under_overload_and_closed_after(mesh: Mesh) -> None:
    r: dict[str, Any] = {}
    with breaker_overload(mesh, r):
        wait_for(lambda: breaker_gauge(mesh) == 1, 10, "the breaker gauge reading open")
    assert r["flags"] == {"UO": 4}
    wait_for(lambda: breaker_gauge(mesh) == 0, 30, "the breaker gauge back to closed")


def test_circuit_opens_on_consecutive_failures_and_a_probe_closes_it(mesh: Mesh) -> None:
    url = f"http://{ACCRUAL_VIP}/accrual/item"

    def gauge() -> float:
        return metric(mesh.metrics(), "meshproxy_circuit_breaker_state", destination="accrual.demo:80")

    control(mesh.lab, mesh.s1, "mode", area="accrual", mode="fail")
    failing = mesh.load(url, 3, concurrency=1)
    assert failing["status"] == {"503": 3} and not failing["flags"], failing  # the app's own 503s
    # Open: answered by the sidecar (CO) without reaching the app, and the gauge says so.
    served = sum(control(mesh.lab, mesh.s1, "stats")["hits"]["accrual"].values())
    rejected = mesh.load(url, 5, concurrency=1)
    assert rejected["status"] == {"503": 5} and rejected["flags"] == {"CO": 5}, rejected
    assert sum(control(mesh.lab, mesh.s1, "stats")["hits"]["accrual"].values()) == served
    assert gauge() == 1
    # The app recovers; after open_duration one probe goes through, succeeds, and closes it.
    control(mesh.lab, mesh.s1, "mode", area="accrual", mode="ok")
    wait_for(lambda: mesh.load(url, 1, concurrency=1)["status"] == {"200": 1}, 30, "a successful probe")
    assert gauge() == 0
    after = mesh.load(url, 10, concurrency=2)
    assert after["status"] == {"200": 10}, after


def clusters_endpoint(mesh: Mesh, service: str, address: str) -> dict[str, Any]:
    """The client sidecar's ``/clusters`` entry of one endpoint of ``service``."""
    pools = json.loads(admin_get(mesh.lab, mesh.client, "/clusters"))
    pool = next(p for p in pools if p["service"] == service)
    return dict(next(e for e in pool["endpoints"] if e["address"] == address))


def eject_and_recover(mesh: Mesh, area: str) -> None:
    """Make s2 fail in ``area`` until the client sidecar ejects it, then let s2 recover."""
    url = f"http://{OUTLIER_VIP}/{area}/item"
    control(mesh.lab, mesh.s2, "mode", area=area, mode="fail")

    def ejected() -> bool:
        mesh.load(url, 6, concurrency=1)
        return metric(mesh.metrics(), "meshproxy_ejected_endpoints", destination="outlier.demo:80") == 1

    wait_for(ejected, 30, "s2 ejected from outlier.demo:80")
    control(mesh.lab, mesh.s2, "mode", area=area, mode="ok")  # s2 recovers, but is still ejected


def s2_hits(mesh: Mesh, area: str) -> int:
    return sum(control(mesh.lab, mesh.s2, "stats")["hits"].get(area, {}).values())


def test_ejected_endpoint_returns_after_it_recovers(mesh: Mesh) -> None:
    url = f"http://{OUTLIER_VIP}/outlier/item"
    eject_and_recover(mesh, "outlier")
    assert not clusters_endpoint(mesh, "outlier.demo:80", mesh.s2.ip)["healthy"]
    hits_before = s2_hits(mesh, "outlier")
    during = mesh.load(url, 6, concurrency=1)
    assert during["names"] == {"s1": 6}, during  # while ejected, s1 takes everything
    assert s2_hits(mesh, "outlier") == hits_before

    def back() -> bool:
        return int(mesh.load(url, 6, concurrency=1)["names"].get("s2", 0)) > 0

    wait_for(back, 30, "s2 receiving traffic again after its ejection time")
    assert clusters_endpoint(mesh, "outlier.demo:80", mesh.s2.ip)["healthy"]
    final = mesh.load(url, 20, concurrency=2)
    assert final["status"] == {"200": 20}
    assert final["names"].get("s2", 0) > 0 and final["names"].get("s1", 0) > 0, final


def test_ejected_endpoints_gauge_returns_to_zero(mesh: Mesh) -> None:
    eject_and_recover(mesh, "outlier-gauge")
    url = f"http://{OUTLIER_VIP}/outlier-gauge/item"
    wait_for(
        lambda: mesh.load(url, 6, concurrency=1)["names"].get("s2", 0) > 0,
        30,
        "s2 receiving traffic again after its ejection time",
    )
    wait_for(
        lambda: metric(mesh.metrics(), "meshproxy_ejected_endpoints", destination="outlier.demo:80") == 0,
        5,
        "the ejected-endpoints gauge back to 0 (s2 serves again)",
    )
