"""Endpoint pools: picking, P2C, state kept across updates, outlier ejection with a fake clock."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import pytest

from meshproxy.config.model import Endpoint, LbPolicy, OutlierDetection, TrafficPolicy
from meshproxy.core.balancer import EndpointPool
from meshproxy.core.clock import FakeClock
from meshproxy.core.outlier import EjectReason, Outcome, ejection_duration, may_eject, outcome_for_status

A = Endpoint("198.18.1.1", 8080, pod="a")
B = Endpoint("198.18.1.2", 8080, pod="b")
C = Endpoint("198.18.1.3", 8080, pod="c")
D = Endpoint("198.18.1.4", 8080, pod="d")

OD = OutlierDetection(
    consecutive_5xx=5,
    consecutive_gateway_errors=3,
    consecutive_connect_failures=2,
    base_ejection_time=30.0,
    max_ejection_time=75.0,
    max_ejection_percent=50,
)


def pool_of(
    *eps: Endpoint, lb: LbPolicy = LbPolicy.ROUND_ROBIN, od: OutlierDetection | None = OD, seed: int = 1
) -> tuple[EndpointPool, FakeClock]:
    clock = FakeClock()
    pool = EndpointPool(
        "svc.demo:8080", clock, random.Random(seed), eps, TrafficPolicy(lb=lb, outlier_detection=od)
    )
    return pool, clock


def fail(pool: EndpointPool, ep: Endpoint, outcome: Outcome, times: int) -> None:
    for _ in range(times):
        pool.on_request_start(ep)
        pool.on_request_end(ep, outcome)


def test_empty_pool_picks_nothing() -> None:
    pool, _ = pool_of()
    assert pool.pick() is None


def test_round_robin_cycles() -> None:
    pool, _ = pool_of(A, B, C)
    assert [pool.pick() for _ in range(6)] == [A, B, C, A, B, C]


def test_random_is_weighted() -> None:
    heavy = Endpoint("198.18.1.9", 8080, weight=3)
    pool, _ = pool_of(A, heavy, lb=LbPolicy.RANDOM, seed=5)
    counts = Counter(pool.pick() for _ in range(8000))
    # p = 0.75; sd = sqrt(8000 * .75 * .25) ~ 39; 5 sd.
    assert abs(counts[heavy] - 6000) < 5 * 39
    assert set(counts) == {A, heavy}


def test_p2c_prefers_the_less_loaded_endpoint() -> None:
    pool, _ = pool_of(A, B, lb=LbPolicy.LEAST_REQUEST)
    for _ in range(5):
        pool.on_request_start(A)
    # With two endpoints both are always sampled, so the idle one always wins.
    assert all(pool.pick() == B for _ in range(100))
    pool2, _ = pool_of(A, B, C, lb=LbPolicy.LEAST_REQUEST)
    for _ in range(3):
        pool2.on_request_start(A)
    picks = Counter(pool2.pick() for _ in range(3000))
    # A only wins if both samples are A, which P2C never does (distinct samples): never picked.
    assert picks[A] == 0 and picks[B] > 1000 and picks[C] > 1000


def test_p2c_ties_are_broken_randomly() -> None:
    pool, _ = pool_of(A, B, lb=LbPolicy.LEAST_REQUEST, seed=11)
    picks = Counter(pool.pick() for _ in range(2000))
    assert abs(picks[A] - 1000) < 5 * 23  # sd = sqrt(2000/4)


def test_not_ready_and_terminating_are_skipped_with_terminating_fallback() -> None:
    not_ready = Endpoint("198.18.1.5", 8080, ready=False, serving=False)
    draining = Endpoint("198.18.1.6", 8080, ready=False, serving=True, terminating=True)
    pool, _ = pool_of(A, not_ready, draining)
    assert {pool.pick() for _ in range(10)} == {A}
    pool.update([not_ready, draining], TrafficPolicy(lb=LbPolicy.ROUND_ROBIN))
    assert pool.pick() == draining  # only terminating+serving left: used
    gone = Endpoint("198.18.1.6", 8080, ready=False, serving=False, terminating=True)
    pool.update([not_ready, gone], TrafficPolicy())
    assert pool.pick() is None


def test_exclude_is_a_preference() -> None:
    pool, _ = pool_of(A, B)
    assert all(pool.pick(exclude={A}) == B for _ in range(5))
    assert pool.pick(exclude={("198.18.1.1", 8080), B}) in (A, B)
    single, _ = pool_of(A)
    assert single.pick(exclude={A}) == A


def test_update_keeps_state_and_survives_in_flight_removal() -> None:
    pool, _ = pool_of(A, B, lb=LbPolicy.LEAST_REQUEST)
    pool.on_request_start(A)
    pool.on_request_start(A)
    pool.on_request_start(B)
    fail(pool, B, Outcome.HTTP_5XX, 1)
    a_not_ready = Endpoint(A.address, A.port, ready=False)
    pool.update([a_not_ready, B, C], TrafficPolicy(lb=LbPolicy.LEAST_REQUEST))
    assert pool.in_flight(A) == 2 and pool.in_flight(B) == 1
    stats = {s.address: s for s in pool.stats()}
    assert stats[B.address].consecutive_failures == 1 and not stats[A.address].healthy
    # Remove A while its requests are in flight; ending them must not crash nor go negative.
    pool.update([B, C], TrafficPolicy())
    pool.on_request_end(A, Outcome.SUCCESS)
    assert pool.in_flight(A) == 1
    # A comes back while one request is still in flight: its count is kept.
    pool.update([A, B, C], TrafficPolicy())
    assert pool.in_flight(A) == 1
    pool.on_request_end(A, Outcome.SUCCESS)
    pool.on_request_end(A, Outcome.SUCCESS)  # one too many: clamped, no crash
    assert pool.in_flight(A) == 0
    pool.on_request_end(Endpoint("203.0.113.1", 1), Outcome.RESET)  # never known: no-op
    assert {s.address for s in pool.stats()} == {A.address, B.address, C.address}


def test_connect_failures_eject_and_endpoint_returns_after_its_time() -> None:
    pool, clock = pool_of(A, B, C, D)
    assert pool.ejected_count == 0
    fail(pool, A, Outcome.CONNECT_FAILURE, 2)
    assert pool.ejections_total == 1
    assert pool.ejected_count == 1
    assert pool.ejections_by_reason[EjectReason.CONSECUTIVE_CONNECT_FAILURES] == 1
    assert A not in {pool.pick() for _ in range(30)}
    st = {s.address: s for s in pool.stats()}[A.address]
    assert st.ejected_until == 30.0 and st.times_ejected == 1 and not st.healthy
    clock.advance(29.9)
    assert A not in {pool.pick() for _ in range(30)}
    remaining = {s.address: s for s in pool.stats()}[A.address].ejection_remaining
    assert remaining == pytest.approx(0.1)
    clock.advance(0.1)
    assert pool.ejected_count == 0  # the ejection ended by itself
    assert A in {pool.pick() for _ in range(30)}
    assert {s.address: s for s in pool.stats()}[A.address].ejected_until is None


def test_ejection_time_grows_and_is_capped() -> None:
    pool, clock = pool_of(A, B, C, D)
    ends = []
    for _ in range(4):
        start = clock.now()
        fail(pool, A, Outcome.GATEWAY_ERROR, 3)
        until = {s.address: s for s in pool.stats()}[A.address].ejected_until
        assert until is not None
        ends.append(until - start)
        clock.set(until)
    assert ends == [30.0, 60.0, 75.0, 75.0]


def test_multiplier_decays_after_a_long_healthy_period() -> None:
    pool, clock = pool_of(A, B, C, D)
    fail(pool, A, Outcome.CONNECT_FAILURE, 2)
    clock.advance(30)
    pool.pick()
    clock.advance(OD.max_ejection_time)
    fail(pool, A, Outcome.CONNECT_FAILURE, 2)
    until = {s.address: s for s in pool.stats()}[A.address].ejected_until
    assert until == clock.now() + 30.0


def test_success_resets_consecutive_counters() -> None:
    pool, _ = pool_of(A, B, C, D)
    fail(pool, A, Outcome.HTTP_5XX, 4)
    fail(pool, A, Outcome.SUCCESS, 1)
    fail(pool, A, Outcome.HTTP_5XX, 4)
    assert pool.ejections_total == 0
    fail(pool, A, Outcome.HTTP_5XX, 1)
    assert pool.ejections_total == 1


def test_local_outcomes_neither_count_nor_reset() -> None:
    pool, _ = pool_of(A, B, C, D)
    fail(pool, A, Outcome.CONNECT_FAILURE, 1)
    fail(pool, A, Outcome.LOCAL, 5)
    assert pool.ejections_total == 0
    fail(pool, A, Outcome.CONNECT_FAILURE, 1)
    assert pool.ejections_total == 1


def test_max_ejection_percent_is_respected() -> None:
    pool, _ = pool_of(A, B, C, D)  # 50% of 4: two may be ejected
    for ep in (A, B, C, D):
        fail(pool, ep, Outcome.CONNECT_FAILURE, 2)
    assert pool.ejections_total == 2
    assert sum(1 for s in pool.stats() if s.ejected_until is not None) == 2
    assert pool.pick() is not None
    two, _ = pool_of(A, B)  # 0% < 50% allows one, then 50% is not < 50%
    fail(two, A, Outcome.CONNECT_FAILURE, 2)
    fail(two, B, Outcome.CONNECT_FAILURE, 2)
    assert two.ejections_total == 1 and two.pick() is not None


def test_outlier_detection_off_never_ejects_and_lifts_ejections() -> None:
    pool, _ = pool_of(A, B, od=None)
    fail(pool, A, Outcome.CONNECT_FAILURE, 50)
    assert pool.ejections_total == 0
    pool2, _ = pool_of(A, B, C, D)
    fail(pool2, A, Outcome.CONNECT_FAILURE, 2)
    pool2.update([A, B, C, D], TrafficPolicy(lb=LbPolicy.ROUND_ROBIN, outlier_detection=None))
    assert A in {pool2.pick() for _ in range(8)}


def test_results_of_requests_in_flight_during_ejection_do_not_extend_it() -> None:
    pool, clock = pool_of(A, B, C, D)
    for _ in range(3):
        pool.on_request_start(A)
    pool.on_request_end(A, Outcome.CONNECT_FAILURE)
    pool.on_request_end(A, Outcome.CONNECT_FAILURE)
    clock.advance(1)
    pool.on_request_end(A, Outcome.CONNECT_FAILURE)
    assert pool.ejections_total == 1
    assert {s.address: s for s in pool.stats()}[A.address].ejected_until == 30.0


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(200, Outcome.SUCCESS), (404, Outcome.SUCCESS), (500, Outcome.HTTP_5XX), (503, Outcome.GATEWAY_ERROR)],
)
def test_outcome_for_status(status: int, outcome: Outcome) -> None:
    assert outcome_for_status(status) is outcome


def test_ejection_rules() -> None:
    assert ejection_duration(OD, 1) == 30.0 and ejection_duration(OD, 10) == 75.0
    assert may_eject(0, 1, 50)  # Envoy: even the only endpoint
    assert not may_eject(1, 2, 50)
    assert not may_eject(0, 0, 100)


# ---- panic mode (Envoy's healthy panic threshold) ------------------------------------------------


def test_single_endpoint_service_stays_reachable_while_its_only_endpoint_is_ejected() -> None:
    pool, clock = pool_of(A)
    fail(pool, A, Outcome.GATEWAY_ERROR, 3)
    assert pool.ejections_total == 1
    assert {s.address: s for s in pool.stats()}[A.address].ejected_until == 30.0
    # 0 of 1 healthy is below 50%: the ejected endpoint is used rather than answering UH.
    assert pool.in_panic
    assert pool.pick() == A
    assert pool.panic_picks == 1
    clock.advance(30.0)  # the ejection ends by itself: out of panic
    assert not pool.in_panic
    assert pool.pick() == A
    assert pool.panic_picks == 1


def test_panic_balances_over_every_usable_endpoint_including_ejected_ones() -> None:
    od = OutlierDetection(consecutive_connect_failures=2, max_ejection_percent=100)
    pool, clock = pool_of(A, B, C, D, od=od)
    fail(pool, A, Outcome.CONNECT_FAILURE, 2)
    fail(pool, B, Outcome.CONNECT_FAILURE, 2)
    assert not pool.in_panic  # 2 of 4 healthy: exactly 50%, not below
    assert {pool.pick() for _ in range(40)} == {C, D}
    fail(pool, C, Outcome.CONNECT_FAILURE, 2)
    assert pool.ejections_total == 3
    assert pool.in_panic  # 1 of 4 healthy
    before = pool.panic_picks
    assert {pool.pick() for _ in range(40)} == {A, B, C, D}
    assert pool.panic_picks == before + 40
    clock.advance(od.base_ejection_time)
    assert not pool.in_panic


def test_panic_ignores_not_ready_endpoints_and_can_be_turned_off() -> None:
    not_ready = Endpoint("198.18.1.8", 8080, ready=False)
    pool, _ = pool_of(A, not_ready)
    fail(pool, A, Outcome.CONNECT_FAILURE, 2)
    assert pool.in_panic and {pool.pick() for _ in range(10)} == {A}  # never the not-ready one
    off, _ = pool_of(A, od=replace(OD, min_health_percent=0))
    fail(off, A, Outcome.CONNECT_FAILURE, 2)
    assert not off.in_panic and off.pick() is None  # the old behaviour: UH until the ejection ends


def eject_two_of_four(min_health_percent: int) -> EndpointPool:
    """A, B of A..D ejected (50% healthy), with the given panic threshold."""
    od = replace(OD, max_ejection_percent=100, min_health_percent=min_health_percent)
    pool, _ = pool_of(A, B, C, D, od=od)
    fail(pool, A, Outcome.CONNECT_FAILURE, 2)
    fail(pool, B, Outcome.CONNECT_FAILURE, 2)
    assert pool.ejected_count == 2
    return pool


def test_the_panic_threshold_is_the_services_min_health_percent() -> None:
    # The same ejection state (2 of 4 healthy): below a 75% threshold, not below 50%.
    strict = eject_two_of_four(75)
    assert strict.in_panic and {strict.pick() for _ in range(40)} == {A, B, C, D}
    lenient = eject_two_of_four(50)
    assert not lenient.in_panic and {lenient.pick() for _ in range(40)} == {C, D}
    assert lenient.panic_picks == 0


def test_min_health_percent_zero_never_panics() -> None:
    od = replace(OD, max_ejection_percent=100, min_health_percent=0)
    pool, clock = pool_of(A, B, od=od)
    fail(pool, A, Outcome.CONNECT_FAILURE, 2)
    fail(pool, B, Outcome.CONNECT_FAILURE, 2)
    assert pool.ejected_count == 2  # nothing healthy left, still no panic
    assert not pool.in_panic and pool.pick() is None and pool.panic_picks == 0
    clock.advance(od.base_ejection_time)
    assert pool.pick() in {A, B}


def test_a_new_min_health_percent_applies_to_the_existing_pool_at_once() -> None:
    pool = eject_two_of_four(50)
    assert not pool.in_panic
    strict = TrafficPolicy(lb=LbPolicy.ROUND_ROBIN, outlier_detection=replace(OD, min_health_percent=75))
    pool.update([A, B, C, D], strict)  # a new snapshot: ejections are kept, the threshold changes
    assert pool.ejected_count == 2 and pool.in_panic
    assert {pool.pick() for _ in range(40)} == {A, B, C, D}
    pool.update([A, B, C, D], TrafficPolicy(lb=LbPolicy.ROUND_ROBIN, outlier_detection=OD))  # 50 again
    assert pool.ejected_count == 2 and not pool.in_panic
