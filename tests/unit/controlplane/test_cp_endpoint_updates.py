"""Incremental endpoint updates on the wire: control plane encodes, proxy rebuilds.

Owns: the contract of ``controlplane.convert.encode_endpoint_update`` and
``meshproxy.xds.convert.received_response``: an update is only made when two snapshots
differ in endpoint lists alone, a proxy holding the base rebuilds the new snapshot
exactly (content-hash version included), and one that does not hold the base, or
meets a service it does not know, refuses with ``BaseVersionMismatch`` (NACKed with
FAILED_PRECONDITION, so the server sends the full snapshot). Concurrency: none.
"""

from __future__ import annotations

import pathlib
from dataclasses import replace

import pytest
import yaml

from controlplane.compile import ProxyNode, compile_snapshot
from controlplane.convert import (
    ServiceBytesCache,
    encode_endpoint_update,
    encode_response,
    encode_snapshot_model,
)
from controlplane.index import ClusterState
from controlplane.settings import MeshSettings
from meshapi.discovery.v1 import discovery_pb2 as pb
from meshproxy.config import model
from meshproxy.core.errors import ConfigError
from meshproxy.xds import convert as xconv

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def _objects() -> list[dict[str, object]]:
    return [d for d in yaml.safe_load_all((FIXTURES / "basic.yaml").read_text()) if d]


def _compile(objects: list[dict[str, object]]) -> model.Snapshot:
    return compile_snapshot(ClusterState.from_objects(objects), ProxyNode("probe", "other"), MeshSettings())


def _move_first_endpoint(objects: list[dict[str, object]], address: str) -> list[dict[str, object]]:
    out = [dict(o) for o in objects]
    for i, o in enumerate(out):
        if o.get("kind") == "EndpointSlice":
            endpoints = [dict(e) for e in o["endpoints"]]  # type: ignore[attr-defined]
            endpoints[0] = {**endpoints[0], "addresses": [address]}
            out[i] = {**o, "endpoints": endpoints}
            return out
    raise AssertionError("the fixture has no EndpointSlice")


def _wire(payload: bytes, version: str) -> pb.DiscoveryResponse:
    return pb.DiscoveryResponse.FromString(encode_response(payload, version, "5"))


def test_an_endpoint_change_travels_as_an_update_and_rebuilds_the_exact_snapshot() -> None:
    base = _compile(_objects())
    new = _compile(_move_first_endpoint(_objects(), "198.18.77.7"))
    assert base.version != new.version
    cache = ServiceBytesCache()
    payload = encode_endpoint_update(base, new, cache)
    assert payload is not None
    resp = _wire(payload, new.version)
    assert resp.WhichOneof("payload") == "endpoints"
    assert resp.endpoints.base_version == base.version
    changed = [s for s in resp.endpoints.services]
    assert len(changed) == 1 and "198.18.77.7" in {e.address for e in changed[0].endpoints}
    full = len(encode_snapshot_model(new, cache))
    assert len(payload) < full
    rebuilt = xconv.received_response(resp, base)
    assert rebuilt == new and rebuilt.version == new.version


def test_no_update_when_anything_besides_endpoints_changed() -> None:
    base = _compile(_objects())
    cache = ServiceBytesCache()
    svc = base.services[0]
    cases = [
        replace(base, services=(replace(svc, hostnames=("renamed",)), *base.services[1:])),
        replace(base, services=base.services[1:]),
        replace(base, services=(*base.services[1:], svc)),  # same services, another order
        replace(base, workload=replace(base.workload, service_account="other")),
        replace(base, telemetry=replace(base.telemetry, metrics=not base.telemetry.metrics)),
    ]
    for new in cases:
        assert encode_endpoint_update(base, new.with_version(), cache) is None
    assert encode_endpoint_update(base, base, cache) is None  # nothing to send


def test_a_proxy_without_the_base_refuses_the_update() -> None:
    base = _compile(_objects())
    new = _compile(_move_first_endpoint(_objects(), "198.18.77.8"))
    payload = encode_endpoint_update(base, new, ServiceBytesCache())
    assert payload is not None
    resp = _wire(payload, new.version)
    with pytest.raises(xconv.BaseVersionMismatch):
        xconv.received_response(resp, None)
    changed_key = resp.endpoints.services[0].service_key
    other = replace(base, services=tuple(s for s in base.services if s.key != changed_key)).with_version()
    with pytest.raises(xconv.BaseVersionMismatch):
        xconv.received_response(resp, other)
    # Same version string but without the updated service: refused too, never half-applied.
    impostor = replace(other, version=base.version)
    with pytest.raises(xconv.BaseVersionMismatch):
        xconv.received_response(resp, impostor)


def test_an_update_that_does_not_give_the_announced_version_is_rejected() -> None:
    base = _compile(_objects())
    new = _compile(_move_first_endpoint(_objects(), "198.18.77.9"))
    payload = encode_endpoint_update(base, new, ServiceBytesCache())
    assert payload is not None
    with pytest.raises(ConfigError) as err:
        xconv.received_response(_wire(payload, "0000000000000000"), base)
    assert not isinstance(err.value, xconv.BaseVersionMismatch)


def test_a_full_snapshot_needs_no_base() -> None:
    s = _compile(_objects())
    resp = _wire(encode_snapshot_model(s, ServiceBytesCache()), s.version)
    assert xconv.received_response(resp, None) == s


def test_nack_carries_the_code_that_asks_for_the_full_snapshot() -> None:
    req = xconv.nack("v1", "9", "no base", code=xconv.FAILED_PRECONDITION)
    assert req.error_detail.code == 9 and req.version_info == "v1" and req.response_nonce == "9"
    assert xconv.nack("v1", "9", "bad").error_detail.code == xconv.INVALID_ARGUMENT


def test_the_assembled_update_is_byte_for_byte_what_protobuf_encodes() -> None:
    base = _compile(_objects())
    new = _compile(_move_first_endpoint(_objects(), "198.18.77.10"))
    cache = ServiceBytesCache()
    payload = encode_endpoint_update(base, new, cache)
    changed = [n for o, n in zip(base.services, new.services, strict=True) if o != n]
    expected = pb.DiscoveryResponse(
        endpoints=pb.EndpointUpdate(
            base_version=base.version,
            services=[
                pb.ServiceEndpoints(
                    service_key=s.key,
                    endpoints=[
                        pb.Endpoint(
                            address=e.address,
                            port=e.port,
                            ready=e.ready,
                            serving=e.serving,
                            terminating=e.terminating,
                            weight=e.weight,
                            pod=e.pod,
                            workload=e.workload,
                            zone=e.zone,
                        )
                        for e in s.endpoints
                    ],
                )
                for s in changed
            ],
        )
    ).SerializeToString()
    assert changed and payload == expected
    # A second workload's pair with the same new service reuses its encoded entry.
    other_base = replace(base, version="feedfacefeedface")
    again = encode_endpoint_update(other_base, new, cache)
    assert again is not None and again != payload
    assert pb.DiscoveryResponse.FromString(again).endpoints == pb.EndpointUpdate(
        base_version="feedfacefeedface", services=pb.DiscoveryResponse.FromString(payload).endpoints.services
    )
