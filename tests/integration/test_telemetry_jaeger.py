"""The same A -> B -> C trace, exported to a real Jaeger (v2, in-memory storage) and read back
through Jaeger's query API: what a user sees in the Jaeger UI.

Jaeger is built from its Go module by ``scripts/build-jaeger.sh`` (large; run it once, it is
cached in ``$MESHPROXY_CACHE``). Without the cached binary the test is skipped with that advice.
Jaeger listens on loopback only, on ports picked free for this test.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from tel_chain import run_chain

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
      endpoint: 127.0.0.1:{query_port}
    grpc:
      endpoint: 127.0.0.1:{query_grpc_port}
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{otlp_port}
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
    otlp_endpoint: str
    query_url: str


@pytest.fixture
def jaeger(tmp_path: Path) -> Iterator[Jaeger]:
    binary = _binary()
    if not binary.exists():
        pytest.skip(f"no Jaeger binary at {binary}: run scripts/build-jaeger.sh once (a large Go build)")
    otlp_port, query_port, query_grpc_port = _free_ports(3)
    config = tmp_path / "jaeger.yaml"
    config.write_text(
        CONFIG.format(otlp_port=otlp_port, query_port=query_port, query_grpc_port=query_grpc_port)
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
        yield Jaeger(f"http://127.0.0.1:{otlp_port}", query_url)
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


async def test_chain_reads_back_from_jaeger(jaeger: Jaeger) -> None:
    chain = await run_chain(jaeger.otlp_endpoint)
    async with httpx.AsyncClient(base_url=jaeger.query_url, timeout=5) as client:
        trace = await _get_trace(client, chain.trace_id, 4)
        services = {p: v["serviceName"] for p, v in trace["processes"].items()}
        by = {}
        for s in trace["spans"]:
            tags = {t["key"]: t["value"] for t in s["tags"]}
            by[services[s["processID"]], tags["span.kind"]] = s
        parent = {
            key: next((r["spanID"] for r in s["references"] if r["refType"] == "CHILD_OF"), None)
            for key, s in by.items()
        }
        assert parent["a", "client"] is None
        assert parent["b", "server"] == by["a", "client"]["spanID"]
        assert parent["b", "client"] == by["b", "server"]["spanID"]
        assert parent["c", "server"] == by["b", "client"]["spanID"]
        assert by["a", "client"]["operationName"] == "GET b-default"
        # The service list of the Jaeger UI shows every sidecar.
        listed = (await client.get("/api/services")).json()["data"]
        assert {"a", "b", "c"} <= set(listed)
