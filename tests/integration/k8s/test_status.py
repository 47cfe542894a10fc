"""controlplane.status against a real API server.

What a user relies on: ``kubectl get`` shows whether a TrafficPolicy was
accepted and why not; an HTTPRoute shows our parent status next to other
controllers' entries; the writer never writes what is already there (no write
loops with our own watch) and never reports on a spec older than the stored one.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from controlplane.status import CONTROLLER_NAME, Condition, ParentStatus, StatusWriter
from tests.integration.k8s.test_crd import kubectl_table
from tests.support.apiserver import ApiServer

pytestmark = pytest.mark.apiserver

T0 = datetime.datetime(2030, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)


class StepClock:
    """A clock tests move by hand."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime.datetime:
        return self.now


@pytest.fixture
def clock() -> StepClock:
    return StepClock()


@pytest.fixture
def writer(apiserver: ApiServer, clock: StepClock) -> Iterator[StatusWriter]:
    with apiserver.api_client() as client:
        yield StatusWriter(client, clock=clock)


def _get(apiserver: ApiServer, kind: str, ns: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(apiserver.kubectl("get", kind, name, "-n", ns, "-o", "json").stdout)
    return obj


POLICY = """
apiVersion: policy.meshproxy.io/v1alpha1
kind: TrafficPolicy
metadata: {{name: web, namespace: {ns}}}
spec:
  targetRef: {{kind: Service, name: web}}
  timeout: {timeout}
"""

ACCEPTED = (Condition("Accepted", "True", "Accepted", "applied to 1 service port"),)
REJECTED = (Condition("Accepted", "False", "TargetNotFound", "Service web not found"),)


async def test_policy_conditions_written_once_and_shown(
    apiserver: ApiServer, writer: StatusWriter, clock: StepClock, namespace: str
) -> None:
    ns = namespace
    apiserver.apply_yaml(POLICY.format(ns=ns, timeout="5s"))
    gen = _get(apiserver, "trafficpolicy", ns, "web")["metadata"]["generation"]

    assert await writer.set_policy_conditions(ns, "web", REJECTED, gen)
    obj = _get(apiserver, "trafficpolicy", ns, "web")
    (cond,) = obj["status"]["conditions"]
    assert cond == {
        "type": "Accepted",
        "status": "False",
        "reason": "TargetNotFound",
        "message": "Service web not found",
        "observedGeneration": gen,
        "lastTransitionTime": "2030-01-01T12:00:00Z",
    }
    (row,) = kubectl_table(apiserver.kubectl("get", "trafficpolicies", "-n", ns).stdout)
    assert row["ACCEPTED"] == "False"

    # Same verdict again: no write, the object is untouched (our watch sees no event).
    rv = obj["metadata"]["resourceVersion"]
    clock.now = T0 + datetime.timedelta(minutes=1)
    assert not await writer.set_policy_conditions(ns, "web", REJECTED, gen)
    assert _get(apiserver, "trafficpolicy", ns, "web")["metadata"]["resourceVersion"] == rv

    # The verdict flips: written, with a new transition time.
    assert await writer.set_policy_conditions(ns, "web", ACCEPTED, gen)
    (cond,) = _get(apiserver, "trafficpolicy", ns, "web")["status"]["conditions"]
    assert (cond["status"], cond["reason"], cond["lastTransitionTime"]) == (
        "True",
        "Accepted",
        "2030-01-01T12:01:00Z",
    )
    (row,) = kubectl_table(apiserver.kubectl("get", "trafficpolicies", "-n", ns).stdout)
    assert row["ACCEPTED"] == "True"

    # Only the message changes: written, but the transition time stays.
    clock.now = T0 + datetime.timedelta(minutes=2)
    assert await writer.set_policy_conditions(
        ns, "web", (Condition("Accepted", "True", "Accepted", "applied to 2 service ports"),), gen
    )
    (cond,) = _get(apiserver, "trafficpolicy", ns, "web")["status"]["conditions"]
    assert cond["lastTransitionTime"] == "2030-01-01T12:01:00Z"
    assert cond["message"] == "applied to 2 service ports"


async def test_result_for_an_older_generation_is_not_written(
    apiserver: ApiServer, writer: StatusWriter, namespace: str
) -> None:
    ns = namespace
    apiserver.apply_yaml(POLICY.format(ns=ns, timeout="5s"))
    old_gen = _get(apiserver, "trafficpolicy", ns, "web")["metadata"]["generation"]
    apiserver.apply_yaml(POLICY.format(ns=ns, timeout="6s"))
    new_gen = _get(apiserver, "trafficpolicy", ns, "web")["metadata"]["generation"]
    assert new_gen > old_gen

    assert not await writer.set_policy_conditions(ns, "web", ACCEPTED, old_gen)
    assert "status" not in _get(apiserver, "trafficpolicy", ns, "web")
    assert await writer.set_policy_conditions(ns, "web", ACCEPTED, new_gen)


async def test_missing_object_is_not_an_error(writer: StatusWriter, namespace: str) -> None:
    assert not await writer.set_policy_conditions(namespace, "nope", ACCEPTED, 1)
    assert not await writer.set_route_parents(namespace, "nope", (), 1)


ROUTE = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: split, namespace: {ns}}}
spec:
  parentRefs:
    - {{group: "", kind: Service, name: web, port: 8080}}
    - {{name: edge-gateway}}
  rules:
    - backendRefs: [{{name: web-v1, port: 8080, weight: 90}}, {{name: web-v2, port: 8080, weight: 10}}]
"""

SERVICE_PARENT = {"group": "", "kind": "Service", "name": "web", "port": 8080}


def _ours(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in obj["status"]["parents"] if p["controllerName"] == CONTROLLER_NAME]


async def test_route_parent_status_next_to_other_controllers(
    apiserver: ApiServer, writer: StatusWriter, clock: StepClock, namespace: str
) -> None:
    ns = namespace
    apiserver.apply_yaml(ROUTE.format(ns=ns))
    # Another controller (an ingress gateway) already reports on its Gateway parent.
    theirs = {
        "parentRef": {"name": "edge-gateway"},
        "controllerName": "example.com/gateway",
        "conditions": [
            {
                "type": "Accepted",
                "status": "True",
                "reason": "Accepted",
                "message": "",
                "observedGeneration": 1,
                "lastTransitionTime": "2029-12-31T00:00:00Z",
            }
        ],
    }
    apiserver.kubectl(
        "patch", "httproute", "split", "-n", ns, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"parents": [theirs]}}),
    )  # fmt: skip
    stored = _get(apiserver, "httproute", ns, "split")
    gen = stored["metadata"]["generation"]
    (theirs,) = stored["status"]["parents"]  # as stored: the API server filled defaults in

    verdict = ParentStatus(
        SERVICE_PARENT,
        (
            Condition("Accepted", "True", "Accepted", "routes traffic for Service web port 8080"),
            Condition("ResolvedRefs", "False", "BackendNotFound", "Service web-v2 not found"),
        ),
    )
    assert await writer.set_route_parents(ns, "split", (verdict,), gen)
    obj = _get(apiserver, "httproute", ns, "split")
    assert theirs in obj["status"]["parents"]
    (ours,) = _ours(obj)
    assert ours["parentRef"] == SERVICE_PARENT
    conds = {c["type"]: c for c in ours["conditions"]}
    assert (conds["Accepted"]["status"], conds["Accepted"]["reason"]) == ("True", "Accepted")
    assert (conds["ResolvedRefs"]["status"], conds["ResolvedRefs"]["reason"]) == ("False", "BackendNotFound")
    assert all(c["observedGeneration"] == gen for c in conds.values())

    # Idempotent: same verdict, later clock -> nothing written.
    rv = obj["metadata"]["resourceVersion"]
    clock.now = T0 + datetime.timedelta(minutes=5)
    assert not await writer.set_route_parents(ns, "split", (verdict,), gen)
    assert _get(apiserver, "httproute", ns, "split")["metadata"]["resourceVersion"] == rv

    # The parent goes away from our point of view: our entry is removed, theirs stays.
    assert await writer.set_route_parents(ns, "split", (), gen)
    assert _get(apiserver, "httproute", ns, "split")["status"]["parents"] == [theirs]


async def test_concurrent_change_is_not_overwritten(
    apiserver: ApiServer, writer: StatusWriter, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A status changed between our read and our write (409) is re-read, not clobbered."""
    ns = namespace
    apiserver.apply_yaml(POLICY.format(ns=ns, timeout="5s"))
    gen = _get(apiserver, "trafficpolicy", ns, "web")["metadata"]["generation"]
    other = {
        "type": "Ready",
        "status": "True",
        "reason": "Other",
        "message": "",
        "lastTransitionTime": "2029-01-01T00:00:00Z",
    }

    api = writer._api  # the real client; wrap its read to race a write in after it
    real_list: Callable[..., Any] = api.list_namespaced_custom_object
    raced = False

    def list_then_race(*args: Any, **kwargs: Any) -> Any:
        nonlocal raced
        obj = real_list(*args, **kwargs)
        if not raced:
            raced = True
            apiserver.kubectl(
                "patch", "trafficpolicy", "web", "-n", ns, "--subresource=status", "--type=merge",
                "-p", json.dumps({"status": {"conditions": [other]}}),
            )  # fmt: skip
        return obj

    monkeypatch.setattr(api, "list_namespaced_custom_object", list_then_race)
    assert await writer.set_policy_conditions(ns, "web", ACCEPTED, gen)
    conds = {c["type"]: c for c in _get(apiserver, "trafficpolicy", ns, "web")["status"]["conditions"]}
    assert conds["Ready"] == other  # the racing writer's condition survived
    assert conds["Accepted"]["status"] == "True"
