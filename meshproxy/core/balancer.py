"""Per-service endpoint pools: load balancing plus outlier ejection, surviving snapshot swaps.

Owns: ``EndpointPool`` (one per service key, kept by the shell in a dict
``ServiceKey -> EndpointPool`` across config snapshots) and ``EndpointStats``
(its read-only view for /clusters).

API:
    EndpointPool(key, clock, rng, endpoints=(), policy=None)
    pool.update(endpoints, policy)      new endpoint list / TrafficPolicy (lb, outlier detection,
                                        panic threshold); state kept by (address, port)
    pool.pick(exclude=frozenset()) -> Endpoint | None
    pool.on_request_start(endpoint)     in-flight += 1
    pool.on_request_end(endpoint, outcome: Outcome)   in-flight -= 1, outlier accounting
    pool.stats() -> list[EndpointStats];  pool.ejections_total;  pool.ejections_by_reason
    pool.in_panic;  pool.panic_picks      panic mode now; picks made in panic mode so far
    pool.ejected_count                    endpoints ejected now
    pool.endpoints -> tuple[Endpoint, ...];  pool.size;  pool.lb

Picking:
  * Eligible: ready, not terminating, weight > 0, not ejected. If none is
    eligible, endpoints that are terminating but still serving are used (so
    in-flight rollouts drain gracefully rather than fail).
  * Panic (Envoy's healthy_panic_threshold): when the eligible endpoints are fewer
    than ``min_health_percent`` (of the service's ``OutlierDetection``, default 50)
    percent of the usable ones (ready, not terminating,
    weight > 0, ejected or not), outlier ejection is ignored and every usable
    endpoint is picked from. Ejection is a guess from a few errors; when it has
    removed most of a service, concentrating all traffic on the few endpoints
    left (or answering UH for a single-endpoint service until an ejection ends)
    does more harm than sending some requests to a host that may have recovered.
    ``min_health_percent=0`` turns this off. The threshold is per service and
    follows ``update`` like the rest of the policy (re-evaluated at once).
    ``in_panic``/``panic_picks`` report it.
  * ``exclude`` holds (address, port) pairs or Endpoints a retry wants to avoid;
    it is a preference: if it would leave nothing, it is ignored.
  * ROUND_ROBIN rotates over the eligible list; LEAST_REQUEST is power of two
    choices on in-flight count with a random tie-break; RANDOM is weighted by
    ``Endpoint.weight`` (the other two ignore weights).
  * Ejections end lazily: ``pick`` and ``stats`` check the clock; no timers.

Invariants:
  * An endpoint's identity is (address, port). ``update`` keeps in-flight
    counts and outlier state for endpoints still present (a readiness flip keeps
    them too). A removed endpoint with requests in flight is parked until they
    end (and revived with its state if it comes back), so ``on_request_end`` for
    it never crashes nor corrupts counts; for unknown endpoints it is a no-op.
  * At most ``max_ejection_percent`` of endpoints are ejected (Envoy's rule, see
    ``meshproxy.core.outlier``). With outlier detection off (policy None) nobody
    is ejected, and existing ejections are lifted.

Concurrency: none; all calls come from the event loop thread.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from meshproxy.config.model import Endpoint, LbPolicy, OutlierDetection, ServiceKey, TrafficPolicy
from meshproxy.core.clock import Clock
from meshproxy.core.outlier import EjectReason, Outcome, OutlierState, may_eject

EndpointId = tuple[str, int]

_DEFAULT_PANIC_THRESHOLD = OutlierDetection().min_health_percent  # Envoy's default, 50


@dataclass(frozen=True, slots=True)
class EndpointStats:
    address: str
    port: int
    healthy: bool  # would be picked now (ready, not terminating, not ejected, weight > 0)
    ready: bool
    terminating: bool
    ejected_until: float | None  # clock time (monotonic seconds) the ejection ends
    times_ejected: int
    in_flight: int
    consecutive_failures: int
    pod: str = ""
    ejection_remaining: float | None = None  # seconds until the ejection ends (for humans)


@dataclass(slots=True)
class _EndpointState:
    endpoint: Endpoint
    in_flight: int = 0
    outlier: OutlierState = field(default_factory=OutlierState)


def _eid(ep: Endpoint | EndpointId) -> EndpointId:
    return ep if isinstance(ep, tuple) else (ep.address, ep.port)


class EndpointPool:
    """Runtime state for the endpoints of one service (see module doc)."""

    __slots__ = (
        "_clock",
        "_ejected",
        "_ejections",
        "_ejections_by_reason",
        "_eligible",
        "_fallback",
        "_lb",
        "_next_return",
        "_outlier",
        "_panic",
        "_panic_threshold",
        "_parked",
        "_rng",
        "_rr",
        "_states",
        "_usable",
        "key",
        "panic_picks",
    )

    def __init__(
        self,
        key: ServiceKey | str,
        clock: Clock,
        rng: random.Random,
        endpoints: Iterable[Endpoint] = (),
        policy: TrafficPolicy | None = None,
    ) -> None:
        self.key = key
        self._panic_threshold = _DEFAULT_PANIC_THRESHOLD  # set from the policy by update()
        self._usable: list[_EndpointState] = []
        self._panic = False
        self._ejected = 0
        self.panic_picks = 0
        self._clock = clock
        self._rng = rng
        self._states: dict[EndpointId, _EndpointState] = {}
        self._parked: dict[EndpointId, _EndpointState] = {}
        self._lb = LbPolicy.LEAST_REQUEST
        self._outlier: OutlierDetection | None = OutlierDetection()
        self._rr = 0
        self._ejections_by_reason: dict[EjectReason, int] = dict.fromkeys(EjectReason, 0)
        self._ejections = 0  # their sum: read twice per request by the pipeline
        self._eligible: list[_EndpointState] = []
        self._fallback: list[_EndpointState] = []
        self._next_return: float | None = None
        self.update(endpoints, policy if policy is not None else TrafficPolicy())

    # -- configuration -------------------------------------------------------------------------

    def update(self, endpoints: Iterable[Endpoint], policy: TrafficPolicy) -> None:
        """Replace the endpoint list and policy, keeping state of endpoints still present."""
        self._lb = policy.lb
        self._outlier = policy.outlier_detection
        # Without outlier detection nothing is ejected, so no threshold can cause panic.
        self._panic_threshold = (
            self._outlier.min_health_percent if self._outlier is not None else _DEFAULT_PANIC_THRESHOLD
        )
        new: dict[EndpointId, _EndpointState] = {}
        for ep in endpoints:
            eid = _eid(ep)
            if eid in new:
                continue  # duplicates: first wins
            st = self._states.pop(eid, None) or self._parked.pop(eid, None) or _EndpointState(ep)
            st.endpoint = ep
            new[eid] = st
        for eid, st in self._states.items():  # removed now
            if st.in_flight > 0:
                self._parked[eid] = st
        self._states = new
        if self._outlier is None:
            for st in new.values():
                st.outlier.ejected_until = None
                st.outlier.reset_counters()
        self._rebuild()

    @property
    def lb(self) -> LbPolicy:
        return self._lb

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return tuple(st.endpoint for st in self._states.values())

    @property
    def size(self) -> int:
        return len(self._states)

    # -- picking -------------------------------------------------------------------------------

    def _rebuild(self) -> None:
        now = self._clock.now()
        eligible: list[_EndpointState] = []
        fallback: list[_EndpointState] = []
        usable: list[_EndpointState] = []
        next_return: float | None = None
        ejected = 0
        for st in self._states.values():
            st.outlier.maybe_return(now)
            ep = st.endpoint
            if ep.weight > 0 and ep.ready and not ep.terminating:
                usable.append(st)
            until = st.outlier.ejected_until
            if until is not None:
                ejected += 1
                next_return = until if next_return is None else min(next_return, until)
                continue
            if ep.weight <= 0:
                continue
            if ep.ready and not ep.terminating:
                eligible.append(st)
            elif ep.serving and ep.terminating:
                fallback.append(st)
        self._eligible = eligible
        self._fallback = fallback
        self._usable = usable
        self._ejected = ejected
        self._next_return = next_return
        self._panic = bool(usable) and 100 * len(eligible) < self._panic_threshold * len(usable)

    def _refresh(self) -> None:
        if self._next_return is not None and self._clock.now() >= self._next_return:
            self._rebuild()

    def pick(self, exclude: Iterable[Endpoint | EndpointId] = frozenset()) -> Endpoint | None:
        """Choose an endpoint for one attempt, or None if none is usable (flag UH)."""
        self._refresh()
        if self._panic:
            self.panic_picks += 1
            candidates = self._usable
        else:
            candidates = self._eligible or self._fallback
        if not candidates:
            return None
        avoid = {_eid(e) for e in exclude} if exclude else None
        if avoid:
            preferred = [st for st in candidates if _eid(st.endpoint) not in avoid]
            if preferred:
                candidates = preferred
        return self._choose(candidates).endpoint

    def _choose(self, c: list[_EndpointState]) -> _EndpointState:
        n = len(c)
        if n == 1:
            return c[0]
        if self._lb is LbPolicy.ROUND_ROBIN:
            st = c[self._rr % n]
            self._rr = (self._rr + 1) % (1 << 30)
            return st
        if self._lb is LbPolicy.RANDOM:
            return self._rng.choices(c, weights=[st.endpoint.weight for st in c])[0]
        i, j = self._rng.sample(range(n), 2)
        a, b = c[i], c[j]
        if a.in_flight != b.in_flight:
            return a if a.in_flight < b.in_flight else b
        return a if self._rng.random() < 0.5 else b

    # -- request accounting -----------------------------------------------------------------------

    def _state(self, ep: Endpoint | EndpointId) -> _EndpointState | None:
        eid = _eid(ep)
        return self._states.get(eid) or self._parked.get(eid)

    def on_request_start(self, endpoint: Endpoint | EndpointId) -> None:
        st = self._state(endpoint)
        if st is not None:
            st.in_flight += 1

    def on_request_end(self, endpoint: Endpoint | EndpointId, outcome: Outcome) -> None:
        eid = _eid(endpoint)
        st = self._states.get(eid)
        if st is None:
            parked = self._parked.get(eid)
            if parked is not None:
                parked.in_flight = max(0, parked.in_flight - 1)
                if parked.in_flight == 0:
                    del self._parked[eid]
            return
        st.in_flight = max(0, st.in_flight - 1)
        policy = self._outlier
        if policy is None:
            return
        outlier = st.outlier
        if outlier.ejected_until is not None:  # else neither can hold: the clock is not read
            now = self._clock.now()
            outlier.maybe_return(now)
            if outlier.is_ejected(now):
                return  # results of requests that were in flight at ejection do not extend it
        reason = outlier.record(outcome, policy)
        if reason is None:
            return
        now = self._clock.now()
        ejected = sum(1 for s in self._states.values() if s.outlier.is_ejected(now))
        if not may_eject(ejected, len(self._states), policy.max_ejection_percent):
            return
        st.outlier.eject(now, policy)
        self._ejections_by_reason[reason] += 1
        self._ejections += 1
        self._rebuild()

    # -- observation ------------------------------------------------------------------------------

    @property
    def ejected_count(self) -> int:
        """Endpoints ejected now (as of the last pick or the clock check this makes)."""
        self._refresh()
        return self._ejected

    @property
    def in_panic(self) -> bool:
        """Too few endpoints are healthy: picks ignore outlier ejection (see module doc)."""
        self._refresh()
        return self._panic

    @property
    def ejections_total(self) -> int:
        return self._ejections

    @property
    def ejections_by_reason(self) -> Mapping[EjectReason, int]:
        return dict(self._ejections_by_reason)

    def in_flight(self, endpoint: Endpoint | EndpointId) -> int:
        st = self._state(endpoint)
        return st.in_flight if st is not None else 0

    def stats(self) -> list[EndpointStats]:
        self._refresh()
        now = self._clock.now()
        healthy = {id(st) for st in self._eligible}
        out: list[EndpointStats] = []
        for st in self._states.values():
            ep = st.endpoint
            out.append(
                EndpointStats(
                    address=ep.address,
                    port=ep.port,
                    healthy=id(st) in healthy,
                    ready=ep.ready,
                    terminating=ep.terminating,
                    ejected_until=st.outlier.ejected_until if st.outlier.is_ejected(now) else None,
                    times_ejected=st.outlier.times_ejected,
                    in_flight=st.in_flight,
                    consecutive_failures=st.outlier.consecutive_failures,
                    pod=ep.pod,
                    ejection_remaining=(
                        st.outlier.ejected_until - now
                        if st.outlier.ejected_until is not None and st.outlier.is_ejected(now)
                        else None
                    ),
                )
            )
        return out
