"""Incremental endpoint updates over real gRPC on 127.0.0.1: server, sidecar client, fallbacks.

Owns: proof of the stream contract's incremental part as implemented: after the proxy
ACKed a full snapshot, an endpoint change reaches it as an ``EndpointUpdate`` that the
sidecar's ``XdsClient`` rebuilds into exactly the control plane's snapshot (SYNCED);
any other change is sent in full; a proxy that answers an update with a
FAILED_PRECONDITION NACK gets that version in full and only full snapshots afterwards.
Concurrency: one event loop; the control plane's pipeline and the clients run as tasks
the tests own and cancel.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from controlplane.app import build
from meshapi.discovery.v1 import discovery_pb2_grpc
from meshproxy.xds import convert as xconv
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

NODE = "web-0.demo"


@pytest.fixture
async def plane() -> AsyncIterator[Plane]:
    p = await start_plane(
        build(settings()),
        [
            service("web", "198.19.0.1"),
            service("api", "198.19.0.2"),
            pod("web-0", "web", "198.18.0.10"),
            slice_("api", 3),
        ],
    )
    yield p
    for t in p.tasks:
        t.cancel()
    await p.cp.server.stop(0)


def _desired(plane: Plane) -> str:
    snapshot = plane.cp.cache.get(NODE)
    assert snapshot is not None
    return snapshot.version


def _api_addresses(snapshot: Any) -> set[str]:
    return {e.address for s in snapshot.services if s.name == "api" for e in s.endpoints}


async def test_endpoint_change_arrives_as_an_update_and_the_sidecar_runs_the_exact_snapshot(
    plane: Plane, monkeypatch: pytest.MonkeyPatch
) -> None:
    payloads: list[str | None] = []
    real = xconv.received_response

    def spy(resp: Any, base: Any, *rest: Any) -> Any:
        payloads.append(resp.WhichOneof("payload"))
        return real(resp, base, *rest)

    monkeypatch.setattr(xconv, "received_response", spy)
    proxy = Proxy(plane.target)
    try:
        await eventually(lambda: len(proxy.applied) == 1, what="first snapshot")
        await eventually(lambda: plane.row("web-0").state == "SYNCED", what="first ACK")
        plane.add(slice_("api", 5))
        await eventually(lambda: len(proxy.applied) == 2, what="the endpoint change")
        assert payloads == ["snapshot", "endpoints"]
        assert proxy.applied[1] == plane.cp.cache.get(NODE)
        assert len(_api_addresses(proxy.applied[1])) == 5
        await eventually(lambda: plane.row("web-0").state == "SYNCED", what="the update's ACK")

        plane.add(service("db", "198.19.0.3"))  # a new service: not an endpoint change
        await eventually(lambda: len(proxy.applied) == 3, what="the new service")
        assert payloads[-1] == "snapshot"
        assert proxy.applied[2] == plane.cp.cache.get(NODE)
    finally:
        await proxy.close()


async def test_a_proxy_that_cannot_apply_updates_gets_full_snapshots(plane: Plane) -> None:
    got: list[tuple[str, str]] = []  # (payload kind, version)
    async with grpc.aio.insecure_channel(plane.target) as channel:
        call = discovery_pb2_grpc.ConfigDiscoveryStub(channel).StreamConfig()  # type: ignore[no-untyped-call]
        await call.write(xconv.first_request(xconv.ProxyNode(pod="web-0", namespace="demo"), ""))

        async def answer() -> None:
            held = ""
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:  # type: ignore[attr-defined]
                    return
                kind = resp.WhichOneof("payload")
                got.append((kind, resp.version_info))
                if kind == "endpoints":
                    await call.write(
                        xconv.nack(held, resp.nonce, "no updates here", code=xconv.FAILED_PRECONDITION)
                    )
                else:
                    held = resp.version_info
                    await call.write(xconv.ack(held, resp.nonce))

        reader = asyncio.create_task(answer(), name="test-raw-proxy")
        try:
            await eventually(lambda: len(got) == 1, what="first snapshot")
            await eventually(lambda: plane.row("web-0").state == "SYNCED", what="first ACK")
            plane.add(slice_("api", 4))
            await eventually(lambda: len(got) == 3, what="update, then the same version in full")
            assert [k for k, _ in got] == ["snapshot", "endpoints", "snapshot"]
            assert got[1][1] == got[2][1] == _desired(plane)
            await eventually(lambda: plane.row("web-0").state == "SYNCED", what="the full snapshot's ACK")
            assert plane.row("web-0").last_nack == ""

            plane.add(slice_("api", 2))  # from now on: full snapshots only
            await eventually(lambda: len(got) == 4, what="the next change")
            assert got[3] == ("snapshot", _desired(plane))
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            call.cancel()
