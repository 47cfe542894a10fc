"""Retry decisions, full-jitter backoff and the sliding-window retry budget."""

from __future__ import annotations

import random

import pytest

from meshproxy.config.model import RetryBudget, RetryPolicy
from meshproxy.core.clock import FakeClock
from meshproxy.core.outlier import Outcome
from meshproxy.core.retry import RetryBudgetState, backoff, should_retry

ALL = RetryPolicy(
    attempts=2,
    retry_on=frozenset({"connect-failure", "reset", "5xx", "unavailable", "retriable-status-codes"}),
    status_codes=frozenset({409}),
)


def decide(
    policy: RetryPolicy | None = ALL,
    method: str = "GET",
    outcome: Outcome = Outcome.HTTP_5XX,
    status: int | None = 500,
    grpc_status: int | None = None,
    attempt: int = 1,
    replayable: bool = True,
    budget: RetryBudgetState | None = None,
) -> bool:
    return should_retry(policy, method, outcome, status, grpc_status, attempt, replayable, budget)


def test_status_retries_only_for_idempotent_methods() -> None:
    for method in ("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"):
        assert decide(method=method), method
    for method in ("POST", "PATCH"):
        assert not decide(method=method), method
    assert not decide(method="POST", outcome=Outcome.RESET, status=None)


def test_connect_failure_retries_any_method_even_unreplayable() -> None:
    assert decide(method="POST", outcome=Outcome.CONNECT_FAILURE, status=None, replayable=False)
    no_cf = RetryPolicy(retry_on=frozenset({"reset", "retriable-status-codes", "unavailable"}))
    assert not decide(no_cf, outcome=Outcome.CONNECT_FAILURE, status=None)
    # Envoy's reading: 5xx and gateway-error also cover a connection that could not be made.
    for cond in ("5xx", "gateway-error"):
        assert decide(RetryPolicy(retry_on=frozenset({cond})), outcome=Outcome.CONNECT_FAILURE, status=None)


def test_no_response_conditions() -> None:
    def on(*conds: str) -> RetryPolicy:
        return RetryPolicy(retry_on=frozenset(conds))

    assert decide(on("reset"), outcome=Outcome.RESET, status=None)
    assert decide(on("5xx"), outcome=Outcome.RESET, status=None)
    assert not decide(on("gateway-error"), outcome=Outcome.RESET, status=None)
    for cond in ("reset", "5xx", "gateway-error"):
        assert decide(on(cond), outcome=Outcome.TIMEOUT, status=None), cond
    assert not decide(on("connect-failure"), outcome=Outcome.TIMEOUT, status=None)
    assert not decide(on("reset"), method="POST", outcome=Outcome.TIMEOUT, status=None)


def test_conditions_select_statuses() -> None:
    gw = RetryPolicy(retry_on=frozenset({"gateway-error"}))
    assert decide(gw, outcome=Outcome.GATEWAY_ERROR, status=503)
    assert not decide(gw, outcome=Outcome.HTTP_5XX, status=500)
    assert decide(gw, outcome=Outcome.TIMEOUT, status=None)  # per-try timeout counts as 504
    assert decide(ALL, outcome=Outcome.SUCCESS, status=409)  # retriable-status-codes
    assert not decide(ALL, outcome=Outcome.SUCCESS, status=404)
    assert not decide(RetryPolicy(retry_on=frozenset({"reset"})), outcome=Outcome.HTTP_5XX, status=500)


def test_attempts_bound() -> None:
    assert decide(attempt=1) and decide(attempt=2)
    assert not decide(attempt=3)
    assert not decide(RetryPolicy(attempts=0), outcome=Outcome.CONNECT_FAILURE, status=None)
    assert not decide(None)


def test_grpc_unavailable_any_method() -> None:
    assert decide(method="POST", outcome=Outcome.SUCCESS, status=200, grpc_status=14)
    assert not decide(method="POST", outcome=Outcome.SUCCESS, status=200, grpc_status=13)
    no_unavail = RetryPolicy(retry_on=frozenset({"5xx"}))
    assert not decide(no_unavail, method="POST", outcome=Outcome.SUCCESS, status=200, grpc_status=14)


def test_unreplayable_body_and_local_outcomes_are_never_retried() -> None:
    assert not decide(replayable=False)
    assert not decide(outcome=Outcome.LOCAL, status=None)


def test_budget_floor_then_ratio() -> None:
    clock = FakeClock()
    budget = RetryBudgetState(RetryBudget(ratio=0.2, min_per_second=1.0, window=10.0), clock)
    # No traffic yet: the floor allows min_per_second * window = 10 retries.
    assert sum(budget.try_withdraw() for _ in range(20)) == 10
    assert not decide(outcome=Outcome.CONNECT_FAILURE, status=None, budget=budget)
    # 100 requests deposit 20 more retries.
    for _ in range(100):
        budget.deposit()
    assert sum(budget.try_withdraw() for _ in range(50)) == 20


def test_budget_window_slides() -> None:
    clock = FakeClock()
    budget = RetryBudgetState(RetryBudget(ratio=0.5, min_per_second=0.0, window=10.0), clock)
    for _ in range(10):
        budget.deposit()
    assert sum(budget.try_withdraw() for _ in range(10)) == 5
    clock.advance(5)
    assert not budget.try_withdraw()  # still within the window
    clock.advance(6)  # deposits and withdrawals have left the window
    assert budget.available == 0
    for _ in range(4):
        budget.deposit()
    assert budget.try_withdraw() and budget.try_withdraw() and not budget.try_withdraw()


def test_budget_is_only_spent_on_yes() -> None:
    clock = FakeClock()
    budget = RetryBudgetState(RetryBudget(ratio=0.0, min_per_second=0.1, window=10.0), clock)  # 1 retry
    assert not decide(method="POST", budget=budget)  # "no" for another reason: not spent
    assert decide(budget=budget)
    assert not decide(budget=budget)


def test_budget_update_changes_allowance() -> None:
    clock = FakeClock()
    budget = RetryBudgetState(RetryBudget(ratio=0, min_per_second=0, window=10), clock)
    assert not budget.try_withdraw()
    budget.update(RetryBudget(ratio=0, min_per_second=1, window=10))
    assert budget.try_withdraw()


def test_backoff_full_jitter_bounds() -> None:
    policy = RetryPolicy(backoff_base=0.025, backoff_max=0.25)
    rng = random.Random(9)
    for attempt, ceiling in ((1, 0.025), (2, 0.05), (3, 0.1), (4, 0.2), (5, 0.25), (50, 0.25)):
        samples = [backoff(policy, attempt, rng) for _ in range(500)]
        assert all(0 <= s <= ceiling for s in samples)
        assert max(samples) > 0.8 * ceiling  # actually spreads over the range
        assert min(samples) < 0.2 * ceiling


@pytest.mark.parametrize("attempt", [0, -1])
def test_backoff_degenerate_attempts(attempt: int) -> None:
    assert 0 <= backoff(RetryPolicy(), attempt, random.Random(1)) <= 0.025
