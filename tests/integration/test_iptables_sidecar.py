"""Interception with the real sidecar: HTTP through two ``meshproxy run`` sidecars, app unaware.

Pod A runs a plain HTTP client, pod B the demo inventory app; both pods get
``meshproxy iptables install`` and a sidecar running as the proxy UID. The client only
knows ``http://inventory.demo:8080`` (a VIP no interface owns, from the pod's /etc/hosts).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from typing import Any

import pytest

from meshproxy.config.model import Endpoint, Inbound, InboundPort, Protocol, Service, Snapshot, Workload
from meshproxy.lab.mesh import admin_get, intercept, start_sidecar
from meshproxy.lab.netns import Lab, Pod

pytestmark = [pytest.mark.netns, pytest.mark.usefixtures("iptables_available")]

VIP = "198.19.0.20"
APP_UID = 65534


@dataclass
class Mesh:
    lab: Lab
    a: Pod
    b: Pod

    def get(self, pod: Pod, url: str) -> tuple[int, Any]:
        script = "import json,sys; from meshdemo.common import get_json; print(json.dumps(get_json(sys.argv[1], {})))"
        done = self.lab.exec(pod, [sys.executable, "-c", script, url], uid=APP_UID)
        status, body = json.loads(done.stdout)
        return status, body


def requests_total(metrics: str, reporter: str) -> float:
    """Sum of ``*_requests_total`` samples with the given ``reporter`` label."""
    total = 0.0
    for line in metrics.splitlines():
        if "_requests_total{" in line and f'reporter="{reporter}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture
def mesh(lab: Lab) -> Mesh:
    hosts = {VIP: ["inventory.demo", "inventory.demo.svc.cluster.local"]}
    a, b = lab.add_pod("a", hosts=hosts), lab.add_pod("b", hosts=hosts)
    service = Service(
        name="inventory",
        namespace="demo",
        port=8080,
        protocol=Protocol.HTTP1,
        vips=(VIP,),
        hostnames=("inventory.demo", "inventory.demo.svc.cluster.local"),
        endpoints=(Endpoint(b.ip, 8080, pod="b-0", workload="b"),),
    )
    app = lab.spawn(
        b, [sys.executable, "-m", "meshdemo.inventory"], name="app", uid=APP_UID, env={"VERSION": "vb"}
    )
    lab.wait_listening(b, 8080, proc=app)
    for pod, inbound in ((a, ()), (b, (InboundPort(8080, Protocol.HTTP1, service="inventory"),))):
        snapshot = Snapshot(
            workload=Workload(name=pod.name, namespace="demo"),
            services=(service,),
            inbound=Inbound(ports=inbound),
        ).with_version()
        intercept(lab, pod)
        start_sidecar(lab, pod, snapshot)
    return Mesh(lab, a, b)


def test_http_goes_through_both_sidecars_and_the_app_is_unaware(mesh: Mesh) -> None:
    status, body = mesh.get(mesh.a, "http://inventory.demo:8080/stock")
    assert status == 200, body
    assert body["version"] == "vb"
    # The client sent no trace context: the sidecars started the trace and propagated it.
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}", body["trace_headers"]["traceparent"])
    # B's app saw the request come from its own sidecar over loopback, not from pod A.
    app_log = next(p for p in mesh.lab.processes if p.pod == mesh.b and p.name == "app").output()
    assert "inventory: 127.0.0.1 " in app_log and mesh.a.ip not in app_log
    # Each sidecar counted it, from its side.
    assert requests_total(admin_get(mesh.lab, mesh.a, "/metrics"), "source") == 1
    assert requests_total(admin_get(mesh.lab, mesh.b, "/metrics"), "destination") == 1


def test_app_calling_its_own_service_goes_out_and_back_in_through_its_sidecar(mesh: Mesh) -> None:
    # B -> inventory VIP -> B's outbound -> endpoint B's own IP -> (self-call rule) B's inbound -> app.
    status, body = mesh.get(mesh.b, "http://inventory.demo:8080/stock")
    assert status == 200, body
    metrics = admin_get(mesh.lab, mesh.b, "/metrics")
    assert requests_total(metrics, "source") == 1
    assert requests_total(metrics, "destination") == 1


def test_unknown_destination_from_the_app_gets_a_local_reply_not_a_hang(mesh: Mesh) -> None:
    # A VIP in the routed range that no service owns: the outbound sidecar answers itself.
    status, _ = mesh.get(mesh.a, "http://198.19.0.99:8080/")
    assert status >= 500


VIP6 = "2001:2:0:1::20"


@pytest.fixture
def mesh6(lab: Lab) -> Mesh:
    """The same two meshed pods, the service reached over IPv6 only (VIP and endpoint)."""
    hosts = {VIP6: ["inventory.demo", "inventory.demo.svc.cluster.local"]}
    a, b = lab.add_pod("a", hosts=hosts), lab.add_pod("b", hosts=hosts)
    if not b.ip6:
        pytest.skip("the kernel has no IPv6")
    service = Service(
        name="inventory",
        namespace="demo",
        port=8080,
        protocol=Protocol.HTTP1,
        vips=(VIP6,),
        hostnames=("inventory.demo", "inventory.demo.svc.cluster.local"),
        endpoints=(Endpoint(b.ip6, 8080, pod="b-0", workload="b"),),
    )
    app = lab.spawn(
        b, [sys.executable, "-m", "meshdemo.inventory"], name="app", uid=APP_UID, env={"VERSION": "v6"}
    )
    lab.wait_listening(b, 8080, proc=app)
    for pod, inbound in ((a, ()), (b, (InboundPort(8080, Protocol.HTTP1, service="inventory"),))):
        snapshot = Snapshot(
            workload=Workload(name=pod.name, namespace="demo"),
            services=(service,),
            inbound=Inbound(ports=inbound),
        ).with_version()
        intercept(lab, pod)
        start_sidecar(lab, pod, snapshot)
    return Mesh(lab, a, b)


def test_http_over_ipv6_goes_through_both_sidecars(mesh6: Mesh) -> None:
    # A's app -> [VIP6]:8080 -> ip6tables OUTPUT -> A's sidecar (15001) -> B's pod address over
    # IPv6 as the proxy UID -> B's ip6tables PREROUTING -> B's sidecar (15006) -> B's app.
    status, body = mesh6.get(mesh6.a, "http://inventory.demo:8080/stock")
    assert status == 200, body
    assert body["version"] == "v6"
    app_log = next(p for p in mesh6.lab.processes if p.pod == mesh6.b and p.name == "app").output()
    assert "inventory: 127.0.0.1 " in app_log and mesh6.a.ip6 not in app_log
    assert requests_total(admin_get(mesh6.lab, mesh6.a, "/metrics"), "source") == 1
    assert requests_total(admin_get(mesh6.lab, mesh6.b, "/metrics"), "destination") == 1
    # And it was the IPv6 rules that redirected it, on both sides.
    assert redirected6(mesh6.lab, mesh6.a, "MESH_REDIRECT") == 1
    assert redirected6(mesh6.lab, mesh6.b, "MESH_IN_REDIRECT") == 1


def redirected6(lab: Lab, pod: Pod, chain: str) -> int:
    """Connections ``chain``'s REDIRECT rule took in the pod's ip6tables nat table (nat sees one
    packet per connection)."""
    for line in lab.exec(pod, ["ip6tables-save", "-c", "-t", "nat"]).stdout.splitlines():
        if f"-A {chain} " in line and "REDIRECT" in line:
            return int(line.split("]", 1)[0].lstrip("[").split(":")[0])
    raise AssertionError(f"no REDIRECT rule in {chain}")
