"""Outlier detection for one endpoint: consecutive-error counters and ejection arithmetic.

Owns: ``Outcome`` (how one upstream attempt ended, as reported by the
pipeline), ``OutlierState`` (per-endpoint mutable counters, owned by an
``EndpointPool``) and the pure rules deciding when an endpoint is ejected and
for how long (Envoy's outlier detection, without timers).

API:
    Outcome                      SUCCESS, HTTP_5XX, GATEWAY_ERROR, CONNECT_FAILURE, RESET, TIMEOUT, LOCAL
    outcome_for_status(status)   SUCCESS, HTTP_5XX (500, 501, 505..) or GATEWAY_ERROR (502, 503, 504)
    EjectReason                  which threshold tripped
    OutlierState                 counters + ejection state of one endpoint
    state.record(outcome, policy) -> EjectReason | None
    ejection_duration(policy, multiplier) -> float
    may_eject(ejected, total, max_percent) -> bool

Which outcomes count (Envoy with locally originated errors not split):
    consecutive_5xx              HTTP_5XX, GATEWAY_ERROR, CONNECT_FAILURE, RESET, TIMEOUT
    consecutive_gateway_errors   GATEWAY_ERROR, CONNECT_FAILURE, RESET, TIMEOUT
    consecutive_connect_failures CONNECT_FAILURE
  SUCCESS resets all three counters. LOCAL (the proxy or the client gave up,
  e.g. downstream disconnect or whole-request timeout) neither counts nor resets,
  because it says nothing about the endpoint. A threshold of 0 is disabled.

Ejection: the n-th ejection (n = multiplier after increment) lasts
``base_ejection_time * n`` capped at ``max_ejection_time``. The multiplier
decays back to 0 once an endpoint has stayed un-ejected for ``max_ejection_time``
(Envoy decrements it per healthy interval; a lazy reset gives the same bound
without a timer). Ejection is allowed while ``100 * ejected / total <
max_ejection_percent`` (Envoy's rule, evaluated before the new ejection).

Concurrency: none; mutated from the event loop thread only.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from meshproxy.config.model import OutlierDetection


class Outcome(enum.Enum):
    SUCCESS = "success"
    HTTP_5XX = "http_5xx"  # a 5xx other than 502/503/504
    GATEWAY_ERROR = "gateway_error"  # 502, 503, 504 from upstream
    CONNECT_FAILURE = "connect_failure"
    RESET = "reset"  # connection/stream reset before a complete response
    TIMEOUT = "timeout"  # per-try timeout waiting for the upstream
    LOCAL = "local"  # ended for a reason not attributable to the endpoint


_COUNTS_5XX = frozenset(
    {Outcome.HTTP_5XX, Outcome.GATEWAY_ERROR, Outcome.CONNECT_FAILURE, Outcome.RESET, Outcome.TIMEOUT}
)
_COUNTS_GATEWAY = frozenset({Outcome.GATEWAY_ERROR, Outcome.CONNECT_FAILURE, Outcome.RESET, Outcome.TIMEOUT})


def outcome_for_status(status: int) -> Outcome:
    if status in (502, 503, 504):
        return Outcome.GATEWAY_ERROR
    if 500 <= status <= 599:
        return Outcome.HTTP_5XX
    return Outcome.SUCCESS


class EjectReason(enum.Enum):
    CONSECUTIVE_5XX = "consecutive_5xx"
    CONSECUTIVE_GATEWAY_ERRORS = "consecutive_gateway_errors"
    CONSECUTIVE_CONNECT_FAILURES = "consecutive_connect_failures"


@dataclass(slots=True)
class OutlierState:
    """Mutable per-endpoint outlier state; lives in an ``EndpointPool`` across snapshot swaps."""

    consecutive_5xx: int = 0
    consecutive_gateway_errors: int = 0
    consecutive_connect_failures: int = 0
    ejected_until: float | None = None
    times_ejected: int = 0  # total, for /clusters
    multiplier: int = 0  # drives the ejection duration; decays (see module doc)
    returned_at: float | None = None  # when the last ejection ended

    @property
    def consecutive_failures(self) -> int:
        """The largest running counter, for /clusters."""
        return max(self.consecutive_5xx, self.consecutive_gateway_errors, self.consecutive_connect_failures)

    def is_ejected(self, now: float) -> bool:
        return self.ejected_until is not None and now < self.ejected_until

    def record(self, outcome: Outcome, policy: OutlierDetection) -> EjectReason | None:
        """Update counters; return the threshold that tripped (the caller decides whether to eject)."""
        if outcome is Outcome.LOCAL:
            return None
        if outcome is Outcome.SUCCESS:
            self.reset_counters()
            return None
        self.consecutive_5xx = self.consecutive_5xx + 1 if outcome in _COUNTS_5XX else 0
        self.consecutive_gateway_errors = (
            self.consecutive_gateway_errors + 1 if outcome in _COUNTS_GATEWAY else 0
        )
        self.consecutive_connect_failures = (
            self.consecutive_connect_failures + 1 if outcome is Outcome.CONNECT_FAILURE else 0
        )
        if 0 < policy.consecutive_connect_failures <= self.consecutive_connect_failures:
            return EjectReason.CONSECUTIVE_CONNECT_FAILURES
        if 0 < policy.consecutive_gateway_errors <= self.consecutive_gateway_errors:
            return EjectReason.CONSECUTIVE_GATEWAY_ERRORS
        if 0 < policy.consecutive_5xx <= self.consecutive_5xx:
            return EjectReason.CONSECUTIVE_5XX
        return None

    def reset_counters(self) -> None:
        self.consecutive_5xx = 0
        self.consecutive_gateway_errors = 0
        self.consecutive_connect_failures = 0

    def eject(self, now: float, policy: OutlierDetection) -> float:
        """Eject from ``now``; return the ejection's end time."""
        if self.returned_at is not None and now - self.returned_at >= policy.max_ejection_time:
            self.multiplier = 0
        self.multiplier += 1
        self.times_ejected += 1
        self.ejected_until = now + ejection_duration(policy, self.multiplier)
        self.reset_counters()
        return self.ejected_until

    def maybe_return(self, now: float) -> bool:
        """Un-eject if the ejection time is up; True if it just returned."""
        if self.ejected_until is not None and now >= self.ejected_until:
            self.ejected_until = None
            self.returned_at = now
            return True
        return False


def ejection_duration(policy: OutlierDetection, multiplier: int) -> float:
    return min(policy.base_ejection_time * max(multiplier, 1), policy.max_ejection_time)


def may_eject(ejected: int, total: int, max_percent: int) -> bool:
    """Envoy: another ejection is allowed while the ejected share is below ``max_percent``."""
    if total <= 0:
        return False
    return 100.0 * ejected / total < max_percent
