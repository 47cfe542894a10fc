"""An app reached on its pod IP, not loopback (``inbound.app_address``), through real sidecars.

Some apps listen only on the pod's address. The server-side sidecar then forwards to
``<pod IP>:<port>``, and ``meshproxy iptables install``'s OUTPUT rules would send that
connection straight back to its own inbound listener (rule 2: a proxy's connection to its
own pod IP is a meshed self-call) unless it comes from the passthrough source 127.0.0.6 /
::6 (rule 1). So every protocol the sidecar forwards inbound (HTTP/1.1, HTTP/2 for gRPC,
opaque TCP) must bind that source, and the app sees it as the peer.

Topology (one lab for the module): pod ``client`` runs the callers, pod ``server`` the apps
(bound to all IPv4 addresses), its sidecar told to reach them on the pod IP; where the kernel
has IPv6, pod ``server6`` runs an IPv6-only HTTP app reached on its pod's IPv6 address.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from mesh_rig import client, mesh_lab, mesh_pods, spawn_app

from meshproxy.config.model import Endpoint, Inbound, InboundPort, Protocol, Service, Snapshot, Workload
from meshproxy.lab.netns import Lab, Pod

pytestmark = [pytest.mark.netns, pytest.mark.usefixtures("iptables_available")]

WEB_VIP, GRPC_VIP, ECHO_VIP = "198.19.0.30", "198.19.0.31", "198.19.0.32"
WEB6_VIP = "2001:2:0:1::30"


@dataclass
class Mesh:
    lab: Lab
    client: Pod
    server: Pod
    server6: Pod | None


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    with mesh_lab() as lab:
        cl, sv = lab.add_pod("client"), lab.add_pod("server")
        sv6 = lab.add_pod("server6") if sv.ip6 else None
        spawn_app(lab, sv, "http-app", "--name", "server", "--port", "8080", port=8080)
        spawn_app(lab, sv, "grpc-app", "--port", "50051", port=50051)
        spawn_app(lab, sv, "tcp-echo", "--port", "7000", port=7000)

        def svc(name: str, vip: str, port: int, protocol: Protocol, pod: Pod, ip: str) -> Service:
            ep = Endpoint(ip, port, pod=f"{pod.name}-0", workload=pod.name)
            return Service(name, "demo", port, protocol=protocol, vips=(vip,), endpoints=(ep,))

        services = [
            svc("web", WEB_VIP, 8080, Protocol.HTTP1, sv, sv.ip),
            svc("grpc", GRPC_VIP, 50051, Protocol.HTTP2, sv, sv.ip),
            svc("echo", ECHO_VIP, 7000, Protocol.TCP, sv, sv.ip),
        ]
        snapshots = {}
        if sv6 is not None and sv6.ip6:
            spawn_app(lab, sv6, "http-app", "--name", "server6", "--port", "8080", "--host", "::", port=8080)
            services.append(svc("web6", WEB6_VIP, 8080, Protocol.HTTP1, sv6, sv6.ip6))
        for pod, ip in ((sv, sv.ip), (sv6, sv6.ip6 if sv6 is not None else None)):
            if pod is None or ip is None:
                continue
            inbound = Inbound(
                ports=(InboundPort(8080, Protocol.HTTP1), InboundPort(50051, Protocol.HTTP2)),
                opaque_ports=frozenset({7000}),
                app_address=ip,
            )
            snapshots[pod] = Snapshot(
                workload=Workload(name=pod.name, namespace="demo"), services=tuple(services), inbound=inbound
            )
        snapshots[cl] = Snapshot(workload=Workload(name="client", namespace="demo"), services=tuple(services))
        mesh_pods(lab, snapshots)
        yield Mesh(lab, cl, sv, sv6)


def test_http_reaches_an_app_on_the_pod_ip_from_the_passthrough_source(mesh: Mesh) -> None:
    r = client(mesh.lab, mesh.client, "get", f"http://{WEB_VIP}:8080/pod/conn")
    assert r["status"] == 200 and r["json"]["name"] == "server", r
    assert r["json"]["peer"][0] == "127.0.0.6", r  # rule 1's source, not a loop through 15006


def test_grpc_reaches_an_app_on_the_pod_ip(mesh: Mesh) -> None:
    r = client(mesh.lab, mesh.client, "grpc", f"{GRPC_VIP}:50051")
    assert r["unary"] == "pong:ping" and r["trailer"] == "kept", r


def test_opaque_tcp_reaches_an_app_on_the_pod_ip(mesh: Mesh) -> None:
    r = client(mesh.lab, mesh.client, "tcp-echo-client", ECHO_VIP, "7000", str(64 * 1024))
    assert r == {"sent": 64 * 1024, "received": 64 * 1024, "equal": True}


def test_http_reaches_an_app_on_the_pod_ipv6_address_from_the_v6_passthrough_source(mesh: Mesh) -> None:
    if mesh.server6 is None:
        pytest.skip("the kernel has no IPv6")
    r = client(mesh.lab, mesh.client, "get", f"http://[{WEB6_VIP}]:8080/pod/conn")
    assert r["status"] == 200 and r["json"]["name"] == "server6", r
    assert r["json"]["peer"][0] == "::6", r
