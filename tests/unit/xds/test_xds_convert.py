"""The wire format: model -> proto (control plane) -> model (proxy) is lossless,
keeps the content-hash version, and invalid content is refused with a field path."""

from __future__ import annotations

import pathlib
from dataclasses import replace

import pytest
import yaml

from controlplane.compile import ProxyNode, compile_for_shape, compile_mesh, compile_snapshot, node_shape
from controlplane.convert import (
    ServiceProtoCache,
    encode_response,
    encode_snapshot,
    node_from_proto,
    response,
    snapshot_to_proto,
)
from controlplane.index import ClusterState
from controlplane.settings import MeshSettings
from meshapi.discovery.v1 import discovery_pb2 as pb
from meshproxy.config import model
from meshproxy.core.errors import ConfigError
from meshproxy.xds import convert as xconv
from meshproxy.xds import version as xversion

FIXTURES = pathlib.Path(__file__).parent.parent / "controlplane" / "fixtures"


def rich_snapshot() -> model.Snapshot:
    """Every optional field set to a non-default value somewhere."""
    retry = model.RetryPolicy(
        attempts=4,
        per_try_timeout=0.3,
        retry_on=frozenset({"5xx", "retriable-status-codes"}),
        status_codes=frozenset({409, 429}),
        backoff_base=0.01,
        backoff_max=1.5,
        budget=model.RetryBudget(ratio=0.1, min_per_second=2.5, window=7.0),
        max_body_bytes=1024,
    )
    policy = model.TrafficPolicy(
        timeout=None,
        connect_timeout=0.2,
        retry=None,
        circuit_breaker=model.CircuitBreaker(1, 2, 3, 4, 5, 0.5, 9.0),
        outlier_detection=None,
        lb=model.LbPolicy.RANDOM,
        rate_limit=model.RateLimit(requests_per_second=12.5, burst=20),
        fault=model.FaultInjection(delay_percent=10.0, delay=0.05, abort_percent=2.5, abort_status=502),
        idle_timeout=30.0,
    )
    backend = model.Service(
        name="b",
        namespace="ns2",
        port=8443,
        protocol=model.Protocol.TCP,
        vips=("fd00::1",),
        hostnames=("b.ns2",),
        target_port=9443,
    )
    front = model.Service(
        name="a",
        namespace="ns1",
        port=80,
        protocol=model.Protocol.HTTP1,
        vips=("198.19.0.1", "fd00::2"),
        hostnames=("a", "a.ns1", "a.ns1.svc.cluster.local"),
        endpoints=(
            model.Endpoint(
                "198.18.0.1",
                8080,
                ready=False,
                serving=False,
                terminating=True,
                weight=3,
                pod="a-1",
                workload="a",
                zone="z1",
            ),
            model.Endpoint("fd00::18:1", 8080),
        ),
        routes=(
            model.Route(
                name="r1",
                matches=(
                    model.RouteMatch(
                        path=model.PathMatch(model.PathMatchKind.REGEX, "/x/[0-9]+"),
                        method="POST",
                        headers=(
                            model.HeaderMatch("x-a", "1"),
                            model.HeaderMatch("x-b", "^v[0-9]$", model.HeaderMatchKind.REGEX),
                        ),
                    ),
                    model.RouteMatch(path=model.PathMatch(model.PathMatchKind.EXACT, "/y")),
                ),
                backends=(
                    model.WeightedBackend(model.ServiceKey("b.ns2:8443"), 0),
                    model.WeightedBackend(model.ServiceKey("a.ns1:80"), 7),
                ),
                timeout=0.75,
                retry=retry,
                request_headers=model.HeaderModifier(
                    set=(("x-s", "1"),), add=(("x-a", "2"),), remove=("x-r",)
                ),
                response_headers=model.HeaderModifier(add=(("x-resp", "y"),)),
            ),
            model.Route(name="default"),
        ),
        policy=policy,
    )
    return model.Snapshot(
        workload=model.Workload("front", "ns1", "front-sa", "front-0", (("app", "front"), ("v", "2"))),
        services=(front, backend),
        inbound=model.Inbound(
            ports=(
                model.InboundPort(8080, model.Protocol.HTTP2, "a", model.RateLimit(100.0, 150)),
                model.InboundPort(9000),
            ),
            app_address="127.0.0.2",
            opaque_ports=frozenset({5432, 3306}),
        ),
        telemetry=model.Telemetry(
            tracing=model.Tracing(
                sampling_ratio=0.25,
                propagation=(model.Propagation.B3,),
                otlp_grpc_endpoint="http://c:4317",
                otlp_http_endpoint="http://c:4318/v1/traces",
                zipkin_endpoint="http://z:9411/api/v2/spans",
                max_queue_size=10,
            ),
            access_log=model.AccessLogMode.SAMPLED,
            metrics=False,
        ),
    ).with_version()


def compiled_snapshots() -> list[model.Snapshot]:
    out = []
    for path in sorted(FIXTURES.glob("*.yaml")):
        objects = [d for d in yaml.safe_load_all(path.read_text()) if d]
        state = ClusterState.from_objects(objects)
        for obj in objects:
            if obj["kind"] == "Pod":
                node = ProxyNode(obj["metadata"]["name"], obj["metadata"]["namespace"])
                out.append(compile_snapshot(state, node, MeshSettings(zipkin_endpoint="http://z:9411")))
    return out


def round_trip(s: model.Snapshot) -> model.Snapshot:
    wire = snapshot_to_proto(s).SerializeToString()
    msg = type(snapshot_to_proto(model.Snapshot()))()
    msg.ParseFromString(wire)
    return xconv.snapshot_from_proto(msg)


@pytest.mark.parametrize(
    "snapshot", [rich_snapshot(), model.Snapshot().with_version(), *compiled_snapshots()]
)
def test_round_trip_is_lossless_and_keeps_the_version(snapshot: model.Snapshot) -> None:
    back = round_trip(snapshot)
    assert back == snapshot
    assert back.version == snapshot.version


def test_rich_snapshot_differs_from_defaults_everywhere_it_can() -> None:
    # Guards the round-trip test itself: if a field were left at its default in the rich
    # snapshot, a converter that forgot the field would still pass.
    s = rich_snapshot()
    assert s.services[0].policy.fault is not None and s.services[0].routes[0].retry is not None
    assert s.inbound.ports[0].rate_limit is not None and s.inbound.opaque_ports


@pytest.mark.parametrize("percent", [0, 30, 50, 100])
def test_min_health_percent_survives_the_wire_including_zero(percent: int) -> None:
    s = rich_snapshot()
    od = model.OutlierDetection(min_health_percent=percent)
    front = replace(s.services[0], policy=replace(s.services[0].policy, outlier_detection=od))
    snap = replace(s, services=(front, *s.services[1:])).with_version()
    msg = snapshot_to_proto(snap)
    assert msg.services[0].policy.outlier_detection.HasField("min_health_percent")  # 0 is sent, too
    back = round_trip(snap)
    got = back.services[0].policy.outlier_detection
    assert got is not None and got.min_health_percent == percent
    assert back.version == snap.version


def test_an_unset_min_health_percent_is_the_default_50() -> None:
    # A control plane that predates the field sends an OutlierDetection without it.
    s = rich_snapshot()
    msg = snapshot_to_proto(s)
    msg.services[0].policy.outlier_detection.CopyFrom(pb.OutlierDetection(consecutive_5xx=7))
    assert not msg.services[0].policy.outlier_detection.HasField("min_health_percent")
    got = xconv.snapshot_from_proto(msg).services[0].policy.outlier_detection
    assert got is not None and got.consecutive_5xx == 7 and got.min_health_percent == 50


def test_announced_version_must_match_content() -> None:
    s = rich_snapshot()
    good = response(snapshot_to_proto(s), s.version, "n1")
    assert xconv.received_snapshot(good) == s
    bad = response(snapshot_to_proto(s), "0123456789abcdef", "n2")
    with pytest.raises(ConfigError) as e:
        xconv.received_snapshot(bad)
    assert e.value.path == "version_info"


def test_invalid_content_names_the_field() -> None:
    s = rich_snapshot()
    route = replace(
        s.services[0].routes[0], backends=(model.WeightedBackend(model.ServiceKey("gone.ns9:1")),)
    )
    broken = replace(s, services=(replace(s.services[0], routes=(route,)), s.services[1]))
    with pytest.raises(ConfigError) as e:
        xconv.snapshot_from_proto(snapshot_to_proto(broken))
    assert e.value.path == "services[0].routes[0].backends[0].service"
    assert "gone.ns9:1" in e.value.message


def test_unknown_enum_value_names_the_field() -> None:
    msg = snapshot_to_proto(rich_snapshot())
    msg.services[1].protocol = 42  # type: ignore[assignment]  # an enum value from the future
    with pytest.raises(ConfigError) as e:
        xconv.snapshot_from_proto(msg)
    assert e.value.path == "services[1].protocol"


def test_node_identity_round_trip() -> None:
    node = xconv.ProxyNode(
        pod="p",
        namespace="n",
        service_account="sa",
        labels=(("a", "1"),),
        pod_ip="198.18.0.9",
        workload="w",
        proxy_version="0.1.0",
    )
    got = node_from_proto(xconv.first_request(node, "v1").node)
    assert (
        got.pod,
        got.namespace,
        got.service_account,
        got.labels,
        got.pod_ip,
        got.workload,
        got.proxy_version,
    ) == ("p", "n", "sa", (("a", "1"),), "198.18.0.9", "w", "0.1.0")


def test_service_cache_converts_shared_services_once_and_changes_nothing() -> None:
    objects = [d for d in yaml.safe_load_all((FIXTURES / "basic.yaml").read_text()) if d]
    state = ClusterState.from_objects(objects)
    mesh = compile_mesh(state, MeshSettings())
    a = compile_for_shape(mesh, state, node_shape(state, ProxyNode("x", "other")), MeshSettings())
    b = compile_for_shape(mesh, state, node_shape(state, ProxyNode("y", "elsewhere")), MeshSettings())
    cache = ServiceProtoCache()
    assert snapshot_to_proto(a, cache) == snapshot_to_proto(a)
    misses = cache.misses
    assert snapshot_to_proto(b, cache) == snapshot_to_proto(b)
    assert cache.misses == misses and cache.hits == len(b.services)


def test_pre_encoded_response_parses_as_the_whole_response() -> None:
    s = rich_snapshot()
    whole = response(snapshot_to_proto(s), s.version, "42")
    parsed = type(whole).FromString(encode_response(encode_snapshot(snapshot_to_proto(s)), s.version, "42"))
    assert parsed == whole
    assert xconv.received_snapshot(parsed) == s


# ---------------------------------------------------------------- version schemes


def test_the_first_request_asks_for_digest_versions_and_an_old_node_does_not() -> None:
    node = xconv.ProxyNode(pod="p", namespace="n")
    assert list(xconv.first_request(node, "").node.features) == [xversion.DIGEST_FEATURE]
    assert list(xconv.first_request(replace(node, features=()), "").node.features) == []


def test_a_digest_version_is_a_function_of_the_content_alone() -> None:
    s = rich_snapshot()
    v = xversion.digest_version(s)
    parts = [xversion.service_digest(xversion.canonical(svc)) for svc in s.services]
    assert v == xversion.digest_version_of(xversion.head_json(s), parts)
    assert v == xversion.digest_version_of(xversion.head_json(s), b"".join(parts))
    assert v == xversion.digest_version(replace(s, version="anything"))  # not an input
    assert len(v) == 16 and v != s.version
    svc = s.services[0]
    moved = replace(svc, endpoints=(replace(svc.endpoints[0], address="198.18.9.9"), *svc.endpoints[1:]))
    changes = [
        replace(s, services=(moved, *s.services[1:])),
        replace(s, services=tuple(reversed(s.services))),
        replace(s, workload=replace(s.workload, service_account="other")),
        replace(s, inbound=replace(s.inbound, app_address="127.0.0.9")),
        replace(s, telemetry=replace(s.telemetry, metrics=not s.telemetry.metrics)),
    ]
    assert len({v, *(xversion.digest_version(c) for c in changes)}) == len(changes) + 1


def test_a_response_is_checked_in_the_scheme_it_announces() -> None:
    s = rich_snapshot()
    digest = xversion.digest_version(s)
    good = pb.DiscoveryResponse(
        version_info=digest, nonce="1", snapshot=snapshot_to_proto(s), version_scheme=pb.VERSION_SCHEME_DIGEST
    )
    got = xconv.received_snapshot(good)
    assert got == replace(s, version=digest)
    for version, scheme in [(s.version, pb.VERSION_SCHEME_DIGEST), (digest, pb.VERSION_SCHEME_CONTENT)]:
        wrong = pb.DiscoveryResponse(
            version_info=version, nonce="2", snapshot=snapshot_to_proto(s), version_scheme=scheme
        )
        with pytest.raises(ConfigError) as e:
            xconv.received_snapshot(wrong)
        assert e.value.path == "version_info"
    unknown = pb.DiscoveryResponse(version_info=digest, nonce="3", snapshot=snapshot_to_proto(s))
    unknown.version_scheme = 7  # type: ignore[assignment]  # a scheme from the future
    with pytest.raises(ConfigError) as e:
        xconv.received_snapshot(unknown)
    assert e.value.path == "version_scheme"


def test_the_digest_memo_rehashes_only_the_services_an_update_replaced() -> None:
    base = rich_snapshot()
    memo = xversion.ServiceDigests()
    full = pb.DiscoveryResponse(
        version_info=xversion.digest_version(base),
        snapshot=snapshot_to_proto(base),
        version_scheme=pb.VERSION_SCHEME_DIGEST,
    )
    held = xconv.received_response(full, None, memo)
    assert held.version == xversion.digest_version(held) and memo.misses == len(base.services)
    changed = held.services[0]
    moved = replace(changed, endpoints=(replace(changed.endpoints[0], address="198.18.9.8"),))
    expected = replace(held, services=(moved, *held.services[1:]))
    update = pb.DiscoveryResponse(
        version_info=xversion.digest_version(expected),
        version_scheme=pb.VERSION_SCHEME_DIGEST,
        endpoints=pb.EndpointUpdate(
            base_version=held.version,
            services=[
                pb.ServiceEndpoints(
                    service_key=moved.key, endpoints=snapshot_to_proto(expected).services[0].endpoints
                )
            ],
        ),
    )
    rebuilt = xconv.received_response(update, held, memo)
    assert rebuilt.version == xversion.digest_version(rebuilt) == update.version_info
    assert memo.misses == len(base.services) + 1  # only the replaced service was hashed again
    # Unrelated objects (another full snapshot) are hashed, never taken for others.
    other = replace(base, services=tuple(replace(s, port=s.port + 1) for s in base.services))
    assert xversion.digest_version(other, memo) == xversion.digest_version(other)
