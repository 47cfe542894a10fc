"""Clock, token bucket and fault-injection decisions (fake clock, seeded Random)."""

from __future__ import annotations

import random

import pytest

from meshproxy.config.model import FaultInjection, RateLimit
from meshproxy.core.clock import FakeClock, MonotonicClock
from meshproxy.core.fault import NO_FAULT, decide
from meshproxy.core.ratelimit import TokenBucket


def test_fake_clock_moves_only_forward() -> None:
    clock = FakeClock(10.0)
    clock.advance(0.5)
    assert clock.now() == 10.5
    with pytest.raises(ValueError):
        clock.advance(-1)
    with pytest.raises(ValueError):
        clock.set(1.0)
    clock.set(20.0)
    assert clock.now() == 20.0


def test_monotonic_clock_does_not_go_back() -> None:
    c = MonotonicClock()
    a = c.now()
    assert c.now() >= a


def test_bucket_allows_burst_then_refills_at_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10, burst=5, clock=clock)
    assert [bucket.try_acquire() for _ in range(6)] == [True] * 5 + [False]
    clock.advance(0.1)  # one token back
    assert bucket.try_acquire()
    assert not bucket.try_acquire()
    clock.advance(100)  # refill is capped at burst
    assert bucket.available == 5
    assert sum(bucket.try_acquire() for _ in range(10)) == 5


def test_bucket_from_policy_and_multi_token_acquire() -> None:
    clock = FakeClock()
    bucket = TokenBucket.from_policy(RateLimit(requests_per_second=2, burst=3), clock)
    assert not bucket.try_acquire(4)
    assert bucket.try_acquire(3)
    assert not bucket.try_acquire()
    clock.advance(0.5)
    assert bucket.try_acquire()


def test_bucket_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=-1, burst=1, clock=FakeClock())
    with pytest.raises(ValueError):
        TokenBucket(rate=1, burst=0, clock=FakeClock())


def test_fault_none_and_zero_percent_never_fire() -> None:
    rng = random.Random(1)
    assert decide(None, rng) is NO_FAULT
    f = FaultInjection(delay_percent=0, delay=1.0, abort_percent=0)
    assert all(decide(f, rng) == NO_FAULT for _ in range(1000))


def test_fault_hundred_percent_always_fires() -> None:
    f = FaultInjection(delay_percent=100, delay=0.2, abort_percent=100, abort_status=418)
    d = decide(f, random.Random(1))
    assert d.delay == 0.2 and d.abort_status == 418 and d.active


def test_fault_percentages_are_honoured_statistically() -> None:
    rng = random.Random(42)
    f = FaultInjection(delay_percent=30, delay=0.1, abort_percent=10, abort_status=503)
    n = 10_000
    decisions = [decide(f, rng) for _ in range(n)]
    delayed = sum(d.delay > 0 for d in decisions)
    aborted = sum(d.abort_status is not None for d in decisions)
    # Binomial: sd = sqrt(n p (1-p)) ~ 46 for 30%, 30 for 10%; allow 5 sd.
    assert abs(delayed - 3000) < 5 * 46
    assert abs(aborted - 1000) < 5 * 30
