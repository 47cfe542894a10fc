"""``meshproxy run --control-plane``: snapshots streamed over real gRPC on loopback, ACK/NACK, cache.

The control plane here is a small scripted servicer (the real one is tested by its own
suite): it sends the snapshots a test gives it and records the proxy's answers.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import httpx
import pytest
from dp_rig import VIP, Upstream, service, snapshot

from controlplane.convert import response, snapshot_to_proto
from meshapi.discovery.v1 import discovery_pb2_grpc
from meshproxy.config.model import Snapshot


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ScriptedControlPlane(discovery_pb2_grpc.ConfigDiscoveryServicer):
    outbox: asyncio.Queue[Snapshot] = field(default_factory=asyncio.Queue)
    answers: list[tuple[str, str, str]] = field(default_factory=list)  # (version, nonce, error)
    nodes: list[Any] = field(default_factory=list)
    answered: asyncio.Event = field(default_factory=asyncio.Event)

    async def StreamConfig(self, request_iterator: Any, context: Any) -> None:
        first = await context.read()
        self.nodes.append(first.node)
        nonce = 0
        while True:
            snap = await self.outbox.get()
            nonce += 1
            await context.write(response(snapshot_to_proto(snap), snap.version, str(nonce)))
            ack = await context.read()
            if ack is grpc.aio.EOF:  # type: ignore[attr-defined]
                return
            self.answers.append((ack.version_info, ack.response_nonce, ack.error_detail.message))
            self.answered.set()


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream() as u:
        yield u


@pytest.fixture
async def control_plane() -> AsyncIterator[tuple[ScriptedControlPlane, int]]:
    cp = ScriptedControlPlane()
    server = grpc.aio.server()
    discovery_pb2_grpc.add_ConfigDiscoveryServicer_to_server(cp, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield cp, port
    finally:
        await server.stop(0)


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    outbound: int
    admin: int

    def stop(self) -> int:
        self.popen.terminate()
        try:
            return self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()


def start(cp_port: int, cache: Path, log: Path) -> Proc:
    outbound, inbound, admin = _free_port(), _free_port(), _free_port()
    argv = [
        sys.executable, "-m", "meshproxy", "run", "--control-plane", f"127.0.0.1:{cp_port}",
        "--pod-name", "client-0", "--pod-namespace", "demo", "--config-cache", str(cache),
        "--listen-host", "127.0.0.1", "--outbound-port", str(outbound), "--inbound-port", str(inbound),
        "--admin-port", str(admin), "--destination-override", f"{VIP}:80",
    ]  # fmt: skip
    return Proc(_spawn(argv, log), outbound, admin)


async def admin_status(proc: Proc, within: float = 20.0) -> int:
    """The status of /ready as soon as the admin server answers at all."""
    deadline = time.monotonic() + within
    async with httpx.AsyncClient() as c:
        while True:
            assert proc.popen.poll() is None, "sidecar exited"
            try:
                return (await c.get(f"http://127.0.0.1:{proc.admin}/ready")).status_code
            except httpx.TransportError:
                assert time.monotonic() < deadline, "admin server never answered"
                await asyncio.sleep(0.05)


async def ready(proc: Proc, within: float = 20.0) -> bool:
    deadline = time.monotonic() + within
    async with httpx.AsyncClient() as c:
        while time.monotonic() < deadline:
            assert proc.popen.poll() is None, "sidecar exited"
            try:
                if (await c.get(f"http://127.0.0.1:{proc.admin}/ready")).status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
    return False


async def test_snapshots_from_the_control_plane_are_applied_acked_nacked_and_cached(
    tmp_path: Path, upstream: Upstream, control_plane: tuple[ScriptedControlPlane, int]
) -> None:
    cp, cp_port = control_plane
    cache = tmp_path / "cache.json"
    proc = start(cp_port, cache, tmp_path / "first.log")
    try:
        good = snapshot(service(upstream.port))
        # Up, but not ready before the first config.
        assert await admin_status(proc) == 503
        await cp.outbox.put(good)
        assert await ready(proc)
        assert cp.nodes[0].pod == "client-0" and cp.nodes[0].namespace == "demo"
        async with httpx.AsyncClient() as client:
            r = await client.get(f"http://127.0.0.1:{proc.outbound}/hello")
        assert r.status_code == 200
        assert cp.answers[-1] == (good.version, "1", "")
        # A snapshot the proxy cannot use is NACKed with the old version; the old one keeps serving.
        cp.answered.clear()
        bad = Snapshot(services=(service(upstream.port), service(upstream.port))).with_version()
        await cp.outbox.put(bad)
        await asyncio.wait_for(cp.answered.wait(), 10)
        version, nonce, error = cp.answers[-1]
        assert (version, nonce) == (good.version, "2")
        assert "duplicate" in error
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"http://127.0.0.1:{proc.outbound}/hello")).status_code == 200
    finally:
        assert proc.stop() == 0
    assert cache.exists()

    # Restarted with the control plane gone: the cached config makes it ready and serving.
    dead_port = _free_port()
    again = start(dead_port, cache, tmp_path / "second.log")
    try:
        assert await ready(again)
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"http://127.0.0.1:{again.outbound}/hello")).status_code == 200
    finally:
        assert again.stop() == 0
