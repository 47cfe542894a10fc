"""Unit tests of ``bench/controlplane.py``'s pure helpers.

Owns: the parts of the convergence benchmark whose mistakes would silently skew its
report: reading version and nonce from an encoded response (what every simulated
proxy ACKs with), percentiles, how endpoints are spread over EndpointSlices, and when
a change counts as converged. Concurrency: none (the coordinator's event is only set).
"""

from __future__ import annotations

import random
import statistics

import pytest

from bench.controlplane import (
    MAX_SLICE,
    Coordinator,
    Params,
    SimProxy,
    percentile,
    pod_meta,
    response_head,
    slices_of,
    workload_name,
)
from controlplane import convert as cp_convert
from controlplane.index import workload_of
from meshapi.discovery.v1 import discovery_pb2 as pb
from meshproxy.xds import convert


def _snapshot(endpoints: int) -> pb.Snapshot:
    return pb.Snapshot(
        workload=pb.Workload(name="wl", namespace="bench", labels={"app": "wl"}),
        services=[
            pb.Service(
                name="svc",
                namespace="bench",
                port=8080,
                endpoints=[
                    pb.Endpoint(address=f"198.18.0.{i % 250 + 1}", port=8080) for i in range(endpoints)
                ],
            )
        ],
    )


@pytest.mark.parametrize("endpoints", [0, 1, 3000])
def test_response_head_reads_version_and_nonce_of_a_plain_encoding(endpoints: int) -> None:
    raw = pb.DiscoveryResponse(
        version_info="0123456789abcdef", nonce="42", snapshot=_snapshot(endpoints)
    ).SerializeToString()
    assert response_head(raw) == ("0123456789abcdef", "42", "snapshot")


def test_response_head_reads_the_control_planes_pre_encoded_responses() -> None:
    raw = cp_convert.encode_response(cp_convert.encode_snapshot(_snapshot(50)), "v-1", "9001")
    assert response_head(raw) == ("v-1", "9001", "snapshot")
    # The payload first and the header after it is the same message on the wire.
    header = pb.DiscoveryResponse(version_info="v-2", nonce="7").SerializeToString()
    tail_first = pb.DiscoveryResponse(snapshot=_snapshot(5)).SerializeToString() + header
    assert response_head(tail_first) == ("v-2", "7", "snapshot")
    assert pb.DiscoveryResponse.FromString(tail_first).version_info == "v-2"


def test_response_head_tells_an_endpoint_update_apart() -> None:
    update = pb.EndpointUpdate(
        base_version="v-1",
        services=[pb.ServiceEndpoints(service_key="a.b:80", endpoints=[pb.Endpoint(address="198.18.0.1")])],
    )
    raw = pb.DiscoveryResponse(version_info="v-2", nonce="3", endpoints=update).SerializeToString()
    assert response_head(raw) == ("v-2", "3", "endpoints")
    assert response_head(pb.DiscoveryResponse(version_info="v", nonce="1").SerializeToString()) == (
        "v",
        "1",
        "",
    )


def test_response_head_refuses_a_truncated_message() -> None:
    raw = pb.DiscoveryResponse(version_info="v", nonce="1", snapshot=_snapshot(10)).SerializeToString()
    with pytest.raises(ValueError):
        response_head(raw[:-3])


def test_percentile_matches_the_inclusive_quantiles_of_the_standard_library() -> None:
    rng = random.Random(4)
    values = [rng.expovariate(3.0) for _ in range(37)]
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    for q in (10, 50, 90, 99):
        assert percentile(values, q) == pytest.approx(cuts[q - 1])
    assert percentile(values, 0) == min(values)
    assert percentile(values, 100) == max(values)
    assert percentile([2.5], 90) == 2.5


@pytest.mark.parametrize(("services", "endpoints"), [(1, 1), (3, 10), (20, 500), (7, 1234), (100, 10_000)])
def test_every_endpoint_lands_in_exactly_one_bounded_slice_of_its_service(
    services: int, endpoints: int
) -> None:
    params = Params(
        proxies=1,
        services=services,
        endpoints=endpoints,
        workloads=1,
        changes=1,
        warmup=0,
        settle=0.1,
        timeout=1,
    )
    slices = slices_of(params)
    ids = [i for _, _, group in slices for i in group]
    assert sorted(ids) == list(range(endpoints))
    assert all(0 < len(group) <= MAX_SLICE for _, _, group in slices)
    assert len({name for _, name, _ in slices}) == len(slices)
    per_service = [sum(len(g) for s, _, g in slices if s == svc) for svc in range(services)]
    assert max(per_service) - min(per_service) <= 1


def test_params_refuse_more_changes_than_marker_addresses() -> None:
    with pytest.raises(ValueError):
        Params(
            proxies=1, services=1, endpoints=60_000, workloads=1, changes=10, warmup=0, settle=0.1, timeout=1
        )


def _proxy(coord: Coordinator, index: int, witness: bool = False) -> SimProxy:
    node = convert.ProxyNode(pod=f"p{index}", namespace="bench")
    return SimProxy(index=index, node=node, target="127.0.0.1:1", coordinator=coord, witness=witness)


def _ack(proxy: SimProxy, version: str, at: float, addresses: frozenset[str] = frozenset()) -> None:
    proxy.acked_version, proxy.acked_at, proxy.acked_addresses = version, at, addresses
    proxy.coordinator.on_ack(proxy)


def test_a_change_converges_when_the_last_proxy_acks_a_new_version() -> None:
    coord = Coordinator(3)
    witness, a, b = _proxy(coord, 0, witness=True), _proxy(coord, 1), _proxy(coord, 2)
    coord.start(["v0", "v0", "w0"], marker="198.18.100.1")
    _ack(a, "v0", 1.0)  # the version it already had: not this change
    _ack(witness, "v1", 1.1, frozenset({"198.18.0.1"}))  # new version, but without the change
    _ack(b, "w1", 1.2)
    assert not coord.done.is_set()
    assert coord.waiting == {0, 1}
    _ack(a, "v1", 1.3)
    _ack(witness, "v2", 1.5, frozenset({"198.18.0.1", "198.18.100.1"}))
    assert coord.done.is_set()
    assert coord.converged_at == 1.5
    _ack(b, "w2", 2.0)  # later pushes do not move the convergence time
    assert coord.converged_at == 1.5


def test_proxy_pods_are_replicas_of_their_workloads_deployment() -> None:
    params = Params(
        proxies=6, services=2, endpoints=4, workloads=3, changes=1, warmup=0, settle=0.1, timeout=1
    )
    owners = {
        p: workload_of(pod_meta(p, params), pod_meta(p, params)["labels"]) for p in range(params.proxies)
    }
    assert owners[0] == owners[3] == ("Deployment", workload_name(0))
    assert len(set(owners.values())) == params.workloads


def test_the_witness_follows_full_snapshots_and_endpoint_updates() -> None:
    witness = _proxy(Coordinator(1), 0, witness=True)
    full = pb.DiscoveryResponse(
        snapshot=pb.Snapshot(
            services=[
                pb.Service(name="a", namespace="n", port=80, endpoints=[pb.Endpoint(address="198.18.0.1")]),
                pb.Service(name="b", namespace="n", port=80, endpoints=[pb.Endpoint(address="198.18.0.2")]),
            ]
        )
    )
    assert witness._witness(full) == {"198.18.0.1", "198.18.0.2"}
    update = pb.DiscoveryResponse(
        endpoints=pb.EndpointUpdate(
            services=[
                pb.ServiceEndpoints(service_key="a.n:80", endpoints=[pb.Endpoint(address="198.18.0.9")])
            ]
        )
    )
    assert witness._witness(update) == {"198.18.0.9", "198.18.0.2"}
