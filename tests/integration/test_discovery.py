"""The discovery stream over real gRPC on 127.0.0.1: control plane server + sidecar client.

Every test builds the real pipeline (Index -> Reconciler -> SnapshotCache ->
DiscoveryServer) with ``controlplane.app.build`` and feeds it cluster events
directly, as the watch would.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from controlplane.app import ControlPlane, build
from controlplane.events import KINDS, Relist, WatchEvent
from controlplane.metrics import ControlPlaneMetrics
from controlplane.server import DiscoveryServer, DiscoveryService
from controlplane.settings import ControlPlaneSettings
from meshapi.discovery.v1 import discovery_pb2_grpc
from meshctl import cli as meshctl
from meshproxy.config.model import Snapshot
from meshproxy.core.errors import ConfigError
from meshproxy.xds import convert as xconv
from meshproxy.xds.client import Backoff, ConnectionState, ProxyNode, XdsClient


async def eventually(cond: Callable[[], bool], within: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def service(name: str, ip: str, ns: str = "demo", port: int = 8080) -> dict[str, Any]:
    return {
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"clusterIP": ip, "selector": {"app": name}, "ports": [{"name": "http", "port": port}]},
    }


def pod(name: str, app: str, ip: str, ns: str = "demo") -> dict[str, Any]:
    return {
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": app}},
        "spec": {"containers": [{"name": "c", "ports": [{"containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]},
    }


def slice_(svc: str, n: int, ns: str = "demo", name: str | None = None) -> dict[str, Any]:
    return {
        "kind": "EndpointSlice",
        "metadata": {
            "name": name or f"{svc}-1",
            "namespace": ns,
            "labels": {"kubernetes.io/service-name": svc},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [
            {"addresses": [f"198.18.{i // 250}.{i % 250 + 1}"], "conditions": {"ready": True}}
            for i in range(n)
        ],
    }


@dataclass
class Plane:
    cp: ControlPlane
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.cp.grpc_port}"

    def apply(self, *events: Any) -> None:
        for e in events:
            self.cp.reconciler.apply(e)

    def add(self, obj: dict[str, Any]) -> None:
        self.apply(WatchEvent(kind=obj["kind"], type="ADDED", obj=obj))

    def delete(self, obj: dict[str, Any]) -> None:
        self.apply(WatchEvent(kind=obj["kind"], type="DELETED", obj=obj))

    def row(self, pod: str) -> Any:
        return next((r for r in self.cp.service.status_rows() if r.node.pod == pod), None)


def settings(**kw: Any) -> ControlPlaneSettings:
    base: dict[str, Any] = dict(
        listen_address="127.0.0.1", grpc_port=0, metrics_port=0, debounce_quiet=0.02, debounce_max_delay=0.1
    )
    base.update(kw)
    return ControlPlaneSettings(**base)


async def start_plane(cp: ControlPlane, objects: list[dict[str, Any]]) -> Plane:
    plane = Plane(cp)
    for kind in KINDS:
        cp.reconciler.apply(Relist(kind=kind, objects=[o for o in objects if o["kind"] == kind]))
    cp.grpc_port = await cp.server.start()
    plane.tasks.append(asyncio.create_task(cp.reconciler.run(), name="test-reconciler"))
    return plane


@pytest.fixture
async def plane() -> AsyncIterator[Plane]:
    p = await start_plane(
        build(settings()),
        [service("web", "198.19.0.1"), service("api", "198.19.0.2"), pod("web-0", "web", "198.18.0.10")],
    )
    yield p
    for t in p.tasks:
        t.cancel()
    await p.cp.server.stop(0)


class Proxy:
    """A sidecar's discovery client with an apply() that can be told to reject."""

    def __init__(
        self, target: str, pod: str = "web-0", reject_if: Callable[[Snapshot], str | None] | None = None
    ):
        self.applied: list[Snapshot] = []
        self.offered: list[str] = []
        self.states: list[ConnectionState] = []
        self.reject_if = reject_if
        self.client = XdsClient(
            target,
            ProxyNode(pod=pod, namespace="demo"),
            self.apply,
            self.states.append,
            backoff=Backoff(initial=0.05, maximum=0.2),
        )
        self.task = asyncio.create_task(self.client.run(), name=f"test-xds-{pod}")

    def apply(self, snapshot: Snapshot) -> None:
        self.offered.append(snapshot.version)
        reason = self.reject_if(snapshot) if self.reject_if else None
        if reason:
            raise ConfigError("services", reason)
        self.applied.append(snapshot)

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def has_service(name: str) -> Callable[[Snapshot], bool]:
    return lambda s: any(svc.name == name for svc in s.services)


async def test_first_full_snapshot_is_acked_and_shown_synced(plane: Plane) -> None:
    proxy = Proxy(plane.target)
    try:
        await eventually(lambda: len(proxy.applied) == 1, what="first snapshot")
        snap = proxy.applied[0]
        assert {s.name for s in snap.services} == {"web", "api"}
        assert snap.workload.name == "web-0" and [p.port for p in snap.inbound.ports] == [8080]
        await eventually(lambda: plane.row("web-0") is not None and plane.row("web-0").state == "SYNCED")
        row = plane.row("web-0")
        assert row.acked_version == snap.version == row.desired_version
        assert proxy.client.state is ConnectionState.CONNECTED

        out = io.StringIO()
        assert (
            await asyncio.to_thread(meshctl.main, ["--control-plane", plane.target, "proxy-status"], out) == 0
        )
        lines = out.getvalue().splitlines()
        assert lines[0].split() == ["NAME", "NAMESPACE", "VERSION-ACKED", "STATE", "LAST-NACK"]
        assert lines[1].split() == ["web-0", "demo", snap.version, "SYNCED", "-"]

        out = io.StringIO()
        assert (
            await asyncio.to_thread(
                meshctl.main, ["--control-plane", plane.target, "proxy-config", "web-0", "-n", "demo"], out
            )
            == 0
        )
        assert f'"version": "{snap.version}"' in out.getvalue()
    finally:
        await proxy.close()


async def test_nacked_version_is_reported_never_resent_and_a_good_one_follows(plane: Plane) -> None:
    proxy = Proxy(
        plane.target, reject_if=lambda s: "no bad services please" if has_service("bad")(s) else None
    )
    try:
        await eventually(lambda: len(proxy.applied) == 1, what="first snapshot")
        good = proxy.applied[0]

        bad, other = service("bad", "198.19.0.9"), service("other", "198.19.0.8")
        plane.add(bad)  # -> version B, rejected
        await eventually(lambda: plane.row("web-0").last_nack != "", what="NACK recorded")
        version_b = proxy.offered[-1]
        row = plane.row("web-0")
        assert row.state == "STALE" and row.acked_version == good.version
        assert "no bad services please" in row.last_nack

        out = io.StringIO()
        await asyncio.to_thread(meshctl.main, ["--control-plane", plane.target, "proxy-status"], out)
        assert "no bad services please" in out.getvalue() and "STALE" in out.getvalue()

        plane.add(other)  # -> version C (still has "bad"), rejected
        await eventually(lambda: len(proxy.offered) == 3, what="version C offered")
        plane.delete(other)  # -> back to B: never sent again on this stream
        pushes = plane.cp.metrics.pushes._value.get()
        await eventually(
            lambda: plane.cp.cache.get("web-0.demo").version == version_b, what="B compiled again"
        )
        await asyncio.sleep(0.3)  # give a wrong resend the chance to show up (asserting absence)
        assert proxy.offered.count(version_b) == 1
        assert plane.cp.metrics.pushes._value.get() == pushes

        plane.delete(bad)  # back to the ACKed content: sent, not re-applied, ACKed: SYNCED
        await eventually(lambda: plane.row("web-0").state == "SYNCED", what="SYNCED again")
        plane.add(service("new", "198.19.0.7"))  # a new good version is applied and ACKed
        await eventually(lambda: has_service("new")(proxy.applied[-1]), what="new version applied")
        await eventually(lambda: plane.row("web-0").acked_version == proxy.applied[-1].version)
        assert plane.row("web-0").state == "SYNCED" and plane.row("web-0").last_nack == ""
        assert [s.version for s in proxy.applied] == [good.version, proxy.applied[-1].version]
    finally:
        await proxy.close()


async def test_client_reconnects_after_a_restart_and_keeps_its_last_good_config(plane: Plane) -> None:
    proxy = Proxy(plane.target)
    try:
        await eventually(lambda: plane.row("web-0") is not None and plane.row("web-0").state == "SYNCED")
        first = proxy.client.last_good
        port = plane.cp.grpc_port
        await plane.cp.server.stop(0)
        await eventually(
            lambda: proxy.client.state is not ConnectionState.CONNECTED, what="disconnect noticed"
        )
        assert proxy.client.last_good is first and len(proxy.applied) == 1

        plane.add(service("later", "198.19.0.6"))  # changes while the proxy is away
        # A new server process part on the same port, over the same cluster view.
        again = settings(grpc_port=port)
        service_ = DiscoveryService(plane.cp.reconciler, plane.cp.cache, again, ControlPlaneMetrics())
        server = DiscoveryServer(service_, again)
        assert await server.start() == port
        try:
            await eventually(lambda: has_service("later")(proxy.applied[-1]), what="update after reconnect")
            assert proxy.client.streams >= 2
            assert ConnectionState.DISCONNECTED in proxy.states
            await eventually(lambda: any(r.state == "SYNCED" for r in service_.status_rows()))
        finally:
            await server.stop(0)
    finally:
        await proxy.close()


async def test_two_hundred_proxies_and_a_slow_one_does_not_block_them() -> None:
    # Snapshots of ~3000 endpoints (well over one HTTP/2 flow-control window), a proxy
    # that never reads, and 200 simulated proxies that ACK everything.
    cp = build(settings(send_queue_size=2, send_timeout=60.0))
    p = await start_plane(cp, [service("big", "198.19.1.1"), slice_("big", 3000)])
    channels: list[grpc.aio.Channel] = []
    try:
        slow_channel = grpc.aio.insecure_channel(p.target, options=[("grpc.http2.bdp_probe", 0)])
        channels.append(slow_channel)
        slow = discovery_pb2_grpc.ConfigDiscoveryStub(slow_channel).StreamConfig()
        await slow.write(xconv.first_request(xconv.ProxyNode(pod="slow", namespace="demo"), ""))

        versions: dict[int, str] = {}

        async def simulated(i: int) -> None:
            ch = grpc.aio.insecure_channel(p.target)
            channels.append(ch)
            call = discovery_pb2_grpc.ConfigDiscoveryStub(ch).StreamConfig()
            # Replicas of one workload: one compile per version serves all of them.
            node = xconv.ProxyNode(pod=f"p{i}", namespace="demo", workload="sim", service_account="sim")
            await call.write(xconv.first_request(node, ""))
            async for resp in call:
                versions[i] = resp.version_info
                await call.write(xconv.ack(resp.version_info, resp.nonce))

        sims = [asyncio.create_task(simulated(i), name=f"sim-{i}") for i in range(200)]
        try:
            await eventually(lambda: len(versions) == 200, within=60, what="200 proxies served")
            for n in range(2000, 2004):  # four new versions: the slow proxy's slot overflows
                p.apply(WatchEvent(kind="EndpointSlice", type="MODIFIED", obj=slice_("big", n)))
                want = cp.cache.get("p0.demo")
                await eventually(lambda want=want: cp.cache.get("p0.demo") is not want, what="recompiled")
                latest = cp.cache.get("p0.demo").version
                await eventually(
                    lambda latest=latest: all(v == latest for v in versions.values()),
                    within=60,
                    what="all 200 updated",
                )
            await eventually(lambda: cp.metrics.slow_closes._value.get() == 1, what="slow proxy closed")
            # The reason reaches the slow proxy behind the message it did not read.
            with pytest.raises(grpc.aio.AioRpcError) as closed:
                while True:
                    await slow.read()
            assert closed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            await eventually(lambda: len(cp.service.status_rows()) == 200, what="slow proxy unregistered")
            assert all(r.state == "SYNCED" for r in cp.service.status_rows())
        finally:
            for t in sims:
                t.cancel()
            await asyncio.gather(*sims, return_exceptions=True)
    finally:
        for ch in channels:
            await ch.close()
        for t in p.tasks:
            t.cancel()
        await cp.server.stop(0)


async def test_stale_nonces_are_ignored(plane: Plane) -> None:
    async with grpc.aio.insecure_channel(plane.target) as ch:
        call = discovery_pb2_grpc.ConfigDiscoveryStub(ch).StreamConfig()
        await call.write(xconv.first_request(xconv.ProxyNode(pod="raw", namespace="demo"), ""))
        first = await call.read()
        plane.add(service("x", "198.19.0.5"))
        second = await call.read()
        assert second.version_info != first.version_info
        # An ACK for the first response arrives late: stale, must not count as an ACK.
        await call.write(xconv.ack(first.version_info, first.nonce))
        await eventually(lambda: plane.cp.metrics.stale_requests._value.get() == 1, what="stale counted")
        assert plane.row("raw").acked_version == "" and plane.row("raw").state == "STALE"
        await call.write(xconv.ack(second.version_info, second.nonce))
        await eventually(lambda: plane.row("raw").state == "SYNCED", what="ACK of the latest nonce")
        call.cancel()


async def test_first_request_without_identity_is_refused(plane: Plane) -> None:
    async with grpc.aio.insecure_channel(plane.target) as ch:
        call = discovery_pb2_grpc.ConfigDiscoveryStub(ch).StreamConfig()
        await call.write(xconv.first_request(xconv.ProxyNode(pod="", namespace=""), ""))
        assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_nothing_is_sent_before_the_cluster_was_listed() -> None:
    # After a control plane restart, proxies reconnect at once: a snapshot of a half-listed
    # cluster would make them drop working routes, so they wait for the full listing.
    cp = build(settings())
    cp.grpc_port = await cp.server.start()
    reconciler = asyncio.create_task(cp.reconciler.run(), name="test-reconciler")
    proxy = Proxy(f"127.0.0.1:{cp.grpc_port}")
    try:
        await eventually(
            lambda: [r.state for r in cp.service.status_rows()] == ["NOT_SENT"], what="stream open"
        )
        # A proxy that gives up before the sync is forgotten at once.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{cp.grpc_port}") as ch:
            call = discovery_pb2_grpc.ConfigDiscoveryStub(ch).StreamConfig()
            await call.write(xconv.first_request(xconv.ProxyNode(pod="quitter", namespace="demo"), ""))
            await eventually(lambda: len(cp.service.status_rows()) == 2, what="second stream open")
            call.cancel()
        await eventually(
            lambda: [r.node.pod for r in cp.service.status_rows()] == ["web-0"], what="quitter gone"
        )
        objects = [service("web", "198.19.0.1"), pod("web-0", "web", "198.18.0.10")]
        for kind in KINDS[:-1]:
            cp.reconciler.apply(Relist(kind=kind, objects=[o for o in objects if o["kind"] == kind]))
        await asyncio.sleep(0.2)  # asserting an absence: nothing may arrive while one kind is unlisted
        assert proxy.applied == []
        cp.reconciler.apply(Relist(kind=KINDS[-1], objects=[]))
        await eventually(lambda: len(proxy.applied) == 1, what="first snapshot after sync")
        assert [s.name for s in proxy.applied[0].services] == ["web"]
    finally:
        await proxy.close()
        reconciler.cancel()
        await cp.server.stop(0)
