"""The control plane process: wires the pipeline and runs it until stopped.

Owns: construction and lifetime of every long-lived part, in one place:

    source (ClusterWatcher | DirectorySource) --events--> Reconciler(Index) --> SnapshotCache
        --> DiscoveryServer (gRPC :15010)        MetricsServer (:15014)
        --> StatusPublisher (policy status)      webhook (HTTPS :15017, optional)

Sources are injected (``SourceFactory``): ``controlplane.watch.ClusterWatcher``
against the API server, or ``DirectorySource`` reading YAML manifests from a
directory (``controlplane run --from-dir``: tests and the local demo, no API
server). The webhook and the status writer are injected the same way, so this
module never talks to the API server itself.

Start-up order: gRPC and metrics listeners first (so /healthz answers and
proxies can connect; they get a snapshot of whatever is known), then the
source, the reconciler and the optional services, all in one TaskGroup.
``/ready`` turns 200 once every kind was listed once. Shutdown: cancel the
TaskGroup, then stop the gRPC server with a grace period, then the metrics
server.

Concurrency: one asyncio loop; every task is named and owned by the TaskGroup;
a failing task stops the process (the orchestrator restarts it) rather than
leaving a half-working control plane.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import pathlib
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import yaml

from controlplane.cache import Reconciler, SnapshotCache
from controlplane.compile import PolicyStatus
from controlplane.events import KINDS, ClusterEvent, Relist
from controlplane.index import Index
from controlplane.metrics import ControlPlaneMetrics, MetricsServer
from controlplane.server import DiscoveryServer, DiscoveryService
from controlplane.settings import ControlPlaneSettings

log = logging.getLogger(__name__)

Sink = Callable[[ClusterEvent], None]


class EventSource(Protocol):
    async def run(self) -> None:
        """Deliver events to the sink it was built with, until cancelled."""
        ...


SourceFactory = Callable[[Sink, ControlPlaneMetrics], EventSource]
Service = Callable[[], Coroutine[Any, Any, None]]  # a long-running coroutine function (e.g. the webhook)


# ---------------------------------------------------------------- --from-dir

_CLUSTER_SCOPED = frozenset({"Namespace"})


def load_manifests(directory: pathlib.Path) -> dict[str, list[Mapping[str, Any]]]:
    """Every object of a known kind in ``*.yaml``/``*.yml``/``*.json`` under ``directory``, by kind.

    Multi-document files and ``kind: List`` are understood; a namespaced object without a
    namespace lands in ``default`` as ``kubectl apply`` would put it.
    """
    out: dict[str, list[Mapping[str, Any]]] = {k: [] for k in KINDS}
    files = sorted(p for p in directory.rglob("*") if p.suffix in (".yaml", ".yml", ".json") and p.is_file())
    for path in files:
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            items = doc.get("items", []) if isinstance(doc, dict) and doc.get("kind") == "List" else [doc]
            for obj in items:
                if not isinstance(obj, dict) or obj.get("kind") not in out:
                    continue
                meta = dict(obj.get("metadata") or {})
                if obj["kind"] not in _CLUSTER_SCOPED and not meta.get("namespace"):
                    meta["namespace"] = "default"
                out[obj["kind"]].append({**obj, "metadata": meta})
    return out


class DirectorySource:
    """Manifests in a directory as the cluster state; re-read when the files change."""

    def __init__(self, directory: pathlib.Path, sink: Sink, poll_interval: float = 1.0) -> None:
        self._dir = directory
        self._sink = sink
        self._poll = poll_interval

    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        for p in sorted(self._dir.rglob("*")):
            if p.is_file() and p.suffix in (".yaml", ".yml", ".json"):
                h.update(str(p).encode() + b"\0" + p.read_bytes() + b"\0")
        return h.hexdigest()

    async def run(self) -> None:
        seen = ""
        while True:
            try:
                fingerprint = await asyncio.to_thread(self._fingerprint)
                if fingerprint != seen:
                    seen = fingerprint
                    objects = await asyncio.to_thread(load_manifests, self._dir)
                    for kind in KINDS:
                        self._sink(Relist(kind=kind, objects=objects[kind]))
                    log.info("loaded manifests from %s", self._dir)
            except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
                # A file being edited may be half-written: keep the last good state and say
                # so once; the next change of any file is read again.
                log.warning("cannot read manifests in %s; keeping the last state: %s", self._dir, exc)
            await asyncio.sleep(self._poll)  # the poll period, not a synchronisation


def directory_source(directory: pathlib.Path, poll_interval: float = 1.0) -> SourceFactory:
    def factory(sink: Sink, metrics: ControlPlaneMetrics) -> EventSource:
        return DirectorySource(directory, sink, poll_interval)

    return factory


# ---------------------------------------------------------------- policy status


class StatusSink(Protocol):
    async def write(self, status: PolicyStatus) -> None: ...


class StatusPublisher:
    """Hands changed policy statuses to a writer, newest first-come, one at a time.

    ``offer`` is called by the reconciler (sync, must not block); ``run`` writes whatever
    changed since it last wrote. A failed write is logged and retried with the next offer.
    """

    def __init__(self, sink: StatusSink | None) -> None:
        self._sink = sink
        self._latest: tuple[PolicyStatus, ...] = ()
        self._written: dict[tuple[str, str, str], PolicyStatus] = {}
        self._wake = asyncio.Event()

    def offer(self, statuses: Sequence[PolicyStatus]) -> None:
        self._latest = tuple(statuses)
        for s in statuses:
            if not s.accepted:
                log.warning(
                    "%s %s/%s not accepted: %s: %s", s.kind, s.namespace, s.name, s.reason.value, s.message
                )
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._sink is None:
                continue
            for s in self._latest:
                key = (s.kind, s.namespace, s.name)
                if self._written.get(key) == s:
                    continue
                try:
                    await self._sink.write(s)
                    self._written[key] = s
                except Exception:
                    # The API server may be briefly unavailable; statuses are re-offered on the
                    # next change. Never let a status write take the control plane down.
                    log.exception("status write failed", extra={"object": f"{s.namespace}/{s.name}"})


# ---------------------------------------------------------------- the process


@dataclass
class ControlPlane:
    """The built pipeline (exposed for tests)."""

    settings: ControlPlaneSettings
    metrics: ControlPlaneMetrics
    index: Index
    cache: SnapshotCache
    reconciler: Reconciler
    service: DiscoveryService
    server: DiscoveryServer
    metrics_server: MetricsServer
    statuses: StatusPublisher
    grpc_port: int = 0
    metrics_port: int = 0

    def ready(self) -> bool:
        return set(KINDS) <= self.reconciler.state.synced_kinds


def build(settings: ControlPlaneSettings, status_sink: StatusSink | None = None) -> ControlPlane:
    metrics = ControlPlaneMetrics()
    index = Index()
    cache = SnapshotCache()
    statuses = StatusPublisher(status_sink)
    reconciler = Reconciler(
        index,
        cache,
        settings.mesh,
        quiet=settings.debounce_quiet,
        max_delay=settings.debounce_max_delay,
        leading=settings.debounce_leading,
        metrics=metrics,
        on_statuses=statuses.offer,
    )
    service = DiscoveryService(reconciler, cache, settings, metrics)
    server = DiscoveryServer(service, settings)
    plane = ControlPlane(
        settings=settings,
        metrics=metrics,
        index=index,
        cache=cache,
        reconciler=reconciler,
        service=service,
        server=server,
        metrics_server=MetricsServer(metrics, lambda: False),
        statuses=statuses,
    )
    plane.metrics_server = MetricsServer(metrics, plane.ready)
    return plane


async def serve(
    plane: ControlPlane,
    source_factory: SourceFactory,
    services: Mapping[str, Service] | None = None,
    *,
    started: Callable[[ControlPlane], None] | None = None,
) -> None:
    """Run the control plane until cancelled (or until one of its tasks fails)."""
    s = plane.settings
    plane.grpc_port = await plane.server.start()
    try:
        plane.metrics_port = await plane.metrics_server.start(s.listen_address, s.metrics_port)
        log.info(
            "control plane listening",
            extra={
                "grpc": f"{s.listen_address}:{plane.grpc_port}",
                "metrics": f"{s.listen_address}:{plane.metrics_port}",
            },
        )
        if started is not None:
            started(plane)
        source = source_factory(plane.reconciler.apply, plane.metrics)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(source.run(), name="cluster-source")
            tg.create_task(plane.reconciler.run(), name="reconciler")
            tg.create_task(plane.statuses.run(), name="policy-status")
            for name, service in (services or {}).items():
                tg.create_task(service(), name=name)
    finally:
        with contextlib.suppress(Exception):
            await plane.server.stop()
        await plane.metrics_server.close()


__all__ = [
    "ControlPlane",
    "DirectorySource",
    "EventSource",
    "SourceFactory",
    "StatusPublisher",
    "build",
    "directory_source",
    "load_manifests",
    "serve",
]
