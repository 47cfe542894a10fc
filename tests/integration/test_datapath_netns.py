"""The sidecar's data path for real: two lab pods, iptables interception, SO_ORIGINAL_DST.

client pod: app (root) -> [nat OUTPUT REDIRECT] -> sidecar :15001 -> service VIP routed to the
server pod's IP -> [server's nat PREROUTING REDIRECT] -> sidecar :15006 -> app on 127.0.0.1.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import pytest

from meshproxy.config.model import Endpoint, Inbound, InboundPort, Service, Snapshot, Workload
from meshproxy.lab.mesh import admin_get, intercept, start_sidecar
from meshproxy.lab.netns import Lab, Pod

pytestmark = [pytest.mark.netns, pytest.mark.usefixtures("iptables_available")]

VIP = "198.19.0.10"
APP_PORT = 8080
PROBE_PORT = 9090  # a server-first TCP app: the probe answers as soon as a connection arrives


@dataclass
class Mesh:
    lab: Lab
    client: Pod
    server: Pod

    def fetch(self, url: str, headers: dict[str, str] | None = None) -> dict[str, object]:
        code = (
            "import json, sys, urllib.request, urllib.error\n"
            f"req = urllib.request.Request({url!r}, headers={headers or {}!r})\n"
            "try:\n"
            "    r = urllib.request.urlopen(req, timeout=10)\n"
            "except urllib.error.HTTPError as e:\n"
            "    r = e\n"
            "print(json.dumps({'status': r.status, 'headers': dict(r.headers), 'body': r.read().decode()}))\n"
        )
        done = self.lab.exec(self.client, [sys.executable, "-c", code], check=False)
        assert done.returncode == 0, done.stderr
        result: dict[str, object] = json.loads(done.stdout)
        return result


@pytest.fixture
def mesh(lab: Lab) -> Mesh:
    client, server = lab.add_pod("client"), lab.add_pod("server")
    docroot = lab.logdir / "www"
    docroot.mkdir(parents=True, exist_ok=True)
    (docroot / "hello.txt").write_text("hello from the server pod\n")
    app = lab.spawn(
        server,
        [
            sys.executable,
            "-m",
            "http.server",
            str(APP_PORT),
            "--bind",
            "0.0.0.0",
            "--directory",
            str(docroot),
        ],
        name="app",
    )
    probe = lab.spawn(
        server,
        [sys.executable, "-m", "meshproxy.lab.probe", "serve", "--name", "server-app", str(PROBE_PORT)],
        name="probe",
    )
    lab.wait_listening(server, APP_PORT, proc=app)
    lab.wait_listening(server, PROBE_PORT, proc=probe)

    web = Service(
        name="web",
        namespace="demo",
        port=80,
        vips=(VIP,),
        endpoints=(Endpoint(address=server.ip, port=APP_PORT, pod="server-0"),),
    )
    client_snap = Snapshot(workload=Workload(name="client", namespace="demo"), services=(web,))
    server_snap = Snapshot(
        workload=Workload(name="server", namespace="demo"),
        services=(web,),
        inbound=Inbound(ports=(InboundPort(port=APP_PORT, service="web"),)),
    )
    for pod, snap in ((client, client_snap), (server, server_snap)):
        intercept(lab, pod)
        start_sidecar(lab, pod, snap.with_version())
    return Mesh(lab, client, server)


def test_http_through_both_sidecars_by_service_vip(mesh: Mesh) -> None:
    r = mesh.fetch(f"http://{VIP}/hello.txt")
    assert r["status"] == 200
    assert r["body"] == "hello from the server pod\n"
    # Both hops reported the request: the client's as source, the server's as destination.
    client_metrics = admin_get(mesh.lab, mesh.client, "/metrics")
    server_metrics = admin_get(mesh.lab, mesh.server, "/metrics")
    assert 'reporter="source"' in client_metrics and 'destination_service="web.demo"' in client_metrics
    assert 'reporter="destination"' in server_metrics and 'source_workload="client"' in server_metrics


def test_unknown_route_on_a_known_vip_port_and_passthrough(mesh: Mesh) -> None:
    # The VIP on a port no service declares: not a known service, so passthrough to the VIP,
    # which nothing answers (no route out of the lab): the sidecar replies 503 UF.
    r = mesh.fetch(f"http://{VIP}:81/hello.txt")
    assert r["status"] == 503
    headers = {k.lower(): v for k, v in dict(r["headers"]).items()}  # type: ignore[call-overload]
    assert headers["x-meshproxy-flag"] == "UF"
    # The server pod's IP directly (no service): passthrough by original destination, then inbound.
    r = mesh.fetch(f"http://{mesh.server.ip}:{APP_PORT}/hello.txt")
    assert r["status"] == 200


def test_server_first_tcp_through_both_sidecars(mesh: Mesh) -> None:
    done = mesh.lab.exec(
        mesh.client,
        [
            sys.executable,
            "-m",
            "meshproxy.lab.probe",
            "connect",
            mesh.server.ip,
            str(PROBE_PORT),
            "--timeout",
            "5",
        ],
        check=False,
    )
    reply = json.loads(done.stdout)
    assert "error" not in reply, reply
    # The probe (the real app) answered, on its own port, reached over loopback from the
    # server's sidecar: the connection went client sidecar -> server sidecar -> app.
    assert reply["name"] == "server-app"
    assert reply["listener"] == PROBE_PORT
    assert reply["peer"][0] == "127.0.0.1"
