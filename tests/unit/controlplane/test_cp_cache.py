"""Snapshot cache wake-ups, debouncing, and the reconciler's compile-once behaviour."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from controlplane.app import build
from controlplane.cache import Debouncer, Reconciler, SnapshotCache
from controlplane.compile import ProxyNode
from controlplane.events import KINDS, Relist, WatchEvent
from controlplane.index import Index
from controlplane.metrics import ControlPlaneMetrics
from controlplane.settings import ControlPlaneSettings, MeshSettings
from meshproxy.config.model import Service, Snapshot


def snap(*names: str) -> Snapshot:
    return Snapshot(services=tuple(Service(name=n, namespace="ns", port=80) for n in names)).with_version()


def test_set_wakes_only_that_nodes_watchers_and_only_on_a_new_version() -> None:
    cache = SnapshotCache()
    seen: dict[str, list[str]] = {"a": [], "b": []}
    cache.watch("a", lambda s: seen["a"].append(s.version))
    cancel_b = cache.watch("b", lambda s: seen["b"].append(s.version))
    s1, s2 = snap("x"), snap("x", "y")
    assert cache.set("a", s1) is True
    assert cache.set("a", snap("x")) is False  # equal content, equal version: nobody woken
    assert cache.set("a", s2) is True
    assert seen == {"a": [s1.version, s2.version], "b": []}
    cancel_b()
    cache.set("b", s1)
    assert seen["b"] == [] and cache.get("b") == s1


def test_debouncer_waits_for_quiet_but_not_beyond_max_delay() -> None:
    d = Debouncer(quiet=0.1, max_delay=1.0)
    assert d.deadline() is None and not d.due(100.0)
    d.touch(10.0)
    assert d.deadline() == 10.1
    d.touch(10.05)
    assert not d.due(10.1) and d.due(10.15)
    # A steady trickle (every 50 ms) keeps pushing the quiet deadline; max_delay caps it.
    for i in range(2, 40):
        d.touch(10.0 + i * 0.05)
    assert d.deadline() == 11.0
    assert d.take() == 10.0 and d.deadline() is None


def service(name: str, ip: str) -> dict[str, Any]:
    return {
        "kind": "Service",
        "metadata": {"name": name, "namespace": "demo"},
        "spec": {"clusterIP": ip, "selector": {"app": name}, "ports": [{"name": "http", "port": 80}]},
    }


def pod(name: str, app: str) -> dict[str, Any]:
    return {
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "demo",
            "labels": {"app": app, "pod-template-hash": "abc12"},
            "ownerReferences": [{"kind": "ReplicaSet", "name": f"{app}-abc12", "controller": True}],
        },
        "spec": {"containers": [{"name": "c", "ports": [{"containerPort": 80}]}]},
        "status": {
            "phase": "Running",
            "podIP": "198.18.0.1",
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def synced_index(*objects: dict[str, Any]) -> Index:
    index = Index()
    for kind in KINDS:
        index.apply(Relist(kind=kind, objects=[o for o in objects if o["kind"] == kind]))
    return index


def test_replicas_of_a_workload_share_one_compile_and_one_version() -> None:
    pods = [pod(f"web-abc12-{i:05d}", "web") for i in range(50)]
    cache = SnapshotCache()
    r = Reconciler(synced_index(service("web", "198.19.0.1"), *pods), cache, MeshSettings())
    for p in pods:
        name = p["metadata"]["name"]
        r.add_node(f"{name}.demo", ProxyNode(pod=name, namespace="demo"))
    assert r.compiles == 1
    versions = {cache.get(f"{p['metadata']['name']}.demo").version for p in pods}  # type: ignore[union-attr]
    assert len(versions) == 1
    assert cache.get("web-abc12-00000.demo").workload.name == "web"  # type: ignore[union-attr]


async def eventually(cond: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def test_a_burst_of_events_is_compiled_once() -> None:
    cache = SnapshotCache()
    metrics = ControlPlaneMetrics()
    r = Reconciler(synced_index(), cache, MeshSettings(), quiet=0.05, max_delay=5.0, metrics=metrics)
    r.add_node("a.demo", ProxyNode(pod="a", namespace="demo"))
    woken: list[str] = []
    cache.watch("a.demo", lambda s: woken.append(s.version))
    task = asyncio.create_task(r.run(), name="test-reconciler")
    try:
        compiles = r.compiles
        for i in range(30):  # one burst, faster than the quiet period
            r.apply(WatchEvent(kind="Service", type="ADDED", obj=service(f"s{i}", f"198.19.0.{i + 1}")))
        await eventually(lambda: len(woken) == 1)
        assert r.compiles == compiles + 1
        assert len(cache.get("a.demo").services) == 30  # type: ignore[union-attr]
        assert metrics.convergence_latency._sum.get() > 0  # the burst's latency was observed
        # An event that changes nothing (same object again) compiles nothing and wakes nobody.
        r.apply(WatchEvent(kind="Service", type="MODIFIED", obj=service("s0", "198.19.0.1")))
        r.apply(WatchEvent(kind="Service", type="DELETED", obj=service("s29", "198.19.0.30")))
        await eventually(lambda: len(woken) == 2)
        assert r.compiles == compiles + 2
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_compile_failure_keeps_the_last_snapshots_and_is_counted(monkeypatch: Any) -> None:
    import controlplane.cache as cache_mod

    cache = SnapshotCache()
    metrics = ControlPlaneMetrics()
    r = Reconciler(synced_index(), cache, MeshSettings(), quiet=0.01, max_delay=0.05, metrics=metrics)
    first = r.add_node("a.demo", ProxyNode(pod="a", namespace="demo"))

    def broken(*args: Any) -> Any:
        raise RuntimeError("bug")

    monkeypatch.setattr(cache_mod, "compile_mesh", broken)
    task = asyncio.create_task(r.run(), name="test-reconciler")
    try:
        r.apply(WatchEvent(kind="Service", type="ADDED", obj=service("s", "198.19.0.1")))
        await eventually(lambda: metrics.compile_errors._value.get() == 1)
        assert cache.get("a.demo") is first
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_leading_edge_a_change_after_quiet_is_due_at_once_a_burst_after_it_waits() -> None:
    d = Debouncer(quiet=0.1, max_delay=1.0, leading=True)
    d.touch(10.0)  # the first event ever: nothing before it
    assert d.deadline() == 10.0 and d.due(10.0)
    assert d.take() == 10.0
    # Events right behind it form a burst, debounced as without the leading edge.
    d.touch(10.03)
    d.touch(10.06)
    assert d.deadline() == 10.16 and not d.due(10.1)
    assert d.take() == 10.03
    # After a quiet period the next lone change is due at once again.
    d.touch(10.5)
    assert d.deadline() == 10.5
    d.touch(10.52)  # arrives before the reconcile ran: joins the same, immediate, compile
    assert d.deadline() == 10.5 and d.take() == 10.5
    # Without the leading edge nothing is due before the quiet period.
    plain = Debouncer(quiet=0.1, max_delay=1.0)
    plain.touch(10.0)
    assert plain.deadline() == 10.1


async def test_the_control_plane_compiles_a_lone_change_without_waiting_out_the_quiet_period() -> None:
    # The process's settings turn the leading edge on: with a quiet period of a minute, a
    # change after a quiet spell still reaches the cache at once; the next one, right
    # behind it, waits (it is not there while the first one is).
    settings = ControlPlaneSettings(debounce_quiet=60.0, debounce_max_delay=120.0)
    assert settings.debounce_leading
    plane = build(settings)
    r, cache = plane.reconciler, plane.cache
    for kind in KINDS:
        r.apply(Relist(kind=kind, objects=[]))
    r.add_node("a.demo", ProxyNode(pod="a", namespace="demo"))
    woken: list[Snapshot] = []
    cache.watch("a.demo", woken.append)
    task = asyncio.create_task(r.run(), name="test-reconciler")
    try:
        r.apply(WatchEvent(kind="Service", type="ADDED", obj=service("first", "198.19.0.1")))
        await eventually(lambda: len(woken) == 1)  # well within the minute
        r.apply(WatchEvent(kind="Service", type="ADDED", obj=service("second", "198.19.0.2")))
        r.apply(WatchEvent(kind="Service", type="ADDED", obj=service("third", "198.19.0.3")))
        await asyncio.sleep(0.2)  # the burst is due in a minute: nothing may be published meanwhile
        assert [s.name for s in woken[-1].services] == ["first"] and len(woken) == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
