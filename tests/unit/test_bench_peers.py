"""The peer benchmark's proxy configs (bench/peers.py): what each sidecar is told to do.

The configs are checked by the tools that will read them (``haproxy -c``, ``nginx -t``; make
test installs them, and under CI a missing one fails the test instead of skipping it), by
meshproxy's own config loader, and structurally (Traefik's YAML), so a broken config fails
here rather than half-way through a 25-minute benchmark.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from bench import peers
from meshproxy.config.load import load_dict
from meshproxy.config.model import Protocol
from tests.support.require import missing

SERVER = "198.18.0.3"


def require(what: str, present: bool) -> None:
    """Skip without ``what`` (a Debian package of ``system-deps.sh --bench``); fail under CI."""
    if not present:
        reason = f"{what} not installed (scripts/system-deps.sh --bench; make test installs it)"
        missing(reason)


def test_meshproxy_configs_declare_each_workload_with_its_protocol() -> None:
    client_yaml, server_yaml = peers.meshproxy_configs(SERVER, peers.meshproxy_telemetry(True, "198.18.0.4"))
    client = load_dict(yaml.safe_load(client_yaml))
    server = load_dict(yaml.safe_load(server_yaml))
    by_port = {s.port: s for s in client.services}
    assert by_port[8080].protocol is Protocol.HTTP1
    assert by_port[8079].protocol is Protocol.HTTP2
    assert by_port[5201].protocol is Protocol.TCP
    for service in client.services:
        assert service.vips == (SERVER,)
        assert [(e.address, e.port) for e in service.endpoints] == [(SERVER, service.port)]
    assert server.inbound.opaque_ports == frozenset({5201})
    assert {p.port: p.protocol for p in server.inbound.ports} == {
        8080: Protocol.HTTP1,
        8079: Protocol.HTTP2,
        5201: Protocol.TCP,
    }
    assert client.version and client.version != server.version


def test_the_floor_scenario_declares_every_port_opaque_so_no_http_is_read() -> None:
    client_yaml, server_yaml = peers.meshproxy_configs(
        SERVER, peers.meshproxy_telemetry(False, "198.18.0.4"), opaque=True
    )
    client = load_dict(yaml.safe_load(client_yaml))
    server = load_dict(yaml.safe_load(server_yaml))
    assert {s.port: s.protocol for s in client.services} == dict.fromkeys((8080, 8079, 5201), Protocol.TCP)
    assert {p.port: p.protocol for p in server.inbound.ports} == dict.fromkeys(
        (8080, 8079, 5201), Protocol.TCP
    )
    assert server.inbound.opaque_ports == frozenset({8080, 8079, 5201})


def test_meshproxy_telemetry_on_and_off() -> None:
    on = peers.meshproxy_telemetry(True, "198.18.0.4")
    off = peers.meshproxy_telemetry(False, "198.18.0.4")
    assert on.metrics and on.tracing.sampling_ratio == 1.0
    # Spans go over OTLP/HTTP (the chart's default transport) to the sink's traces path, and
    # nowhere else: bench.spancount answers only POST /v1/traces on its --http-port.
    assert on.tracing.otlp_http_endpoint == f"http://198.18.0.4:{peers.OTLP_HTTP_PORT}/v1/traces"
    assert on.tracing.otlp_grpc_endpoint is None and on.tracing.zipkin_endpoint is None
    assert not off.metrics and off.tracing.sampling_ratio == 0.0
    assert off.tracing.otlp_http_endpoint is None and off.tracing.otlp_grpc_endpoint is None
    # Telemetry must survive the YAML round trip, or "telemetry off" would silently be on,
    # or "on" would export nowhere.
    for telemetry in (on, off):
        _, server_yaml = peers.meshproxy_configs(SERVER, telemetry)
        assert load_dict(yaml.safe_load(server_yaml)).telemetry == telemetry


@pytest.mark.parametrize("workload", peers.WORKLOADS, ids=lambda w: w.kind.value)
def test_haproxy_conf_two_listeners_and_mode(workload: peers.Workload) -> None:
    conf = peers.haproxy_conf(workload, SERVER)
    assert f"bind :{peers.OUTBOUND_PORT}" in conf and f"bind :{peers.INBOUND_PORT}" in conf
    assert f"server up {SERVER}:{workload.port}" in conf
    assert f"server up 127.0.0.1:{workload.port}" in conf
    if workload.kind is peers.Kind.TCP:
        assert "mode tcp" in conf and "http-reuse" not in conf
    else:
        assert "mode http" in conf and "http-reuse always" in conf
    assert ("proto h2" in conf) == (workload.kind is peers.Kind.GRPC)


@pytest.mark.parametrize("workload", peers.WORKLOADS, ids=lambda w: w.kind.value)
def test_haproxy_accepts_the_conf(workload: peers.Workload, tmp_path: Path) -> None:
    require("haproxy", shutil.which("haproxy") is not None)
    path = tmp_path / "haproxy.cfg"
    path.write_text(peers.haproxy_conf(workload, SERVER))
    done = subprocess.run(["haproxy", "-c", "-f", str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("workload", peers.WORKLOADS, ids=lambda w: w.kind.value)
def test_nginx_conf_upstreams(workload: peers.Workload, tmp_path: Path) -> None:
    conf = peers.nginx_conf(workload, SERVER, str(tmp_path))
    assert f"server {SERVER}:{workload.port}" in conf and f"server 127.0.0.1:{workload.port}" in conf
    if workload.kind is peers.Kind.TCP:
        assert "stream {" in conf and "ngx_stream_module" in conf
    else:
        assert "keepalive 64" in conf
        assert ("grpc_pass" in conf) == (workload.kind is peers.Kind.GRPC)


@pytest.mark.parametrize("workload", peers.WORKLOADS, ids=lambda w: w.kind.value)
def test_nginx_accepts_the_conf(workload: peers.Workload, tmp_path: Path) -> None:
    require("nginx-light", shutil.which("nginx") is not None)
    if workload.kind is peers.Kind.TCP:
        require("libnginx-mod-stream", Path("/usr/lib/nginx/modules/ngx_stream_module.so").exists())
    path = tmp_path / "nginx.conf"
    path.write_text(peers.nginx_conf(workload, SERVER, str(tmp_path)))
    done = subprocess.run(["nginx", "-t", "-c", str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_traefik_static_has_the_mesh_entrypoints_and_file_provider() -> None:
    static = yaml.safe_load(peers.traefik_static("/tmp/dyn.yml"))
    assert static["entryPoints"] == {"outbound": {"address": ":15001"}, "inbound": {"address": ":15006"}}
    assert static["providers"]["file"]["filename"] == "/tmp/dyn.yml"
    assert static["global"]["sendAnonymousUsage"] is False


@pytest.mark.parametrize(
    ("workload", "scheme"), [(peers.HTTP, "http"), (peers.GRPC, "h2c")], ids=["http", "grpc"]
)
def test_traefik_dynamic_http(workload: peers.Workload, scheme: str) -> None:
    dyn = yaml.safe_load(peers.traefik_dynamic(workload, SERVER))["http"]
    assert dyn["routers"]["outbound"]["entryPoints"] == ["outbound"]
    assert dyn["routers"]["inbound"]["entryPoints"] == ["inbound"]
    urls = {name: svc["loadBalancer"]["servers"][0]["url"] for name, svc in dyn["services"].items()}
    assert urls == {
        "outbound": f"{scheme}://{SERVER}:{workload.port}",
        "inbound": f"{scheme}://127.0.0.1:{workload.port}",
    }


def test_traefik_dynamic_tcp_is_a_catch_all_relay() -> None:
    dyn = yaml.safe_load(peers.traefik_dynamic(peers.TCP, SERVER))
    assert "http" not in dyn
    routers = dyn["tcp"]["routers"]
    assert {r["rule"] for r in routers.values()} == {"HostSNI(`*`)"}
    addresses = {n: s["loadBalancer"]["servers"][0]["address"] for n, s in dyn["tcp"]["services"].items()}
    assert addresses == {"outbound": f"{SERVER}:5201", "inbound": "127.0.0.1:5201"}
