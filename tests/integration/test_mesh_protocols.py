"""What an unmodified app sees through two real sidecars: HTTP/1.1, streaming, WebSocket, gRPC, TCP.

Topology (one lab for the module): pod ``client`` runs the callers, pod ``server`` runs the
apps (HTTP on 8080, gRPC on 50051, a TCP echo on 7000, a server-first "SMTP" on 2525). Both
pods get ``meshproxy iptables install`` and a ``meshproxy run`` sidecar as the proxy UID; the
callers only know service VIPs, so every connection goes app -> client sidecar (15001) ->
server sidecar (15006) -> app on the server pod's loopback. Where the kernel has IPv6, the
HTTP app is also reached by an IPv6 VIP and endpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from mesh_rig import client, mesh_lab, mesh_pods, metric, spawn_app, status_kib

from meshproxy.config.model import Endpoint, Inbound, InboundPort, Protocol, Service, Snapshot, Workload
from meshproxy.lab.mesh import admin_get
from meshproxy.lab.netns import Lab, Pod

pytestmark = [pytest.mark.netns, pytest.mark.slow]

WEB_VIP, GRPC_VIP, ECHO_VIP, SMTP_VIP = "198.19.0.10", "198.19.0.11", "198.19.0.12", "198.19.0.13"
WEB = f"http://{WEB_VIP}"
WEB6_VIP = "2001:2:0:1::10"
BIG = 200 * 1024 * 1024
RSS_GROWTH_LIMIT_KIB = 8 * 1024  # "a few MB" (issue 2); measured well under 1 MiB here


@dataclass
class Mesh:
    lab: Lab
    client: Pod
    server: Pod
    sidecars: dict[str, Any]

    def run(self, command: str, *args: str, timeout: float = 60.0) -> Any:
        return client(self.lab, self.client, command, *args, timeout=timeout)

    def bytes_through_client_sidecar(self) -> float:
        text = admin_get(self.lab, self.client, "/metrics")
        labels = {"reporter": "source", "destination_service": "web.demo"}
        return metric(text, "meshproxy_request_bytes_total", **labels) + metric(
            text, "meshproxy_response_bytes_total", **labels
        )


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    with mesh_lab() as lab:
        cl, sv = lab.add_pod("client"), lab.add_pod("server")
        spawn_app(lab, sv, "http-app", "--name", "server", "--port", "8080", port=8080)
        spawn_app(lab, sv, "grpc-app", "--port", "50051", port=50051)
        spawn_app(lab, sv, "tcp-echo", "--port", "7000", port=7000)
        spawn_app(lab, sv, "smtp-like", "--port", "2525", port=2525)

        def svc(name: str, vip: str, port: int, target: int, protocol: Protocol) -> Service:
            return Service(
                name=name,
                namespace="demo",
                port=port,
                protocol=protocol,
                vips=(vip,),
                endpoints=(Endpoint(sv.ip, target, pod="server-0", workload="server"),),
            )

        services: tuple[Service, ...] = (
            svc("web", WEB_VIP, 80, 8080, Protocol.AUTO),
            svc("grpc", GRPC_VIP, 50051, 50051, Protocol.HTTP2),
            svc("echo", ECHO_VIP, 7000, 7000, Protocol.TCP),
            svc("smtp", SMTP_VIP, 2525, 2525, Protocol.AUTO),  # sniffed: detection must give up
        )
        if sv.ip6:  # the same app by an IPv6 VIP and endpoint (ip6tables rules, IP6T_SO_ORIGINAL_DST)
            v6 = Endpoint(sv.ip6, 8080, pod="server-0", workload="server")
            services += (Service("web6", "demo", 80, vips=(WEB6_VIP,), endpoints=(v6,)),)
        inbound = Inbound(
            ports=(
                InboundPort(8080, service="web"),
                InboundPort(50051, Protocol.HTTP2, service="grpc"),
            ),
            opaque_ports=frozenset({7000}),
        )
        sidecars = mesh_pods(
            lab,
            {
                cl: Snapshot(workload=Workload(name="client", namespace="demo"), services=services),
                sv: Snapshot(
                    workload=Workload(name="server", namespace="demo"), services=services, inbound=inbound
                ),
            },
        )
        yield Mesh(lab, cl, sv, sidecars)


def test_keep_alive_reuses_the_client_connection_and_the_upstream_one(mesh: Mesh) -> None:
    r = mesh.run("keepalive", f"{WEB}/ka/conn", "-n", "6")
    # The app's one client connection carried all six requests (http.client reconnects
    # silently when the server closes, which would show as a new local port).
    assert len(set(r["local_ports"])) == 1, r
    # The server app saw them on one connection from its sidecar, request after request.
    peers = {tuple(reply["peer"]) for reply in r["replies"]}
    assert len(peers) == 1 and next(iter(peers))[0] == "127.0.0.1", r
    counts = [reply["n"] for reply in r["replies"]]
    assert counts == list(range(counts[0], counts[0] + 6)), counts
    # And the hop between the sidecars: one pooled connection into the server's 15006 from
    # the client pod (this is the module's first test; nothing else has connected yet).
    established = mesh.lab.exec(mesh.server, ["ss", "-Htn", "state", "established", "sport = :15006"])
    remotes = [line.split()[-1] for line in established.stdout.splitlines()]
    # (the listener is dual-stack, so IPv4 peers show as [::ffff:a.b.c.d]:port)
    hosts = [p.rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:") for p in remotes]
    assert hosts == [mesh.client.ip], remotes


def test_http_over_ipv6_through_both_sidecars(mesh: Mesh) -> None:
    if not mesh.server.ip6:
        pytest.skip("the kernel has no IPv6")
    r = mesh.run("get", f"http://[{WEB6_VIP}]/v6/hello")
    assert r["status"] == 200 and r["json"]["name"] == "server", r
    text = admin_get(mesh.lab, mesh.client, "/metrics")
    assert metric(text, "meshproxy_requests_total", reporter="source", destination_service="web6.demo") == 1


def test_chunked_response_streams_to_the_client_before_it_ends(mesh: Mesh) -> None:
    # The app sends "first", then waits for a second request that the client makes only after
    # reading "first": if either sidecar held the response back, this would time out.
    r = mesh.run("stream-down", WEB, "down-1", timeout=60)
    assert r["status"] == 200 and r["chunked"] == "chunked"
    assert r["first"] == "first\n"
    assert r["release_status"] == 200
    assert r["rest"] == "rest\n"


def test_chunked_request_body_streams_to_the_app_before_it_ends(mesh: Mesh) -> None:
    r = mesh.run("stream-up", WEB, "up-1", timeout=60)
    assert r["seen_before_rest"] == 1, r  # the app had the first chunk while the body was open
    assert r["status"] == 200
    assert r["json"]["bytes"] == len(b"first\nrest\n")


def test_websocket_upgrade_echo(mesh: Mesh) -> None:
    r = mesh.run("websocket", f"{WEB}/ws/chat", "hello", "mesh", "ünïcode")
    assert r["status_line"].startswith("HTTP/1.1 101"), r
    assert r["accept_ok"]
    assert r["echoes"] == ["hello", "mesh", "ünïcode"]
    assert r["big_ok"]  # a 200 kB binary frame both ways
    assert r["close_opcode"] == 8


def test_grpc_unary_and_server_streaming_with_grpcio(mesh: Mesh) -> None:
    r = mesh.run("grpc", f"{GRPC_VIP}:50051")
    assert r["unary"] == "pong:ping"
    assert r["trailer"] == "kept"  # the app's trailers survive both hops
    assert r["stream"] == [str(i) for i in range(300)]
    # A server-stream message reached the client while the call was still open.
    assert r["gate"] == ["first", "rest"]
    assert r["fail"] == ["PERMISSION_DENIED", "not for you"]


def test_raw_tcp_echo_on_an_opaque_port(mesh: Mesh) -> None:
    r = mesh.run("tcp-echo-client", ECHO_VIP, "7000", str(1 << 20))
    assert r == {"sent": 1 << 20, "received": 1 << 20, "equal": True}


def test_server_first_protocol_does_not_stall(mesh: Mesh) -> None:
    # The client sends nothing until it got the greeting; both sidecars sniff this port, so
    # each must give up detection and relay bytes (the client's socket timeout is 10 s).
    r = mesh.run("server-first", SMTP_VIP, "2525")
    assert r == {"greeting": "220 mesh-smtp ready", "reply": "250 HELO client", "bye": "221 bye"}


def test_200_mb_upload_and_download_with_bounded_sidecar_memory(mesh: Mesh) -> None:
    pids = [proc.pid for proc in mesh.sidecars.values()]
    before = [status_kib(pid, "VmRSS") for pid in pids]
    bytes_before = mesh.bytes_through_client_sidecar()
    up = mesh.run("upload", f"{WEB}/big/upload", str(BIG), timeout=180)
    assert up["status"] == 200
    assert up["json"]["bytes"] == BIG and up["json"]["sha256"] == up["sha256"]
    down = mesh.run("download", f"{WEB}/big/download?size={BIG}", timeout=180)
    assert down == {"status": 200, "bytes": BIG, "intact": True}
    # VmHWM is the peak RSS over the process's life: it covers the whole transfer.
    growth = [status_kib(pid, "VmHWM") - b for pid, b in zip(pids, before, strict=True)]
    assert all(g < RSS_GROWTH_LIMIT_KIB for g in growth), f"sidecar RSS growth KiB: {growth}"
    # And the bodies really went through the client's sidecar (both directions counted).
    assert mesh.bytes_through_client_sidecar() - bytes_before >= 2 * BIG
