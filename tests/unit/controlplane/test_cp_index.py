"""The index: raw Kubernetes objects in, immutable state out, event by event."""

from __future__ import annotations

from typing import Any

import pytest

from controlplane.compile import ProxyNode, compile_snapshot
from controlplane.events import Relist, WatchEvent
from controlplane.index import (
    ClusterState,
    Index,
    parse_duration,
    parse_pod,
    parse_traffic_policy,
    workload_of,
)
from controlplane.settings import MeshSettings


def slice_(name: str, svc: str, ips: list[str]) -> dict[str, Any]:
    return {
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "ns", "labels": {"kubernetes.io/service-name": svc}},
        "ports": [{"name": "http", "port": 80}],
        "endpoints": [{"addresses": [ip]} for ip in ips],
    }


def test_events_and_relists_update_the_state_and_old_views_stay_unchanged() -> None:
    index = Index()
    index.apply(Relist(kind="EndpointSlice", objects=[slice_("a-1", "a", ["198.18.0.1"])]))
    before = index.state()
    assert index.state() is before  # nothing changed: the same view
    index.apply(WatchEvent(kind="EndpointSlice", type="ADDED", obj=slice_("a-2", "a", ["198.18.0.2"])))
    index.apply(WatchEvent(kind="EndpointSlice", type="MODIFIED", obj=slice_("a-1", "a", ["198.18.0.3"])))
    after = index.state()
    assert [s.name for s in after.endpoint_slices[("ns", "a")]] == ["a-1", "a-2"]
    assert after.endpoint_slices[("ns", "a")][0].endpoints[0].addresses == ("198.18.0.3",)
    assert before.endpoint_slices[("ns", "a")][0].endpoints[0].addresses == ("198.18.0.1",)
    assert after.revision > before.revision

    index.apply(WatchEvent(kind="EndpointSlice", type="DELETED", obj=slice_("a-2", "a", [])))
    index.apply(WatchEvent(kind="EndpointSlice", type="DELETED", obj=slice_("a-1", "a", [])))
    assert ("ns", "a") not in index.state().endpoint_slices
    # A relist replaces everything of its kind: objects missing from it are gone.
    index.apply(WatchEvent(kind="EndpointSlice", type="ADDED", obj=slice_("b-1", "b", ["198.18.0.9"])))
    index.apply(Relist(kind="EndpointSlice", objects=[slice_("c-1", "c", ["198.18.0.8"])]))
    assert set(index.state().endpoint_slices) == {("ns", "c")}
    assert "EndpointSlice" in index.state().synced_kinds


def test_unchanged_objects_and_unknown_kinds_change_nothing() -> None:
    index = Index()
    obj = slice_("a-1", "a", ["198.18.0.1"])
    assert index.apply(WatchEvent(kind="EndpointSlice", type="ADDED", obj=obj))
    rev = index.revision
    assert not index.apply(WatchEvent(kind="EndpointSlice", type="MODIFIED", obj=obj))
    assert not index.apply(WatchEvent(kind="ConfigMap", type="ADDED", obj={"metadata": {"name": "x"}}))
    assert not index.apply(WatchEvent(kind="EndpointSlice", type="DELETED", obj=slice_("zz", "a", [])))
    assert index.revision == rev


@pytest.mark.parametrize(
    ("owner", "labels", "expected"),
    [
        (
            {"kind": "ReplicaSet", "name": "reviews-v1-6b7f9c"},
            {"pod-template-hash": "6b7f9c"},
            ("Deployment", "reviews-v1"),
        ),
        ({"kind": "ReplicaSet", "name": "api-5d8c7b6f9d"}, {}, ("Deployment", "api")),
        ({"kind": "StatefulSet", "name": "db"}, {}, ("StatefulSet", "db")),
        ({"kind": "DaemonSet", "name": "agent"}, {}, ("DaemonSet", "agent")),
        (None, {}, ("Pod", "lonely")),
    ],
)
def test_workload_of_pod(
    owner: dict[str, Any] | None, labels: dict[str, str], expected: tuple[str, str]
) -> None:
    meta: dict[str, Any] = {"name": "lonely"}
    if owner:
        meta["ownerReferences"] = [{**owner, "controller": True}]
    assert workload_of(meta, labels) == expected


def test_pod_parsing_reads_identity_and_readiness() -> None:
    p = parse_pod(
        {
            "metadata": {"name": "p", "namespace": "ns", "labels": {"app": "a"}, "deletionTimestamp": "x"},
            "spec": {
                "serviceAccountName": "sa",
                "containers": [{"ports": [{"name": "web", "containerPort": 8080}]}],
            },
            "status": {"podIP": "198.18.0.4", "conditions": [{"type": "Ready", "status": "True"}]},
        }
    )
    assert (p.service_account, p.pod_ip, p.ready, p.deleting) == ("sa", "198.18.0.4", True, True)
    assert [(c.name, c.port) for c in p.container_ports] == [("web", 8080)]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("2s", 2.0), ("1m30s", 90.0), ("1h", 3600.0), ("1.5s", 1.5), ("0s", 0.0)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["5", "5 seconds", "", "s", "1d", 5, None, "2s "])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def policy(spec: dict[str, Any]) -> Any:
    return parse_traffic_policy(
        {
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": {"targetRef": {"kind": "Service", "name": "s"}, **spec},
        }
    )


def test_traffic_policy_defaults_and_overrides() -> None:
    from meshproxy.config import model

    assert policy({}).policy == model.TrafficPolicy()
    p = policy({"retries": {"attempts": 0}, "timeout": "0s", "loadBalancer": "random"}).policy
    assert p.retry is None and p.timeout is None and p.lb is model.LbPolicy.RANDOM


@pytest.mark.parametrize(
    ("spec", "path"),
    [
        ({"timeout": "soon"}, "spec.timeout"),
        ({"retries": {"retryOn": ["sometimes"]}}, "spec.retries.retryOn[0]"),
        ({"retries": {"statusCodes": [700]}}, "spec.retries.statusCodes[0]"),
        ({"retries": {"backoff": {"base": "1s", "max": "10ms"}}}, "spec.retries.backoff.max"),
        ({"circuitBreaker": {"maxConnections": -1}}, "spec.circuitBreaker.maxConnections"),
        ({"loadBalancer": "fastest"}, "spec.loadBalancer"),
        ({"rateLimit": {"burst": 3}}, "spec.rateLimit.requestsPerSecond"),
        ({"fault": {"abort": {"percent": 150}}}, "spec.fault.abort.percent"),
        ({"outlierDetection": {"maxEjectionPercent": 101}}, "spec.outlierDetection.maxEjectionPercent"),
        ({"outlierDetection": {"minHealthPercent": 101}}, "spec.outlierDetection.minHealthPercent"),
        ({"outlierDetection": {"minHealthPercent": -1}}, "spec.outlierDetection.minHealthPercent"),
        ({"outlierDetection": {"minHealthPercent": "50%"}}, "spec.outlierDetection.minHealthPercent"),
    ],
)
def test_invalid_traffic_policy_names_the_field(spec: dict[str, Any], path: str) -> None:
    info = policy(spec)
    assert info.error is not None and info.error.path == path


def test_min_health_percent_above_100_is_explained() -> None:
    info = policy({"outlierDetection": {"minHealthPercent": 101}})
    assert info.error is not None
    assert str(info.error) == "spec.outlierDetection.minHealthPercent: must be <= 100, got 101"


@pytest.mark.parametrize(
    ("spec", "expected"), [({}, 50), ({"minHealthPercent": 0}, 0), ({"minHealthPercent": 30}, 30)]
)
def test_min_health_percent_reaches_the_compiled_snapshot(spec: dict[str, Any], expected: int) -> None:
    objects: list[dict[str, Any]] = [
        {"kind": "Service", "metadata": {"name": "s", "namespace": "ns"}, "spec": {"ports": [{"port": 80}]}},
        slice_("s-1", "s", ["198.18.0.1"]),
        {
            "kind": "TrafficPolicy",
            "metadata": {"name": "p", "namespace": "ns", "generation": 1},
            "spec": {"targetRef": {"kind": "Service", "name": "s"}, "outlierDetection": spec},
        },
    ]
    state = ClusterState.from_objects(objects)
    snap = compile_snapshot(state, ProxyNode(pod="client", namespace="ns"), MeshSettings())
    (svc,) = [s for s in snap.services if s.name == "s"]
    od = svc.policy.outlier_detection
    assert od is not None and od.min_health_percent == expected


def test_traffic_policy_needs_a_service_target() -> None:
    info = parse_traffic_policy({"metadata": {"name": "p", "namespace": "ns"}, "spec": {"timeout": "1s"}})
    assert info.error is not None and info.error.path == "spec.targetRef"
