"""Traces in a real Jaeger (v2, in-memory storage), read back through its query API: what a
user sees in the Jaeger UI.

  * ``test_chain_reads_back_from_jaeger``: three sidecars' telemetry (no data path) export to
    a Jaeger on loopback, on ports picked free for the test, once over OTLP/HTTP (the chart's
    default transport) and once over OTLP/gRPC.
  * ``test_sidecar_chain_in_jaeger``: the demo mesh (client -> frontend -> catalog ->
    inventory, real sidecars with interception) in the netns lab, every sidecar exporting to
    a Jaeger running in its own lab pod; the trace is read from inside that pod. The demo's
    snapshots export over OTLP/gRPC, so between the two tests both transports reach a real
    Jaeger.

Jaeger is built from its Go module by ``scripts/build-jaeger.sh`` (``make jaeger``, a
prerequisite of ``make test``; large, built once and cached in ``$MESHPROXY_CACHE``). Without
the cached binary the tests are skipped with that advice, and fail under CI.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from tel_chain import run_chain

from meshproxy.lab import demo
from meshproxy.lab.mesh import intercept, start_sidecar, wait_sidecar
from meshproxy.lab.netns import Lab, Pod, wait_until
from tests.support.require import missing, require_lab

pytestmark = [pytest.mark.slow]

JAEGER_VERSION = "v1.76.0"  # keep in step with scripts/build-jaeger.sh

CONFIG = """
service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: warn
extensions:
  jaeger_storage:
    backends:
      mem:
        memory:
          max_traces: 10000
  jaeger_query:
    storage:
      traces: mem
    http:
      endpoint: {host}:{query_port}
    grpc:
      endpoint: {host}:{query_grpc_port}
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: {host}:{otlp_port}
      http:
        endpoint: {host}:{otlp_http_port}
processors:
  batch:
    timeout: 100ms
exporters:
  jaeger_storage_exporter:
    trace_storage: mem
"""


def _binary() -> Path:
    cache = Path(os.environ.get("MESHPROXY_CACHE", Path.home() / ".cache" / "meshproxy"))
    return cache / "go" / "bin" / f"jaeger-{JAEGER_VERSION}"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Jaeger:
    otlp_grpc_endpoint: str  # http://host:port, as Tracing.otlp_grpc_endpoint takes it
    otlp_http_endpoint: str  # http://host:port/v1/traces, as Tracing.otlp_http_endpoint takes it
    query_url: str


def _require_binary() -> Path:
    binary = _binary()
    if not binary.exists():
        reason = f"no Jaeger binary at {binary}: `make jaeger` builds it (a large Go build, once)"
        missing(reason)
    return binary


def parent_links(trace: dict[str, Any]) -> dict[tuple[str, str], tuple[str, str | None, dict[str, Any]]]:
    """``(service, kind) -> (span id, CHILD_OF parent id, span)`` from a Jaeger API trace."""
    services = {p: v["serviceName"] for p, v in trace["processes"].items()}
    out = {}
    for s in trace["spans"]:
        tags = {t["key"]: t["value"] for t in s["tags"]}
        parent = next((r["spanID"] for r in s["references"] if r["refType"] == "CHILD_OF"), None)
        out[services[s["processID"]], tags["span.kind"]] = (s["spanID"], parent, {**s, "tagmap": tags})
    return out


@pytest.fixture
def jaeger(tmp_path: Path) -> Iterator[Jaeger]:
    binary = _require_binary()
    otlp_port, otlp_http_port, query_port, query_grpc_port = _free_ports(4)
    config = tmp_path / "jaeger.yaml"
    config.write_text(
        CONFIG.format(
            host="127.0.0.1",
            otlp_port=otlp_port,
            otlp_http_port=otlp_http_port,
            query_port=query_port,
            query_grpc_port=query_grpc_port,
        )
    )
    log = (tmp_path / "jaeger.log").open("w")
    proc = subprocess.Popen([str(binary), "--config", str(config)], stdout=log, stderr=subprocess.STDOUT)
    query_url = f"http://127.0.0.1:{query_port}"
    try:
        deadline = time.monotonic() + 30
        while True:  # poll until the query API answers (or Jaeger died)
            assert proc.poll() is None, (tmp_path / "jaeger.log").read_text()[-3000:]
            try:
                if httpx.get(f"{query_url}/api/services", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (
                "Jaeger did not start:\n" + (tmp_path / "jaeger.log").read_text()[-3000:]
            )
            time.sleep(0.1)
        yield Jaeger(
            otlp_grpc_endpoint=f"http://127.0.0.1:{otlp_port}",
            otlp_http_endpoint=f"http://127.0.0.1:{otlp_http_port}/v1/traces",
            query_url=query_url,
        )
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


async def _get_trace(client: httpx.AsyncClient, trace_id: str, spans: int) -> dict[str, Any]:
    """Poll the query API until the trace has ``spans`` spans (Jaeger batches before storing)."""
    last = ""
    try:
        async with asyncio.timeout(20):
            while True:
                r = await client.get(f"/api/traces/{trace_id}")
                last = f"{r.status_code} {r.text[:2000]}"
                if r.status_code == 200:
                    data = r.json()["data"]
                    if data and len(data[0]["spans"]) >= spans:
                        return dict(data[0])
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"trace {trace_id} incomplete in Jaeger: {last}") from None


@pytest.mark.parametrize("transport", ["otlp-http", "otlp-grpc"])
async def test_chain_reads_back_from_jaeger(jaeger: Jaeger, transport: str) -> None:
    if transport == "otlp-http":
        chain = await run_chain(otlp_http_endpoint=jaeger.otlp_http_endpoint)
    else:
        chain = await run_chain(otlp_grpc_endpoint=jaeger.otlp_grpc_endpoint)
    async with httpx.AsyncClient(base_url=jaeger.query_url, timeout=5) as client:
        links = parent_links(await _get_trace(client, chain.trace_id, 4))
        assert links["a", "client"][1] is None
        assert links["b", "server"][1] == links["a", "client"][0]
        assert links["b", "client"][1] == links["b", "server"][0]
        assert links["c", "server"][1] == links["b", "client"][0]
        assert links["a", "client"][2]["operationName"] == "GET b-default"
        # The service list of the Jaeger UI shows every sidecar.
        listed = (await client.get("/api/services")).json()["data"]
        assert {"a", "b", "c"} <= set(listed)


@pytest.fixture
def lab_with_jaeger() -> Iterator[tuple[Lab, Pod]]:
    binary = _require_binary()
    require_lab(iptables=True)
    # Lab() makes its own world-readable workdir: the sidecars run as the proxy UID.
    with Lab() as lab:
        pod = lab.add_pod("jaeger")
        config = lab.logdir / "jaeger.yaml"
        config.write_text(
            CONFIG.format(
                host="0.0.0.0", otlp_port=4317, otlp_http_port=4318, query_port=16686, query_grpc_port=16685
            )
        )
        proc = lab.spawn(pod, [str(binary), "--config", str(config)], name="jaeger")
        lab.wait_listening(pod, 4317, timeout=30, proc=proc)
        lab.wait_listening(pod, 16686, timeout=30, proc=proc)
        yield lab, pod


def _query_in_pod(lab: Lab, pod: Pod, path: str) -> Any:
    script = (
        "import sys,urllib.request;"
        f"sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:16686{path}', timeout=5).read().decode())"
    )
    done = lab.exec(pod, [sys.executable, "-c", script], check=False)
    return json.loads(done.stdout) if done.returncode == 0 else None


@pytest.mark.netns
def test_sidecar_chain_in_jaeger(lab_with_jaeger: tuple[Lab, Pod]) -> None:
    if importlib.util.find_spec("meshproxy.io.app") is None:
        pytest.skip("the sidecar (meshproxy.io.app) has not landed yet")
    lab, jaeger_pod = lab_with_jaeger
    pods = {spec.name: lab.add_pod(spec.name, hosts=demo.hosts_file()) for spec in demo.PODS}
    snapshots = demo.build_snapshots({n: p.ip for n, p in pods.items()}, f"http://{jaeger_pod.ip}:4317")
    started = []
    for spec in demo.PODS:
        pod = pods[spec.name]
        app = None
        if spec.module:
            argv = [sys.executable, "-m", spec.module]
            app = lab.spawn(pod, argv, name="app", uid=demo.APP_UID, env=spec.env)
        intercept(lab, pod)
        started.append((pod, app, start_sidecar(lab, pod, snapshots[spec.name], wait=False)))
    for pod, app, sidecar in started:
        if app is not None:
            lab.wait_listening(pod, demo.APP_PORT, timeout=20, proc=app)
        wait_sidecar(lab, sidecar)
    mesh = demo.Demo(lab, pods=pods)
    mesh.warm_up()
    result = mesh.load(2, 1)
    assert result["status"] == {"200": 2}, result
    trace_id = result["trace_ids"][-1]

    def trace() -> dict[str, Any] | None:
        body = _query_in_pod(lab, jaeger_pod, f"/api/traces/{trace_id}")
        data = body["data"] if body else None
        return dict(data[0]) if data and len(data[0]["spans"]) >= 6 else None

    wait_until(lambda: trace() is not None, 30, f"6 spans of trace {trace_id} in Jaeger", 0.3)
    links = parent_links(trace() or {})
    inventory = next(k for k in links if k[0].startswith("inventory-") and k[1] == "server")
    assert links["frontend", "server"][1] == links["client", "client"][0]
    assert links["frontend", "client"][1] == links["frontend", "server"][0]
    assert links["catalog", "server"][1] == links["frontend", "client"][0]
    assert links["catalog", "client"][1] == links["catalog", "server"][0]
    assert links[inventory][1] == links["catalog", "client"][0]
    catalog_client = links["catalog", "client"][2]
    assert catalog_client["operationName"] == "GET split"
    assert catalog_client["tagmap"]["mesh.backend"] == f"{inventory[0]}.demo:8080"
    services = _query_in_pod(lab, jaeger_pod, "/api/services")["data"]
    assert {"client", "frontend", "catalog", inventory[0]} <= set(services)
