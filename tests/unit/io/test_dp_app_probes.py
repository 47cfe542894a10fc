"""The app's probes performed by the sidecar (``MESHPROXY_APP_PROBES``), against real loopback servers."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator

import grpc
import grpc.aio
import pytest
from dp_rig import RawServer, Upstream

from meshproxy.io.app_probes import AppProbes, parse


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream() as u:
        yield u


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(entries: dict[str, dict[str, object]]) -> dict[str, str]:
    return {"MESHPROXY_APP_PROBES": json.dumps(entries)}


async def test_http_probe_passes_on_2xx_and_fails_otherwise(upstream: Upstream) -> None:
    probes = AppProbes.from_env(
        _env(
            {
                "/app-health/app/readyz": {"kind": "http", "port": upstream.port, "path": "/hello"},
                "/app-health/app/livez": {"kind": "http", "port": upstream.port, "path": "/status/500"},
                "/app-health/app/startupz": {"kind": "http", "port": _closed_port(), "path": "/"},
            }
        )
    )
    assert await probes.check("/app-health/app/readyz") == 200
    assert await probes.check("/app-health/app/livez") == 503
    assert await probes.check("/app-health/app/startupz") == 503
    assert await probes.check("/app-health/other/readyz") is None
    assert upstream.server.paths == ["/hello", "/status/500"]


async def test_tcp_probe_and_its_timeout() -> None:
    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read()

    async with RawServer(silent) as srv:
        probes = AppProbes.from_env(
            _env(
                {
                    "/app-health/db/livez": {"kind": "tcp", "port": srv.port, "timeoutSeconds": 1},
                    "/app-health/db/readyz": {"kind": "tcp", "port": _closed_port(), "timeoutSeconds": 1},
                }
            )
        )
        assert await probes.check("/app-health/db/livez") == 200
        assert await probes.check("/app-health/db/readyz") == 503


async def test_grpc_health_probe() -> None:
    serving = {"": True, "payments": False}

    async def check(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        name = request[2:].decode() if request else ""
        return b"\x08\x01" if serving.get(name) else b"\x08\x02"

    handler = grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(check)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        probes = AppProbes.from_env(
            _env(
                {
                    "/app-health/api/livez": {"kind": "grpc", "port": port},
                    "/app-health/api/readyz": {"kind": "grpc", "port": port, "service": "payments"},
                }
            )
        )
        assert await probes.check("/app-health/api/livez") == 200
        assert await probes.check("/app-health/api/readyz") == 503
    finally:
        await server.stop(0)


def test_malformed_entries_are_skipped() -> None:
    probes = parse(
        json.dumps(
            {"/a": {"kind": "exec", "port": 1}, "/b": {"kind": "tcp"}, "/c": {"kind": "tcp", "port": 80}}
        )
    )
    assert list(probes) == ["/c"]
    assert parse("not json") == {}
    assert parse(None) == {}
