"""The pure parts of controlplane.watch and controlplane.status (no API server needed).

Back-off bounds, the watch stream's line splitting, and the status rules that
prevent write loops: equal verdicts produce no write, transition times move
only when a status flips, other controllers' route parents are kept.
"""

from __future__ import annotations

import datetime
import random

import pytest

from controlplane.status import CONTROLLER_NAME, Condition, ParentStatus, policy_status, route_status
from controlplane.watch import ApiStatusError, Backoff, WatchSettings, iter_lines

T0 = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
T1 = T0 + datetime.timedelta(minutes=1)


def test_backoff_grows_is_capped_jittered_and_resets() -> None:
    s = WatchSettings(backoff_initial=0.2, backoff_max=5.0, backoff_jitter=0.5)
    b = Backoff(s, random.Random(7))
    delays = [b.next_delay() for _ in range(12)]
    for n, d in enumerate(delays):
        nominal = min(5.0, 0.2 * 2**n)
        assert nominal * 0.5 <= d <= nominal
    assert max(delays) <= 5.0
    assert delays[-1] >= 2.5  # reached the cap region
    b.reset()
    assert b.next_delay() <= 0.2


def test_backoff_draws_differ_between_watchers() -> None:
    s = WatchSettings()
    a, b = Backoff(s, random.Random(1)), Backoff(s, random.Random(2))
    assert [a.next_delay() for _ in range(5)] != [b.next_delay() for _ in range(5)]


def test_iter_lines_rejoins_split_events_and_skips_blank_lines() -> None:
    chunks = [b'{"type":"ADD', b'ED"}\n\n{"type":"BOOK', b'MARK"}\n{"type":"DELETED"}']
    assert list(iter_lines(iter(chunks), 1024)) == [
        b'{"type":"ADDED"}',
        b'{"type":"BOOKMARK"}',
        b'{"type":"DELETED"}',
    ]


def test_iter_lines_refuses_an_event_over_the_limit() -> None:
    with pytest.raises(ApiStatusError, match="larger than 16 bytes"):
        list(iter_lines(iter([b"x" * 10, b"y" * 10]), 16))


def _policy(conditions: list[dict[str, object]] | None = None, generation: int = 3) -> dict[str, object]:
    obj: dict[str, object] = {"metadata": {"name": "p", "namespace": "ns", "generation": generation}}
    if conditions is not None:
        obj["status"] = {"conditions": conditions}
    return obj


ACCEPTED = Condition("Accepted", "True", "Accepted", "ok")


def test_policy_status_first_write_then_nothing_to_do() -> None:
    first = policy_status(_policy(), [ACCEPTED], 3, T0)
    assert first == {
        "conditions": [
            {
                "type": "Accepted",
                "status": "True",
                "reason": "Accepted",
                "message": "ok",
                "observedGeneration": 3,
                "lastTransitionTime": "2030-01-01T00:00:00Z",
            }
        ]
    }
    # What was written is what is there now: the same verdict later needs no write.
    assert policy_status(_policy(first["conditions"]), [ACCEPTED], 3, T1) is None


def test_policy_status_transition_time_moves_only_on_flip() -> None:
    stored = policy_status(_policy(), [ACCEPTED], 3, T0)
    assert stored is not None
    reworded = policy_status(
        _policy(stored["conditions"]), [Condition("Accepted", "True", "Accepted", "ok!")], 3, T1
    )
    assert reworded is not None
    assert reworded["conditions"][0]["lastTransitionTime"] == "2030-01-01T00:00:00Z"
    flipped = policy_status(
        _policy(stored["conditions"]), [Condition("Accepted", "False", "Invalid", "bad")], 3, T1
    )
    assert flipped is not None
    assert flipped["conditions"][0]["lastTransitionTime"] == "2030-01-01T00:01:00Z"
    # A newer generation evaluated with the same verdict is still recorded (observedGeneration).
    newer = policy_status(_policy(stored["conditions"], generation=4), [ACCEPTED], 4, T1)
    assert newer is not None
    assert newer["conditions"][0]["observedGeneration"] == 4


def test_policy_status_ignores_results_for_an_older_generation() -> None:
    assert policy_status(_policy(generation=5), [ACCEPTED], 4, T0) is None


def test_policy_status_keeps_other_condition_types() -> None:
    other: dict[str, object] = {
        "type": "Ready",
        "status": "True",
        "reason": "X",
        "message": "",
        "lastTransitionTime": "2029-01-01T00:00:00Z",
    }
    out = policy_status(_policy([other]), [ACCEPTED], 3, T0)
    assert out is not None
    assert [c["type"] for c in out["conditions"]] == ["Accepted", "Ready"]
    assert out["conditions"][1] == other


def _route(parents: list[dict[str, object]]) -> dict[str, object]:
    return {"metadata": {"name": "r", "namespace": "ns", "generation": 2}, "status": {"parents": parents}}


SERVICE_REF = {"group": "", "kind": "Service", "name": "web", "port": 8080}
VERDICT = ParentStatus(SERVICE_REF, (ACCEPTED, Condition("ResolvedRefs", "True", "ResolvedRefs")))


def test_route_status_keeps_other_controllers_and_is_idempotent() -> None:
    theirs: dict[str, object] = {
        "parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "edge"},
        "controllerName": "x.io/gw",
        "conditions": [],
    }
    out = route_status(_route([theirs]), [VERDICT], 2, T0)
    assert out is not None
    ours = [p for p in out["parents"] if p["controllerName"] == CONTROLLER_NAME]
    assert [p["parentRef"] for p in ours] == [SERVICE_REF]
    assert theirs in out["parents"]
    # Stored as written -> nothing to do, even if the API server filled in the namespace.
    stored = [dict(p) for p in out["parents"]]
    stored[0] = {**stored[0], "parentRef": {**SERVICE_REF, "namespace": "ns"}}
    assert route_status(_route(stored), [VERDICT], 2, T1) is None
    # No Service parent any more: only our entry goes.
    assert route_status(_route(stored), [], 2, T1) == {"parents": [theirs]}
