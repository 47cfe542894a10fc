"""``meshproxy run`` as a real process on loopback: config errors, readiness, bounded memory, drain."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from dp_rig import Upstream, wait_for

from meshproxy.lab.otlp_receiver import OtlpReceiver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    outbound: int
    admin: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.outbound}"


CONFIG = """
workload: {name: client, namespace: demo}
services: []
"""


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream() as u:
        yield u


@contextlib.asynccontextmanager
async def _running(tmp_path: Path, upstream: Upstream, config: str) -> AsyncIterator[Proc]:
    """``meshproxy run`` on ``config``, sending outbound requests to ``upstream``; once ready."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text(config)
    outbound, inbound, admin = _free_port(), _free_port(), _free_port()
    log = tmp_path / "proxy.log"
    argv = [
        sys.executable, "-m", "meshproxy", "run", "--config", str(cfg),
        "--listen-host", "127.0.0.1", "--outbound-port", str(outbound), "--inbound-port", str(inbound),
        "--admin-port", str(admin), "--destination-override", f"127.0.0.1:{upstream.port}",
        "--drain-seconds", "5",
    ]  # fmt: skip
    popen = _spawn(argv, log)
    proc = Proc(popen, outbound, admin, log)
    try:
        async with httpx.AsyncClient() as c:
            deadline = time.monotonic() + 20
            while True:
                assert popen.poll() is None, log.read_text()
                try:
                    if (await c.get(f"http://127.0.0.1:{admin}/ready")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "proxy never became ready"
                await asyncio.sleep(0.05)
        yield proc
    finally:
        if popen.poll() is None:
            popen.terminate()
            try:
                popen.wait(10)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()


@pytest.fixture
async def proxy_proc(tmp_path: Path, upstream: Upstream) -> AsyncIterator[Proc]:
    async with _running(tmp_path, upstream, CONFIG) as proc:
        yield proc


def test_bad_config_exits_2_naming_the_field(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("services:\n  - {name: web, namespace: demo, port: 70000}\n")
    port = _free_port()
    r = subprocess.run(
        [sys.executable, "-m", "meshproxy", "run", "--config", str(cfg), "--outbound-port", str(port)],
        capture_output=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert b"services[0].port" in r.stderr
    # Nothing was started: the port is still free.
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


@pytest.mark.slow
async def test_one_gigabyte_upload_keeps_proxy_rss_flat(proxy_proc: Proc) -> None:
    pid = proxy_proc.popen.pid
    total = 1 << 30
    block = b"z" * (1 << 16)
    async with httpx.AsyncClient(timeout=120) as client:
        # Warm up once so lazily imported modules and pools are counted in the baseline.
        assert (await client.post(f"{proxy_proc.url}/sink", content=b"warm")).status_code == 200
        baseline = _rss_kib(pid)
        peak = baseline

        async def body() -> AsyncIterator[bytes]:
            nonlocal peak
            for i in range(total // len(block)):
                if i % 256 == 0:  # every 16 MiB
                    peak = max(peak, _rss_kib(pid))
                yield block

        r = await client.post(
            f"{proxy_proc.url}/sink", content=body(), headers={"content-length": str(total)}
        )
        peak = max(peak, _rss_kib(pid))
    assert r.status_code == 200
    assert int(r.text) == total
    growth_mib = (peak - baseline) / 1024
    assert growth_mib < 16, f"proxy RSS grew by {growth_mib:.1f} MiB during a 1 GiB upload"


async def test_sigterm_drains_in_flight_requests_then_exits_0(proxy_proc: Proc, upstream: Upstream) -> None:
    async with httpx.AsyncClient(timeout=20) as client:
        in_flight = asyncio.create_task(client.get(f"{proxy_proc.url}/slow"))
        await wait_for(lambda: upstream.server.requests == 1, within=10)
        os.kill(proxy_proc.popen.pid, signal.SIGTERM)

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", proxy_proc.outbound), timeout=0.5).close()
            except OSError:
                return True
            return False

        await wait_for(refused, within=10)  # no longer accepting
        assert not in_flight.done()
        upstream.server.release.set()
        r = await in_flight
        assert r.status_code == 200
        assert r.text == "slow\n"
    rc = await asyncio.to_thread(proxy_proc.popen.wait, 10)
    assert rc == 0, proxy_proc.log.read_text()


async def test_exporting_spans_over_otlp_http_never_loads_protobuf(
    tmp_path: Path, upstream: Upstream
) -> None:
    # The span encoder writes OTLP itself and the OTLP/HTTP client reads a collector's
    # (empty) success answers without protobuf: a sidecar on a static config keeps the ~3 MB
    # the protobuf runtime and the generated OTLP modules would add to its RSS.
    async with OtlpReceiver("127.0.0.1", 0) as receiver:
        config = CONFIG + (f"telemetry:\n  tracing: {{otlp_http_endpoint: '{receiver.http_endpoint}'}}\n")
        async with _running(tmp_path, upstream, config) as proc, httpx.AsyncClient(timeout=10) as client:
            for _ in range(3):
                assert (await client.get(f"{proc.url}/hello")).status_code == 200
            spans = await receiver.wait_for(lambda s: len(s) >= 3)
            assert {s.service for s in spans} == {"client"}
            maps = Path(f"/proc/{proc.popen.pid}/maps").read_text()
    assert "httptools" in maps  # extension modules the sidecar loaded are there to be seen
    assert "protobuf" not in maps and "_upb" not in maps, "the sidecar loaded the protobuf runtime"
