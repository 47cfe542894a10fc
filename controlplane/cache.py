"""Per-proxy snapshot cache and the debounced reconciler that fills it.

Owns:
  * ``SnapshotCache``: the latest snapshot per node id. ``set`` wakes only the
    watchers of that node, and only when the version differs (so an event that
    does not change a proxy's config costs that proxy nothing).
  * ``Debouncer``: sans-io coalescing of a burst of events: due after
    ``quiet`` seconds without a new event, but never later than ``max_delay``
    after the burst's first event; optionally (``leading``) at once for the
    first event after a quiet period.
  * ``Reconciler``: applies watch events to the ``Index``, and when the
    debouncer says so compiles the mesh once (``compile_mesh``) and one
    snapshot per distinct ``NodeShape`` of the connected proxies, then
    publishes them to the cache. A newly connected proxy is compiled for at
    once (``add_node``), not after the next burst.

    watch -> Reconciler.apply -> Index        (per event, cheap)
                  run(): debounce -> compile_mesh -> per shape compile_for_shape -> cache.set

Invariants: the cache only ever holds snapshots that passed
``check_consistency``; a failed compile keeps every proxy's last snapshot.
Watcher callbacks must not block (the server's put into a bounded,
coalescing per-stream slot).

Concurrency: everything runs on one asyncio loop; the reconciler's ``run``
is the only task, and ``apply``/``add_node``/``remove_node`` are plain calls
from the same loop, so there are no locks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from controlplane.compile import (
    MeshConfig,
    NodeShape,
    PolicyStatus,
    ProxyNode,
    compile_for_shape,
    compile_mesh,
    node_shape,
)
from controlplane.events import KINDS, ClusterEvent
from controlplane.index import ClusterState, Index
from controlplane.metrics import ControlPlaneMetrics
from controlplane.settings import MeshSettings
from meshproxy.config.model import Snapshot

log = logging.getLogger(__name__)

Watcher = Callable[[Snapshot], None]


class Clock(Protocol):
    def __call__(self) -> float:
        """Monotonic seconds."""
        ...


class SnapshotCache:
    """The latest snapshot per node id, with change notification per node."""

    def __init__(self) -> None:
        self._snapshots: dict[str, Snapshot] = {}
        self._watchers: dict[str, list[Watcher]] = {}

    def get(self, node_id: str) -> Snapshot | None:
        return self._snapshots.get(node_id)

    def set(self, node_id: str, snapshot: Snapshot) -> bool:
        """Store; wake this node's watchers if the version changed. Returns whether it changed."""
        old = self._snapshots.get(node_id)
        if old is not None and old.version == snapshot.version:
            return False
        self._snapshots[node_id] = snapshot
        for watcher in list(self._watchers.get(node_id, ())):
            watcher(snapshot)
        return True

    def clear(self, node_id: str) -> None:
        self._snapshots.pop(node_id, None)

    def watch(self, node_id: str, watcher: Watcher) -> Callable[[], None]:
        """Call ``watcher`` with every new snapshot of ``node_id``; returns the cancel function."""
        self._watchers.setdefault(node_id, []).append(watcher)

        def cancel() -> None:
            watchers = self._watchers.get(node_id)
            if watchers and watcher in watchers:
                watchers.remove(watcher)
                if not watchers:
                    del self._watchers[node_id]

        return cancel

    def __len__(self) -> int:
        return len(self._snapshots)


class Debouncer:
    """When a burst of events should be compiled. Sans-io: times are passed in.

    With ``leading``, an event after at least ``quiet`` without one is due at once (a lone
    change, e.g. one pod turning ready, is not delayed by the quiet period); events that
    follow it within ``quiet`` form a burst as without it. So a burst costs at most one
    compile more, and a single change ``quiet`` less latency.
    """

    def __init__(self, quiet: float, max_delay: float, leading: bool = False) -> None:
        self.quiet = quiet
        self.max_delay = max_delay
        self.leading = leading
        self.first: float | None = None  # first event of the pending burst
        self._last = float("-inf")  # the last event
        self._lead = False  # the pending burst began after a quiet period: due at once

    def touch(self, now: float) -> None:
        if self.first is None:
            self.first = now
            self._lead = self.leading and now - self._last >= self.quiet
        self._last = now

    def deadline(self) -> float | None:
        """When the pending burst is due; None when nothing is pending."""
        if self.first is None:
            return None
        if self._lead:
            return self.first
        return min(self._last + self.quiet, self.first + self.max_delay)

    def due(self, now: float) -> bool:
        deadline = self.deadline()
        return deadline is not None and now >= deadline

    def take(self) -> float | None:
        """Start over; returns when the burst that is now being handled began."""
        first, self.first = self.first, None
        return first


class Reconciler:
    """Turns watch events into published snapshots, once per burst and once per workload shape."""

    def __init__(
        self,
        index: Index,
        cache: SnapshotCache,
        settings: MeshSettings,
        *,
        quiet: float = 0.1,
        max_delay: float = 1.0,
        leading: bool = False,
        clock: Clock = time.monotonic,
        metrics: ControlPlaneMetrics | None = None,
        on_statuses: Callable[[Sequence[PolicyStatus]], None] | None = None,
    ) -> None:
        self._index = index
        self._cache = cache
        self._settings = settings
        self._clock = clock
        self._metrics = metrics
        self._on_statuses = on_statuses
        self._debouncer = Debouncer(quiet, max_delay, leading)
        self._wake = asyncio.Event()
        self._nodes: dict[str, ProxyNode] = {}
        self._mesh: MeshConfig | None = None
        self._state: ClusterState | None = None
        self._by_shape: dict[NodeShape, Snapshot] = {}  # valid for self._mesh only
        self._statuses: tuple[PolicyStatus, ...] | None = None
        self.compiles = 0  # distinct-shape compiles, for tests and logs
        # Set once every kind was listed. Until then a snapshot would describe a half-known
        # cluster (after a control plane restart: no services at all) and a proxy applying
        # it would drop working routes, so the server waits for this before answering.
        self.synced = asyncio.Event()
        self._check_synced()

    def _check_synced(self) -> None:
        if not self.synced.is_set() and set(KINDS) <= self._index.synced_kinds:
            self.synced.set()

    async def wait_synced(self) -> None:
        await self.synced.wait()

    # ---- inputs

    def apply(self, event: ClusterEvent) -> None:
        """Feed one watch event (the watch's sink). Compiling waits for the debouncer."""
        if self._index.apply(event):
            self._debouncer.touch(self._clock())
            self._wake.set()
        self._check_synced()

    def add_node(self, node_id: str, node: ProxyNode) -> Snapshot:
        """A proxy connected: compile its snapshot now and publish it."""
        self._nodes[node_id] = node
        snapshot = self._snapshot_for(node)
        self._cache.set(node_id, snapshot)
        return snapshot

    def remove_node(self, node_id: str) -> None:
        self._nodes.pop(node_id, None)
        self._cache.clear(node_id)

    @property
    def state(self) -> ClusterState:
        return self._index.state()

    @property
    def statuses(self) -> tuple[PolicyStatus, ...]:
        return self._statuses or ()

    # ---- compiling

    def _current_mesh(self) -> tuple[ClusterState, MeshConfig]:
        state = self._index.state()
        if self._mesh is None or self._state is not state:
            started = self._clock()
            # The previous mesh lets unchanged services be taken over instead of recompiled.
            self._mesh = compile_mesh(state, self._settings, previous=self._mesh)
            self._state = state
            self._by_shape = {}
            if self._metrics is not None:
                self._metrics.compile_duration.observe(self._clock() - started)
            self._publish_statuses(self._mesh.statuses)
        return state, self._mesh

    def _snapshot_for(self, node: ProxyNode) -> Snapshot:
        state, mesh = self._current_mesh()
        shape = node_shape(state, node)
        snapshot = self._by_shape.get(shape)
        if snapshot is None:
            snapshot = compile_for_shape(mesh, state, shape, self._settings)
            self._by_shape[shape] = snapshot
            self.compiles += 1
        return snapshot

    def _publish_statuses(self, statuses: tuple[PolicyStatus, ...]) -> None:
        if statuses == self._statuses:
            return
        self._statuses = statuses
        if self._metrics is not None:
            for kind in ("HTTPRoute", "TrafficPolicy"):
                for accepted in (True, False):
                    n = sum(1 for s in statuses if s.kind == kind and s.accepted is accepted)
                    self._metrics.policies.labels(kind=kind, accepted=str(accepted).lower()).set(n)
        if self._on_statuses is not None:
            self._on_statuses(statuses)

    def reconcile(self) -> int:
        """Compile for every connected proxy and publish; returns how many proxies changed."""
        first = self._debouncer.take()
        changed = 0
        # By namespace: workloads of one namespace share the mesh's one-entry version memo.
        for node_id, node in sorted(self._nodes.items(), key=lambda item: item[1].namespace):
            if self._cache.set(node_id, self._snapshot_for(node)):
                changed += 1
        if first is not None and self._metrics is not None:
            self._metrics.convergence_latency.observe(self._clock() - first)
        return changed

    async def run(self) -> None:
        """Reconcile after each debounced burst, until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            deadline = self._debouncer.deadline()
            while deadline is not None and self._clock() < deadline:
                try:
                    async with asyncio.timeout(deadline - self._clock()):
                        await self._wake.wait()  # another event: the deadline may move
                except TimeoutError:
                    pass
                self._wake.clear()
                deadline = self._debouncer.deadline()
            if deadline is None:
                continue
            try:
                changed = self.reconcile()
            except Exception:
                # One bad cluster state must not stop the control plane: every proxy keeps its
                # last good snapshot, the failure is counted, and the next event retries.
                log.exception("reconcile failed; proxies keep their last snapshots")
                if self._metrics is not None:
                    self._metrics.compile_errors.inc()
                continue
            log.debug("reconciled", extra={"revision": self._index.revision, "changed": changed})
