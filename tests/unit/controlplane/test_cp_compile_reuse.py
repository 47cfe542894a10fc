"""``compile_mesh(state, settings, previous=...)``: reuse saves work and changes nothing.

Owns: the invariant that compiling with the previous mesh gives exactly what a compile
from scratch gives, for every kind of change (endpoints, a Service, a Pod, a policy, a
route, a slice going away), that an endpoint change recompiles only the services it
touched, and that versions stay the exact content hash with the mesh's memo of the
services' JSON (found by ``make bench-controlplane``: recompiling and re-serialising every
service on each change was a third of the control plane's CPU). Concurrency: none.
"""

from __future__ import annotations

import copy
import pathlib
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from controlplane.compile import MeshConfig, ProxyNode, compile_for_shape, compile_mesh, node_shape
from controlplane.events import KINDS, Relist, WatchEvent
from controlplane.index import Index
from controlplane.settings import MeshSettings
from meshproxy.config import model

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
SETTINGS = MeshSettings()


def _objects() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for name in ("basic.yaml", "routing.yaml", "from-pods.yaml"):
        out += [d for d in yaml.safe_load_all((FIXTURES / name).read_text()) if d]
    return out


def _find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name))


def _index(objects: list[dict[str, Any]]) -> Index:
    index = Index()
    for kind in KINDS:
        index.apply(Relist(kind=kind, objects=[o for o in objects if o["kind"] == kind]))
    return index


def _modified(obj: dict[str, Any], change: Callable[[dict[str, Any]], None]) -> WatchEvent:
    new = copy.deepcopy(obj)
    change(new)
    return WatchEvent(kind=new["kind"], type="MODIFIED", obj=new)


def _move_endpoint(o: dict[str, Any]) -> None:
    o["endpoints"][0]["addresses"] = ["198.18.99.1"]


def _changes(objects: list[dict[str, Any]]) -> list[tuple[str, WatchEvent]]:
    sl = _find(objects, "EndpointSlice")
    svc = _find(objects, "Service")
    pod = _find(objects, "Pod")
    policy = _find(objects, "TrafficPolicy")
    route = _find(objects, "HTTPRoute")
    return [
        ("endpoint moved", _modified(sl, _move_endpoint)),
        (
            "service annotation",
            _modified(
                svc,
                lambda o: o["metadata"]
                .setdefault("annotations", {})
                .update({"meshproxy.io/opaque-ports": "8080"}),
            ),
        ),
        (
            "service port protocol",
            _modified(svc, lambda o: o["spec"]["ports"][0].update({"appProtocol": "tcp"})),
        ),
        ("pod relabelled", _modified(pod, lambda o: o["metadata"]["labels"].update({"extra": "1"}))),
        (
            "pod owner",
            _modified(
                pod,
                lambda o: o["metadata"].update(
                    {
                        "ownerReferences": [
                            {
                                "apiVersion": "apps/v1",
                                "kind": "StatefulSet",
                                "name": "other",
                                "uid": "u",
                                "controller": True,
                            }
                        ]
                    }
                ),
            ),
        ),
        ("policy deleted", WatchEvent(kind="TrafficPolicy", type="DELETED", obj=policy)),
        ("route deleted", WatchEvent(kind="HTTPRoute", type="DELETED", obj=route)),
        ("slice deleted", WatchEvent(kind="EndpointSlice", type="DELETED", obj=sl)),
    ]


def test_compiling_with_the_previous_mesh_equals_compiling_from_scratch() -> None:
    objects = _objects()
    index = _index(objects)
    mesh: MeshConfig = compile_mesh(index.state(), SETTINGS)
    assert mesh.services and mesh.statuses
    for what, event in _changes(objects):
        assert index.apply(event), what
        state = index.state()
        fast = compile_mesh(state, SETTINGS, previous=mesh)
        slow = compile_mesh(state, SETTINGS)
        assert fast == slow, what
        assert fast.service_json == slow.service_json and fast.local_json == slow.local_json, what
        mesh = fast


def test_an_endpoint_change_recompiles_only_the_service_it_touched() -> None:
    objects = _objects()
    index = _index(objects)
    before = compile_mesh(index.state(), SETTINGS)
    sl = _find(objects, "EndpointSlice")
    index.apply(_modified(sl, _move_endpoint))
    after = compile_mesh(index.state(), SETTINGS, previous=before)
    touched = sl["metadata"]["labels"]["kubernetes.io/service-name"]
    for old, new in zip(before.services, after.services, strict=True):
        if new.name == touched and new.namespace == sl["metadata"]["namespace"]:
            assert new is not old and new != old
        else:
            assert new is old
    assert any(e.address == "198.18.99.1" for s in after.services for e in s.endpoints)


@pytest.mark.parametrize("domain", ["cluster.local", "example.internal"])
def test_other_settings_are_not_taken_over(domain: str) -> None:
    index = _index(_objects())
    state = index.state()
    previous = compile_mesh(state, MeshSettings(cluster_domain="cluster.local"))
    settings = MeshSettings(cluster_domain=domain)
    assert compile_mesh(state, settings, previous=previous) == compile_mesh(state, settings)


def test_versions_are_the_content_hash_whatever_order_namespaces_come_in() -> None:
    state = _index(_objects()).state()
    mesh = compile_mesh(state, SETTINGS)
    namespaces = sorted({s.namespace for s in mesh.services})
    assert len(namespaces) > 1
    # Alternating namespaces makes the one-entry memo of the services' JSON switch each time.
    for i, ns in enumerate([*namespaces, "elsewhere", *namespaces]):
        snapshot = compile_for_shape(mesh, state, node_shape(state, ProxyNode(f"p{i}", ns)), SETTINGS)
        assert snapshot.version == model.content_version(snapshot), ns
        assert any(svc.hostnames[0] == svc.name for svc in snapshot.services) == (ns in namespaces)


def _nodes(objects: list[dict[str, Any]]) -> list[ProxyNode]:
    pods = [(o["metadata"]["name"], o["metadata"]["namespace"]) for o in objects if o["kind"] == "Pod"]
    return [ProxyNode(n, ns, features=f) for n, ns in pods for f in ((), ("digest-versions",))]


def test_snapshots_from_a_taken_over_mesh_equal_snapshots_compiled_from_scratch() -> None:
    # Each shape's inbound part is memoized on the mesh and taken over while the Services
    # and policies stay the same: whatever changed, every workload's snapshot (and version,
    # in both schemes) must be what a compile from scratch gives.
    objects = _objects()
    index = _index(objects)
    mesh = compile_mesh(index.state(), SETTINGS)
    nodes = _nodes(objects)
    assert len(nodes) > 2

    def compile_all(m: MeshConfig) -> list[model.Snapshot]:
        s = index.state()
        return [compile_for_shape(m, s, node_shape(s, n), SETTINGS) for n in nodes]

    compile_all(mesh)  # fills the memo
    for what, event in _changes(objects):
        assert index.apply(event), what
        state = index.state()
        fast = compile_mesh(state, SETTINGS, previous=mesh)
        slow = compile_mesh(state, SETTINGS)
        assert compile_all(fast) == compile_all(slow), what
        mesh = fast


def test_an_endpoint_change_keeps_each_workloads_inbound_part_and_a_service_change_does_not() -> None:
    objects = _objects()
    index = _index(objects)
    node = _nodes(objects)[0]
    state = index.state()
    mesh = compile_mesh(state, SETTINGS)
    before = compile_for_shape(mesh, state, node_shape(state, node), SETTINGS)

    index.apply(_modified(_find(objects, "EndpointSlice"), _move_endpoint))
    state = index.state()
    mesh = compile_mesh(state, SETTINGS, previous=mesh)
    after = compile_for_shape(mesh, state, node_shape(state, node), SETTINGS)
    assert after.inbound is before.inbound  # taken over, not recomputed

    svc = _find(objects, "Service")
    index.apply(_modified(svc, lambda o: o["metadata"].update({"annotations": {"unrelated": "x"}})))
    state = index.state()
    mesh = compile_mesh(state, SETTINGS, previous=mesh)
    again = compile_for_shape(mesh, state, node_shape(state, node), SETTINGS)
    assert again.inbound == after.inbound and again.inbound is not after.inbound  # recomputed
