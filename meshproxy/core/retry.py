"""Retry decisions: which failures are retried, how long to back off, and the retry budget.

Owns: ``should_retry`` (pure decision per failed attempt), ``backoff`` (full
jitter exponential), and ``RetryBudgetState`` (runtime, one per destination
service, kept by the shell across snapshot swaps).

API:
    RetryBudgetState(budget: model.RetryBudget, clock)
        .deposit()           once per original request (not per retry)
        .try_withdraw() -> bool   once per retry; False: budget exhausted (flag URX)
        .update(budget);  .available -> float
    should_retry(policy, method, outcome, status, grpc_status, attempt, body_replayable, budget) -> bool
    backoff(policy, attempt, rng) -> float
    IDEMPOTENT_METHODS, RETRY_CONDITIONS, GRPC_CONDITIONS

Rules of ``should_retry`` (``attempt`` is the 1-based number of the try that
just failed; there are at most ``policy.attempts`` retries, so a retry is
allowed while ``attempt <= policy.attempts``):
  * CONNECT_FAILURE (under ``connect-failure``, ``5xx`` or ``gateway-error``):
    any method, and even a non-replayable body, because nothing was sent (the
    caller must not have consumed the body yet).
  * Idempotent methods only (GET HEAD OPTIONS PUT DELETE TRACE), because the
    upstream may have acted on the request: RESET (under ``reset`` or ``5xx``),
    a per-try TIMEOUT (under ``reset``, ``5xx`` or ``gateway-error``), and
    statuses: ``5xx`` (500-599), ``gateway-error`` (502/503/504),
    ``retriable-status-codes`` (``policy.status_codes``). As in Envoy, ``5xx``
    includes "no response at all".
  * gRPC conditions ``unavailable`` (14) and also ``cancelled`` (1),
    ``deadline-exceeded`` (4), ``resource-exhausted`` (8), ``internal`` (13) if
    listed: any method (gRPC is always POST; the condition is the user's opt-in).
  * A body that cannot be replayed (streamed past ``max_body_bytes``) is never retried,
    except after a connect failure.
  * The budget is consulted last and only when everything else says yes, so a
    "no" for other reasons never burns a token.

Budget (Linkerd/Finagle): over the sliding ``window``, retries may not exceed
``ratio * requests + min_per_second * window``. The window is kept in 10 time
slots (memory bounded, precision window/10).

Concurrency: none; the budget is used from the event loop thread only.
"""

from __future__ import annotations

import random

from meshproxy.config.model import RetryBudget, RetryPolicy
from meshproxy.core.clock import Clock
from meshproxy.core.outlier import Outcome

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
GRPC_CONDITIONS: dict[str, int] = {
    "cancelled": 1,
    "deadline-exceeded": 4,
    "resource-exhausted": 8,
    "internal": 13,
    "unavailable": 14,
}
RETRY_CONDITIONS = frozenset(
    {"connect-failure", "reset", "5xx", "gateway-error", "retriable-status-codes", *GRPC_CONDITIONS}
)

# Which conditions cover failures without an upstream status (Envoy's reading: "5xx" also means
# "did not respond at all"; a connect failure is answered as 503, so gateway-error covers it).
_ON_CONNECT_FAILURE = frozenset({"connect-failure", "5xx", "gateway-error"})
_ON_RESET = frozenset({"reset", "5xx"})
_ON_TIMEOUT = frozenset({"reset", "5xx", "gateway-error"})

_SLOTS = 10


class RetryBudgetState:
    """Sliding-window retry budget for one service (see module doc)."""

    __slots__ = ("_budget", "_clock", "_deposits", "_slot_len", "_slot_start", "_withdrawals")

    def __init__(self, budget: RetryBudget, clock: Clock) -> None:
        self._clock = clock
        self._budget = budget
        self._slot_len = max(budget.window, 1e-3) / _SLOTS
        self._deposits = [0] * _SLOTS
        self._withdrawals = [0] * _SLOTS
        self._slot_start = clock.now()  # start time of the current (last) slot

    @property
    def budget(self) -> RetryBudget:
        return self._budget

    def update(self, budget: RetryBudget) -> None:
        if budget == self._budget:
            return
        window_changed = budget.window != self._budget.window
        self._budget = budget
        if window_changed:  # slot length changes: start afresh rather than misattribute history
            self._slot_len = max(budget.window, 1e-3) / _SLOTS
            self._deposits = [0] * _SLOTS
            self._withdrawals = [0] * _SLOTS
            self._slot_start = self._clock.now()

    def _advance(self) -> None:
        now = self._clock.now()
        steps = int((now - self._slot_start) // self._slot_len)
        if steps <= 0:
            return
        if steps >= _SLOTS:
            self._deposits = [0] * _SLOTS
            self._withdrawals = [0] * _SLOTS
        else:
            self._deposits = self._deposits[steps:] + [0] * steps
            self._withdrawals = self._withdrawals[steps:] + [0] * steps
        self._slot_start += steps * self._slot_len

    def deposit(self) -> None:
        """Count one original request."""
        self._advance()
        self._deposits[-1] += 1

    @property
    def available(self) -> float:
        """Retries still allowed in the current window."""
        self._advance()
        b = self._budget
        allowance = b.ratio * sum(self._deposits) + b.min_per_second * b.window
        return max(0.0, allowance - sum(self._withdrawals))

    def try_withdraw(self) -> bool:
        """Take one retry from the budget; False if it is exhausted."""
        if self.available >= 1.0:
            self._withdrawals[-1] += 1
            return True
        return False


def _status_condition(policy: RetryPolicy, status: int) -> bool:
    on = policy.retry_on
    if "5xx" in on and 500 <= status <= 599:
        return True
    if "gateway-error" in on and status in (502, 503, 504):
        return True
    return "retriable-status-codes" in on and status in policy.status_codes


def should_retry(
    policy: RetryPolicy | None,
    method: str,
    outcome: Outcome,
    status: int | None,
    grpc_status: int | None,
    attempt: int,
    body_replayable: bool,
    budget: RetryBudgetState | None,
) -> bool:
    """May the failed try number ``attempt`` be retried? (see module doc)."""
    # Any outcome but LOCAL may be retried: even SUCCESS (a response arrived) can carry a
    # retriable status or grpc-status, which is checked below.
    if policy is None or outcome is Outcome.LOCAL or attempt > policy.attempts:
        return False
    on = policy.retry_on
    idempotent = method.upper() in IDEMPOTENT_METHODS
    wanted = False
    if outcome is Outcome.CONNECT_FAILURE:
        wanted = bool(on & _ON_CONNECT_FAILURE)
    elif body_replayable:
        if grpc_status is not None and any(
            GRPC_CONDITIONS[c] == grpc_status for c in on if c in GRPC_CONDITIONS
        ):
            wanted = True
        elif idempotent:
            if outcome is Outcome.RESET:
                wanted = bool(on & _ON_RESET)
            elif outcome is Outcome.TIMEOUT:
                wanted = bool(on & _ON_TIMEOUT)
            elif status is not None:
                wanted = _status_condition(policy, status)
    if not wanted:
        return False
    return budget is None or budget.try_withdraw()


def backoff(policy: RetryPolicy, attempt: int, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(backoff_max, backoff_base * 2**(attempt-1))]."""
    exp = min(max(attempt - 1, 0), 62)
    ceiling = min(policy.backoff_max, policy.backoff_base * (2.0**exp))
    return rng.uniform(0.0, max(ceiling, 0.0))
