"""Circuit breaking for one destination service: Envoy-style limits plus Linkerd-style failure accrual.

Owns: ``Breaker`` (one per service key, kept by the shell across snapshot
swaps; ``update_policy`` applies a new ``CircuitBreaker`` policy), the failure
accrual state machine (``State`` and the ``TRANSITIONS`` table) and
``Admission`` (the answer to "may this request/connection/retry go?").

API:
    Breaker(key, policy: model.CircuitBreaker, clock)
    breaker.update_policy(policy)
    breaker.try_acquire_request() -> Admission     checks failure accrual (CO) then max_requests (UO)
    breaker.release_request(admission, success=None)
        ends an admitted request; ``success`` True/False feeds failure accrual
        (call it once per upstream attempt); None = no verdict (cancelled, local error)
    breaker.try_acquire_pending() / release_pending()          max_pending_requests (UO)
    breaker.try_acquire_retry() / release_retry()              max_retries, concurrent retries (UO)
    breaker.try_acquire_connection() / release_connection()    max_connections (UO)
    breaker.state -> State        for the gauge: OPEN while accrual is open OR a limit is saturated
    breaker.accrual_state -> State
    breaker.rejections -> Mapping[str, int]   counts by reason ("circuit_open", "max_requests", ...)

Failure accrual (``consecutive_failures`` > 0; 0 turns it off):
    CLOSED --TRIP (N failures in a row)--> OPEN for open_duration * 2**k (k = re-opens since
    last close, capped at max_open_duration)
    OPEN --PROBE (first request after the open time)--> HALF_OPEN: that request is the single probe,
    every other request is rejected with CO until it ends
    HALF_OPEN --PROBE_SUCCEEDED--> CLOSED;  HALF_OPEN --PROBE_FAILED--> OPEN (doubled duration)
    any --RESET--> CLOSED (policy turned accrual off)
  A probe released with ``success=None`` leaves HALF_OPEN and lets the next request probe.
  Results of requests admitted before the circuit opened are ignored while it is not CLOSED.
  Any other move raises ``IllegalTransition``.

Limit saturation: a request rejected by a limit marks that limit saturated until
a release brings its count below the maximum again, so "open under overload,
closed after" is observable on the ``state`` gauge.

Concurrency: none; all calls come from the event loop thread.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from mypy_extensions import mypyc_attr

from meshproxy.config.model import CircuitBreaker
from meshproxy.core.clock import Clock
from meshproxy.core.flags import Flag


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Event(enum.Enum):
    TRIP = "trip"
    PROBE = "probe"
    PROBE_SUCCEEDED = "probe_succeeded"
    PROBE_FAILED = "probe_failed"
    RESET = "reset"


TRANSITIONS: Mapping[tuple[State, Event], State] = MappingProxyType(
    {
        (State.CLOSED, Event.TRIP): State.OPEN,
        (State.OPEN, Event.PROBE): State.HALF_OPEN,
        (State.HALF_OPEN, Event.PROBE_SUCCEEDED): State.CLOSED,
        (State.HALF_OPEN, Event.PROBE_FAILED): State.OPEN,
        (State.CLOSED, Event.RESET): State.CLOSED,
        (State.OPEN, Event.RESET): State.CLOSED,
        (State.HALF_OPEN, Event.RESET): State.CLOSED,
    }
)


@mypyc_attr(native_class=False)  # an exception: see meshproxy.compiled
class IllegalTransition(RuntimeError):
    """A bug: the breaker was asked to make a move its state machine does not have."""

    def __init__(self, state: State, event: Event) -> None:
        super().__init__(f"illegal circuit breaker transition: {event.value} in state {state.value}")
        self.state = state
        self.event = event


class Limit(enum.Enum):
    CONNECTIONS = "max_connections"
    PENDING = "max_pending_requests"
    REQUESTS = "max_requests"
    RETRIES = "max_retries"


# Counts and maxima live in lists indexed by these, not in dicts keyed by ``Limit``: an enum
# member's ``__hash__`` is Python code, and every request acquires and releases twice.
_INDEX: Mapping[Limit, int] = MappingProxyType({limit: i for i, limit in enumerate(Limit)})
_CONNECTIONS, _PENDING, _REQUESTS, _RETRIES = (_INDEX[limit] for limit in Limit)
_LIMITS = tuple(Limit)


def _maxima(p: CircuitBreaker) -> list[int]:
    out = [0] * len(_LIMITS)
    out[_CONNECTIONS] = p.max_connections
    out[_PENDING] = p.max_pending_requests
    out[_REQUESTS] = p.max_requests
    out[_RETRIES] = p.max_retries
    return out


@dataclass(frozen=True, slots=True)
class Admission:
    ok: bool
    flag: Flag | None = None  # UO (a limit) or CO (circuit open) when rejected
    limit: Limit | None = None  # which limit rejected, for UO
    reason: str = ""  # human detail for x-meshproxy-reason, e.g. "max_requests=100 reached"
    probe: bool = False  # this request is the half-open probe

    def __bool__(self) -> bool:
        return self.ok


ADMITTED = Admission(ok=True)
_PROBE = Admission(ok=True, probe=True)


class Breaker:
    """Limits and failure accrual for one service (see module doc)."""

    __slots__ = (
        "_accrual",
        "_clock",
        "_counts",
        "_failures",
        "_maxima",
        "_open_until",
        "_policy",
        "_probe_out",
        "_rejections",
        "_reopens",
        "_saturated",
        "key",
    )

    def __init__(self, key: str, policy: CircuitBreaker, clock: Clock) -> None:
        self.key = key
        self._clock = clock
        self._policy = policy
        self._counts = [0] * len(_LIMITS)
        self._maxima = _maxima(policy)
        self._saturated: set[int] = set()  # indexes of saturated limits
        self._accrual = State.CLOSED
        self._failures = 0
        self._open_until = 0.0
        self._reopens = 0
        self._probe_out = False
        self._rejections: dict[str, int] = {}

    # -- policy and state ------------------------------------------------------------------------

    def update_policy(self, policy: CircuitBreaker) -> None:
        self._policy = policy
        self._maxima = _maxima(policy)
        if policy.consecutive_failures <= 0:
            self._transition(Event.RESET)
            self._failures = 0
            self._reopens = 0
            self._probe_out = False
        for i in list(self._saturated):
            if self._counts[i] < self._maxima[i]:
                self._saturated.discard(i)

    @property
    def policy(self) -> CircuitBreaker:
        return self._policy

    @property
    def accrual_state(self) -> State:
        return self._accrual

    @property
    def state(self) -> State:
        if self._accrual is not State.CLOSED:
            return self._accrual
        return State.OPEN if self._saturated else State.CLOSED

    @property
    def open_until(self) -> float | None:
        return self._open_until if self._accrual is State.OPEN else None

    @property
    def rejections(self) -> Mapping[str, int]:
        return dict(self._rejections)

    def count(self, limit: Limit) -> int:
        return self._counts[_INDEX[limit]]

    def _transition(self, event: Event) -> State:
        new = TRANSITIONS.get((self._accrual, event))
        if new is None:
            raise IllegalTransition(self._accrual, event)
        self._accrual = new
        return new

    def _open(self) -> None:
        p = self._policy
        duration = min(p.open_duration * (2**self._reopens), p.max_open_duration)
        self._open_until = self._clock.now() + duration
        self._reopens = min(self._reopens + 1, 32)

    # -- limits ------------------------------------------------------------------------------

    def _reject(self, reason_key: str, admission: Admission) -> Admission:
        self._rejections[reason_key] = self._rejections.get(reason_key, 0) + 1
        return admission

    def _acquire(self, i: int) -> Admission:
        maximum = self._maxima[i]
        if self._counts[i] >= maximum:
            self._saturated.add(i)
            limit = _LIMITS[i]
            return self._reject(
                limit.value,
                Admission(
                    ok=False,
                    flag=Flag.UO,
                    limit=limit,
                    reason=f"{self.key}: {limit.value}={maximum} reached",
                ),
            )
        self._counts[i] += 1
        return ADMITTED

    def _release(self, i: int) -> None:
        counts = self._counts
        if counts[i] > 0:
            counts[i] -= 1
        if self._saturated and i in self._saturated and counts[i] < self._maxima[i]:
            self._saturated.discard(i)

    # -- requests ----------------------------------------------------------------------------

    def try_acquire_request(self) -> Admission:
        probe = False
        if self._accrual is State.OPEN:
            if self._clock.now() < self._open_until:
                return self._circuit_open("circuit open")
            probe = True
        elif self._accrual is State.HALF_OPEN:
            if self._probe_out:
                return self._circuit_open("circuit half-open, probe in flight")
            probe = True
        admission = self._acquire(_REQUESTS)
        if not admission.ok or not probe:
            return admission
        if self._accrual is State.OPEN:
            self._transition(Event.PROBE)
        self._probe_out = True
        return _PROBE

    def _circuit_open(self, what: str) -> Admission:
        return self._reject(
            "circuit_open",
            Admission(
                ok=False,
                flag=Flag.CO,
                reason=f"{self.key}: {what} after {self._policy.consecutive_failures} consecutive failures",
            ),
        )

    def release_request(self, admission: Admission, success: bool | None = None) -> None:
        """End an admitted request. Releasing a rejected admission is a no-op."""
        if not admission.ok:
            return
        self._release(_REQUESTS)
        if self._policy.consecutive_failures <= 0:
            return
        if admission.probe:
            self._probe_out = False
            if self._accrual is not State.HALF_OPEN or success is None:
                return
            if success:
                self._transition(Event.PROBE_SUCCEEDED)
                self._failures = 0
                self._reopens = 0
            else:
                self._transition(Event.PROBE_FAILED)
                self._open()
            return
        if self._accrual is not State.CLOSED or success is None:
            return
        if success:
            self._failures = 0
            return
        self._failures += 1
        if self._failures >= self._policy.consecutive_failures:
            self._failures = 0
            self._transition(Event.TRIP)
            self._open()

    def try_acquire_pending(self) -> Admission:
        return self._acquire(_PENDING)

    def release_pending(self) -> None:
        self._release(_PENDING)

    def try_acquire_retry(self) -> Admission:
        return self._acquire(_RETRIES)

    def release_retry(self) -> None:
        self._release(_RETRIES)

    def try_acquire_connection(self) -> Admission:
        return self._acquire(_CONNECTIONS)

    def release_connection(self) -> None:
        self._release(_CONNECTIONS)
