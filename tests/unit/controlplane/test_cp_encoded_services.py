"""Snapshots encoded from per-service encodings: the same message, each service encoded once.

Owns: the contract of ``controlplane.convert.ServiceBytesCache`` and
``encode_snapshot_model``, the server's hot path (found by ``make bench-controlplane``:
building and encoding one protobuf message per workload and change was two thirds of
the control plane's CPU). What a proxy parses must equal the plainly built response,
pass its content-hash check, and services shared by snapshots (or unchanged by a
cluster change) must not be encoded again. Concurrency: none.
"""

from __future__ import annotations

import pathlib
from dataclasses import replace

import yaml

from controlplane.compile import ProxyNode, compile_for_shape, compile_mesh, node_shape
from controlplane.convert import (
    ServiceBytesCache,
    encode_response,
    encode_snapshot,
    encode_snapshot_model,
    response,
    snapshot_to_proto,
)
from controlplane.index import ClusterState
from controlplane.settings import MeshSettings
from meshapi.discovery.v1 import discovery_pb2 as pb
from meshproxy.config import model
from meshproxy.xds import convert as xconv

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def _state() -> ClusterState:
    objects = [d for d in yaml.safe_load_all((FIXTURES / "basic.yaml").read_text()) if d]
    return ClusterState.from_objects(objects)


def _snapshots(state: ClusterState) -> list[model.Snapshot]:
    mesh = compile_mesh(state, MeshSettings())
    nodes = [ProxyNode("x", "other"), ProxyNode("y", "elsewhere")]
    nodes += [ProxyNode(pod.name, pod.namespace) for pod in state.pods.values()]
    return [compile_for_shape(mesh, state, node_shape(state, n), MeshSettings()) for n in nodes]


def test_parsed_response_equals_the_plainly_built_one_and_passes_the_proxys_checks() -> None:
    cache = ServiceBytesCache()
    snapshots = _snapshots(_state())
    assert any(s.services for s in snapshots) and any(s.inbound.ports for s in snapshots)
    for s in snapshots:
        wire = encode_response(encode_snapshot_model(s, cache), s.version, "17")
        parsed = pb.DiscoveryResponse.FromString(wire)
        assert parsed == response(snapshot_to_proto(s), s.version, "17")
        assert xconv.received_snapshot(parsed) == s


def test_a_snapshot_without_services_round_trips() -> None:
    s = model.Snapshot().with_version()
    parsed = pb.DiscoveryResponse.FromString(
        encode_response(encode_snapshot_model(s, ServiceBytesCache()), s.version, "1")
    )
    assert parsed == pb.DiscoveryResponse.FromString(
        encode_response(encode_snapshot(snapshot_to_proto(s)), s.version, "1")
    )
    assert parsed.HasField("snapshot")


def test_services_shared_by_snapshots_or_unchanged_by_a_recompile_are_encoded_once() -> None:
    state = _state()
    cache = ServiceBytesCache()
    first = _snapshots(state)
    for s in first:
        encode_snapshot_model(s, cache)
    distinct = {svc for s in first for svc in s.services}
    assert cache.misses == len(distinct)
    # A recompile builds new (equal) service objects: still no new encoding.
    again = _snapshots(state)
    assert again[0].services[0] == first[0].services[0] and again[0].services[0] is not first[0].services[0]
    for s in again:
        encode_snapshot_model(s, cache)
    assert cache.misses == len(distinct)
    # A service whose endpoints changed is encoded anew, and the result carries the change.
    s = first[0]
    changed = replace(s.services[0], endpoints=(model.Endpoint(address="198.18.9.9", port=8080),))
    s2 = replace(s, services=(changed, *s.services[1:])).with_version()
    parsed = pb.DiscoveryResponse.FromString(
        encode_response(encode_snapshot_model(s2, cache), s2.version, "2")
    )
    assert cache.misses == len(distinct) + 1
    assert [e.address for e in parsed.snapshot.services[0].endpoints] == ["198.18.9.9"]
    assert xconv.received_snapshot(parsed) == s2


def test_the_cache_is_bounded_by_encoded_bytes() -> None:
    services = [model.Service(name=f"svc-{i}", namespace="ns", port=8080) for i in range(5)]
    size = len(ServiceBytesCache().get(services[0]))  # equal-length names: equal sizes
    cache = ServiceBytesCache(max_bytes=2 * size, max_ids=3)
    for svc in services:
        cache.get(svc)
    assert len(cache) == 2
    assert cache.get(services[-1]) == ServiceBytesCache().get(services[-1])
    assert cache.misses == 5 and cache.hits == 1
    cache.get(services[0])  # evicted long ago: encoded again
    assert cache.misses == 6
