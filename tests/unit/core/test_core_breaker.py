"""Circuit breaker: Envoy-style limits and the failure-accrual state machine, on a fake clock."""

from __future__ import annotations

import pytest

from meshproxy.config.model import CircuitBreaker
from meshproxy.core.breaker import TRANSITIONS, Breaker, Event, IllegalTransition, Limit, State
from meshproxy.core.clock import FakeClock
from meshproxy.core.flags import Flag

ACCRUAL = CircuitBreaker(consecutive_failures=3, open_duration=5.0, max_open_duration=12.0)


def make(policy: CircuitBreaker = ACCRUAL) -> tuple[Breaker, FakeClock]:
    clock = FakeClock()
    return Breaker("inventory.demo:8080", policy, clock), clock


def run(b: Breaker, success: bool | None) -> bool:
    """One request through the breaker; True if it was admitted."""
    adm = b.try_acquire_request()
    if adm.ok:
        b.release_request(adm, success)
    return adm.ok


def trip(b: Breaker) -> None:
    for _ in range(b.policy.consecutive_failures):
        assert run(b, False)


def test_max_requests_rejects_with_uo_and_state_shows_overload() -> None:
    b, _ = make(CircuitBreaker(max_requests=2))
    a1, a2 = b.try_acquire_request(), b.try_acquire_request()
    assert a1 and a2 and b.state is State.CLOSED
    rejected = b.try_acquire_request()
    assert not rejected and rejected.flag is Flag.UO and rejected.limit is Limit.REQUESTS
    assert "max_requests=2" in rejected.reason and "inventory.demo:8080" in rejected.reason
    assert b.state is State.OPEN  # saturated: open under overload
    assert b.accrual_state is State.CLOSED
    b.release_request(a1, True)
    assert b.state is State.CLOSED  # ... closed after
    assert b.try_acquire_request().ok
    assert b.rejections == {"max_requests": 1}
    b.release_request(rejected)  # releasing a rejection is a no-op
    assert b.count(Limit.REQUESTS) == 2


@pytest.mark.parametrize(
    ("limit", "acquire", "release", "policy"),
    [
        (Limit.PENDING, "try_acquire_pending", "release_pending", CircuitBreaker(max_pending_requests=1)),
        (Limit.RETRIES, "try_acquire_retry", "release_retry", CircuitBreaker(max_retries=1)),
        (
            Limit.CONNECTIONS,
            "try_acquire_connection",
            "release_connection",
            CircuitBreaker(max_connections=1),
        ),
    ],
)
def test_other_limits(limit: Limit, acquire: str, release: str, policy: CircuitBreaker) -> None:
    b, _ = make(policy)
    assert getattr(b, acquire)().ok
    adm = getattr(b, acquire)()
    assert not adm.ok and adm.flag is Flag.UO and adm.limit is limit
    assert b.state is State.OPEN
    getattr(b, release)()
    assert b.state is State.CLOSED and getattr(b, acquire)().ok


def test_zero_limit_rejects_everything() -> None:
    b, _ = make(CircuitBreaker(max_retries=0))
    assert not b.try_acquire_retry().ok


def test_closed_to_open_after_consecutive_failures() -> None:
    b, clock = make()
    assert run(b, False) and run(b, False) and run(b, True)  # success resets the count
    assert run(b, False) and run(b, False)
    assert b.state is State.CLOSED
    assert run(b, False)
    assert b.state is State.OPEN and b.open_until == 5.0
    adm = b.try_acquire_request()
    assert not adm.ok and adm.flag is Flag.CO and adm.limit is None and "circuit open" in adm.reason
    clock.advance(4.99)
    assert not run(b, True)


def test_open_to_half_open_single_probe_then_closed() -> None:
    b, clock = make()
    trip(b)
    clock.advance(5.0)
    probe = b.try_acquire_request()
    assert probe.ok and probe.probe and b.state is State.HALF_OPEN
    other = b.try_acquire_request()
    assert not other.ok and other.flag is Flag.CO  # only one probe at a time
    b.release_request(probe, True)
    assert b.state is State.CLOSED
    assert run(b, True) and run(b, True)


def test_probe_failure_reopens_with_doubling_duration_capped() -> None:
    b, clock = make()
    trip(b)  # open for 5
    durations = []
    for _ in range(3):
        until = b.open_until
        assert until is not None
        clock.set(until)
        probe = b.try_acquire_request()
        assert probe.probe
        b.release_request(probe, False)
        assert b.state is State.OPEN
        reopened = b.open_until
        assert reopened is not None
        durations.append(reopened - clock.now())
    assert durations == [10.0, 12.0, 12.0]
    # A successful probe closes and resets the doubling.
    until = b.open_until
    assert until is not None
    clock.set(until)
    probe = b.try_acquire_request()
    b.release_request(probe, True)
    assert b.state is State.CLOSED
    trip(b)
    assert b.open_until == clock.now() + 5.0


def test_abandoned_probe_lets_the_next_request_probe() -> None:
    b, clock = make()
    trip(b)
    clock.advance(5)
    probe = b.try_acquire_request()
    b.release_request(probe, None)  # cancelled: no verdict
    assert b.state is State.HALF_OPEN
    second = b.try_acquire_request()
    assert second.ok and second.probe
    b.release_request(second, True)
    assert b.state is State.CLOSED


def test_results_of_old_requests_do_not_decide_the_probe() -> None:
    b, clock = make()
    old = b.try_acquire_request()
    trip(b)
    clock.advance(5)
    probe = b.try_acquire_request()
    b.release_request(old, True)  # admitted while closed: ignored
    assert b.state is State.HALF_OPEN
    b.release_request(probe, False)
    assert b.state is State.OPEN


def test_accrual_off_by_default_and_reset_by_policy_update() -> None:
    b, _ = make(CircuitBreaker())
    for _ in range(100):
        assert run(b, False)
    b2, _ = make()
    trip(b2)
    assert b2.state is State.OPEN
    b2.update_policy(CircuitBreaker(consecutive_failures=0))
    assert b2.state is State.CLOSED and run(b2, False)


def test_limit_saturation_clears_when_policy_raises_the_limit() -> None:
    b, _ = make(CircuitBreaker(max_requests=1))
    b.try_acquire_request()
    assert not b.try_acquire_request().ok and b.state is State.OPEN
    b.update_policy(CircuitBreaker(max_requests=10))
    assert b.state is State.CLOSED


def test_transition_table_rejects_illegal_moves() -> None:
    b, _ = make()
    legal = set(TRANSITIONS)
    for state in State:
        for event in Event:
            b._accrual = state
            if (state, event) in legal:
                assert b._transition(event) is TRANSITIONS[(state, event)]
            else:
                with pytest.raises(IllegalTransition):
                    b._transition(event)
    assert (State.CLOSED, Event.PROBE) not in legal
    assert (State.OPEN, Event.PROBE_SUCCEEDED) not in legal
