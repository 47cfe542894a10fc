"""Full snapshots are written a bounded number at a time; nobody waits on a stuck proxy.

Owns: the server's full-push slots (``ControlPlaneSettings.max_full_pushes`` and
``full_push_slot_time``), found by ``make bench-controlplane``: 1000 proxies connecting
at once held 1000 x 500 KiB snapshots in memory. Proved over real gRPC on 127.0.0.1:
a connect storm is served completely through one slot (slots are always given back),
a proxy that never reads its big snapshot holds its slot only for the slot time, and an
idle stream does not keep the last full message it sent alive.
Concurrency: one event loop; the pipeline and the simulated proxies are tasks the
test owns and cancels.
"""

from __future__ import annotations

import asyncio
import tracemalloc

import grpc

from controlplane import convert
from controlplane.app import build
from meshapi.discovery.v1 import discovery_pb2_grpc
from meshproxy.xds import convert as xconv
from tests.integration.test_discovery import eventually, service, settings, slice_, start_plane


async def _serve(
    target: str, pods: list[str], versions: dict[str, str], channels: list[grpc.aio.Channel]
) -> None:
    async def one(pod: str) -> None:
        ch = grpc.aio.insecure_channel(target)
        channels.append(ch)
        call = discovery_pb2_grpc.ConfigDiscoveryStub(ch).StreamConfig()  # type: ignore[no-untyped-call]
        await call.write(xconv.first_request(xconv.ProxyNode(pod=pod, namespace="demo", workload="sim"), ""))
        async for resp in call:
            versions[pod] = resp.version_info
            await call.write(xconv.ack(resp.version_info, resp.nonce))

    await asyncio.gather(*(one(p) for p in pods))


async def test_a_connect_storm_through_one_slot_and_a_stuck_proxy_delays_it_only_briefly() -> None:
    cp = build(settings(max_full_pushes=1, full_push_slot_time=0.3, send_timeout=60.0))
    plane = await start_plane(cp, [service("big", "198.19.1.1"), slice_("big", 3000)])
    channels: list[grpc.aio.Channel] = []
    sims: asyncio.Task[None] | None = None
    try:
        # A proxy that never reads: its ~100 KiB snapshot is far beyond one flow-control
        # window, so its write stays pending and it takes the only slot first.
        stuck_channel = grpc.aio.insecure_channel(plane.target, options=[("grpc.http2.bdp_probe", 0)])
        channels.append(stuck_channel)
        stuck = discovery_pb2_grpc.ConfigDiscoveryStub(stuck_channel).StreamConfig()  # type: ignore[no-untyped-call]
        await stuck.write(xconv.first_request(xconv.ProxyNode(pod="stuck", namespace="demo"), ""))
        await eventually(
            lambda: any(r.node.pod == "stuck" and r.sent_version for r in cp.service.status_rows())
        )

        versions: dict[str, str] = {}
        pods = [f"p{i}" for i in range(30)]
        sims = asyncio.create_task(_serve(plane.target, pods, versions, channels), name="test-storm")
        await eventually(lambda: len(versions) == len(pods), within=30, what="every proxy's full snapshot")
        want = cp.cache.get("p0.demo")
        assert want is not None and set(versions.values()) == {want.version}
        await eventually(
            lambda: sum(r.state == "SYNCED" for r in cp.service.status_rows()) == len(pods), what="all ACKed"
        )
    finally:
        if sims is not None:
            sims.cancel()
            await asyncio.gather(sims, return_exceptions=True)
        for ch in channels:
            await ch.close(None)
        for t in plane.tasks:
            t.cancel()
        await cp.server.stop(0)


async def test_idle_streams_do_not_keep_their_last_full_message() -> None:
    cp = build(settings())
    plane = await start_plane(cp, [service("big", "198.19.1.1"), slice_("big", 3000)])
    channels: list[grpc.aio.Channel] = []
    versions: dict[str, str] = {}
    pods = [f"p{i}" for i in range(20)]
    tracemalloc.start()
    sims = asyncio.create_task(_serve(plane.target, pods, versions, channels), name="test-idle")
    try:
        await eventually(
            lambda: sum(r.state == "SYNCED" for r in cp.service.status_rows()) == len(pods), what="all ACKed"
        )
        snap = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(True, convert.__file__, lineno=None)]
        )
        by_line = snap.statistics("lineno")
        biggest = max((s.size for s in by_line), default=0)
        held = sum(s.size for s in by_line if s.size >= biggest // 2)
        message = len(convert.encode_snapshot_model(cp.cache.get("p0.demo"), convert.ServiceBytesCache()))  # type: ignore[arg-type]
        # The version's shared encoding (and a few in flight) may live on; twenty copies may not.
        assert held < 5 * message, (held, message)
    finally:
        tracemalloc.stop()
        sims.cancel()
        await asyncio.gather(sims, return_exceptions=True)
        for ch in channels:
            await ch.close(None)
        for t in plane.tasks:
            t.cancel()
        await cp.server.stop(0)
