"""Snapshot versions in both schemes: compiled by the control plane, checked by the proxy.

Owns: proof that a proxy listing "digest-versions" gets ``VERSION_SCHEME_DIGEST``
versions equal to ``meshproxy.xds.version.digest_version`` of its snapshot (compiled
from cached per-service digests, also after a reusing recompile), while a proxy that
does not list it keeps content versions; that both rebuild endpoint updates to the
announced version; and, over real gRPC on 127.0.0.1, that an old and a new proxy of
one namespace are both served and SYNCED side by side. Concurrency: one event loop in
the gRPC test; the plane's tasks are owned and cancelled by it.
"""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
import yaml

from controlplane.app import build
from controlplane.compile import ProxyNode, compile_for_shape, compile_mesh, compile_snapshot, node_shape
from controlplane.convert import ServiceBytesCache, encode_endpoint_update, encode_response
from controlplane.index import ClusterState
from controlplane.settings import MeshSettings
from meshapi.discovery.v1 import discovery_pb2 as pb
from meshproxy.config import model
from meshproxy.core.errors import ConfigError
from meshproxy.xds import convert as xconv
from meshproxy.xds.version import DIGEST_FEATURE, digest_version
from tests.integration.test_discovery import (
    Plane,
    Proxy,
    eventually,
    pod,
    service,
    settings,
    slice_,
    start_plane,
)

HERE = pathlib.Path(__file__).parent
FIXTURES = sorted((HERE / "fixtures").glob("*.yaml"))
SETTINGS = MeshSettings(cluster_domain="cluster.test", sampling_ratio=0.5)
DIGEST = (DIGEST_FEATURE,)


def _objects(path: pathlib.Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _pods(objects: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(o["metadata"]["name"], o["metadata"]["namespace"]) for o in objects if o["kind"] == "Pod"]


@pytest.mark.parametrize("fixture", FIXTURES, ids=[f.stem for f in FIXTURES])
def test_each_proxy_gets_the_scheme_it_asked_for_over_the_same_content(fixture: pathlib.Path) -> None:
    objects = _objects(fixture)
    state = ClusterState.from_objects(objects)
    pods = _pods(objects)
    assert pods
    for name, ns in [*pods, ("probe", "elsewhere")]:
        old = compile_snapshot(state, ProxyNode(name, ns), SETTINGS)
        new = compile_snapshot(state, ProxyNode(name, ns, features=DIGEST), SETTINGS)
        assert replace(new, version="") == replace(old, version="")
        assert old.version == model.content_version(old)
        assert new.version == digest_version(new) != old.version


def test_digest_versions_follow_the_content_through_a_reusing_recompile() -> None:
    objects = _objects(HERE / "fixtures" / "basic.yaml")
    before = ClusterState.from_objects(objects)
    mesh = compile_mesh(before, SETTINGS)
    moved = _move_first_endpoint(objects, "198.18.77.1")
    after = ClusterState.from_objects(moved)
    reused = compile_mesh(after, SETTINGS, previous=mesh)
    fresh = compile_mesh(after, SETTINGS)
    seen = set()
    for name, ns in _pods(objects):
        node = ProxyNode(name, ns, features=DIGEST)
        a = compile_for_shape(mesh, before, node_shape(before, node), SETTINGS)
        b = compile_for_shape(reused, after, node_shape(after, node), SETTINGS)
        c = compile_for_shape(fresh, after, node_shape(after, node), SETTINGS)
        assert b == c and b.version == c.version == digest_version(b)
        assert a.version != b.version
        seen.add(b.version)
    assert len(seen) > 1  # the fixture's workloads differ, and so do their versions


def _move_first_endpoint(objects: list[dict[str, Any]], address: str) -> list[dict[str, Any]]:
    out = [dict(o) for o in objects]
    for i, o in enumerate(out):
        if o.get("kind") == "EndpointSlice":
            endpoints = [dict(e) for e in o["endpoints"]]
            endpoints[0] = {**endpoints[0], "addresses": [address]}
            out[i] = {**o, "endpoints": endpoints}
            return out
    raise AssertionError("the fixture has no EndpointSlice")


def test_a_proxy_rebuilds_an_update_to_the_announced_digest_version() -> None:
    objects = _objects(HERE / "fixtures" / "basic.yaml")
    node = ProxyNode("probe", "other", features=DIGEST)
    base = compile_snapshot(ClusterState.from_objects(objects), node, SETTINGS)
    new = compile_snapshot(
        ClusterState.from_objects(_move_first_endpoint(objects, "198.18.77.2")), node, SETTINGS
    )
    payload = encode_endpoint_update(base, new, ServiceBytesCache())
    assert payload is not None
    resp = pb.DiscoveryResponse.FromString(encode_response(payload, new.version, "7", digest_version=True))
    assert resp.version_scheme == pb.VERSION_SCHEME_DIGEST
    assert xconv.received_response(resp, base) == new
    # The same bytes announced as a content version are refused: the scheme is part of the claim.
    as_content = pb.DiscoveryResponse.FromString(encode_response(payload, new.version, "8"))
    with pytest.raises(ConfigError):
        xconv.received_response(as_content, base)


# ---------------------------------------------------------------- over gRPC


def _api(snapshot: model.Snapshot) -> set[str]:
    return {e.address for s in snapshot.services if s.name == "api" for e in s.endpoints}


@pytest.fixture
async def plane() -> AsyncIterator[Plane]:
    p = await start_plane(
        build(settings()),
        [
            service("web", "198.19.0.1"),
            service("api", "198.19.0.2"),
            pod("web-0", "web", "198.18.0.10"),
            pod("web-1", "web", "198.18.0.11"),
            slice_("api", 3),
        ],
    )
    yield p
    for t in p.tasks:
        t.cancel()
    await p.cp.server.stop(0)


async def test_an_old_and_a_new_proxy_are_served_side_by_side(
    plane: Plane, monkeypatch: pytest.MonkeyPatch
) -> None:
    schemes: dict[str, list[tuple[int, str | None]]] = {"web-0": [], "web-1": []}
    real = xconv.received_response

    def spy(resp: Any, base: Any, *rest: Any) -> Any:
        got = real(resp, base, *rest)
        who = "web-0" if resp.version_scheme == pb.VERSION_SCHEME_DIGEST else "web-1"
        schemes[who].append((resp.version_scheme, resp.WhichOneof("payload")))
        return got

    monkeypatch.setattr(xconv, "received_response", spy)
    new = Proxy(plane.target, pod="web-0")
    old = Proxy(plane.target, pod="web-1")
    old.client.node = replace(old.client.node, features=())  # as a proxy from before the feature
    try:
        await eventually(lambda: bool(new.applied and old.applied), what="first snapshots")
        await eventually(
            lambda: plane.row("web-0").state == "SYNCED" and plane.row("web-1").state == "SYNCED",
            what="first ACKs",
        )
        plane.add(slice_("api", 5))
        await eventually(
            lambda: all(len(_api(p.applied[-1])) == 5 for p in (new, old)),
            what="the endpoint change at both proxies",
        )
        await eventually(
            lambda: plane.row("web-0").state == "SYNCED" and plane.row("web-1").state == "SYNCED",
            what="both ACKed the change",
        )
        a, b = new.applied[-1], old.applied[-1]
        assert a.services == b.services and a.version != b.version
        assert a.version == digest_version(a) and b.version == model.content_version(b)
        assert plane.row("web-0").acked_version == a.version and plane.row("web-1").acked_version == b.version
        assert schemes["web-0"] == [
            (pb.VERSION_SCHEME_DIGEST, "snapshot"),
            (pb.VERSION_SCHEME_DIGEST, "endpoints"),
        ]
        assert schemes["web-1"] == [
            (pb.VERSION_SCHEME_CONTENT, "snapshot"),
            (pb.VERSION_SCHEME_CONTENT, "endpoints"),
        ]
    finally:
        await new.close()
        await old.close()
