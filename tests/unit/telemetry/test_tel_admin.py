"""The admin server, over real loopback HTTP with httpx."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families
from tel_rig import eventually, head

from meshproxy.config import model
from meshproxy.io.admin import AdminServer, _is_loopback
from meshproxy.telemetry import Telemetry


@dataclass
class State:
    ready: bool = False
    quits: int = 0
    dump: dict[str, Any] = field(default_factory=lambda: {"version": "abc", "services": []})


@pytest.fixture
async def admin() -> AsyncIterator[tuple[AdminServer, State, Telemetry, httpx.AsyncClient]]:
    state = State()
    tel = Telemetry.build(model.Telemetry(), model.Workload(name="frontend", namespace="demo"), env={})

    def broken() -> list[dict[str, Any]]:
        raise RuntimeError("boom")

    server = AdminServer(
        "127.0.0.1",
        0,
        metrics_registry=tel.metrics.registry,
        ready=lambda: state.ready,
        config_dump=lambda: state.dump,
        clusters=lambda: [
            {"service": "inv.demo:8080", "endpoints": [{"address": "198.18.0.5", "healthy": True}]}
        ],
        breakers=broken,
        on_quit=lambda: setattr(state, "quits", state.quits + 1),
    )
    await server.start()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=5) as client:
        yield server, state, tel, client
    await server.close()
    await tel.shutdown()


async def test_ready_flips_after_first_config(admin: Any) -> None:
    _, state, _, client = admin
    assert (await client.get("/ready")).status_code == 503
    state.ready = True
    assert (await client.get("/ready")).status_code == 200
    assert (await client.get("/healthz")).status_code == 200


async def test_metrics_text_and_openmetrics_with_exemplar(admin: Any) -> None:
    _, _, tel, client = admin
    hop = tel.start_http(direction="outbound", head=head(), peer=("127.0.0.1", 1), destination_service="inv")
    hop.finish(status=200, flag=None, request_bytes=0, response_bytes=0)

    r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    names = {s.name for f in text_string_to_metric_families(r.text) for s in f.samples}
    assert "meshproxy_requests_total" in names

    # The Accept header Prometheus sends when exemplar storage is on.
    prometheus_accept = (
        "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
        "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
    )
    r = await client.get("/metrics", headers={"accept": prometheus_accept})
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    exemplars = [s.exemplar for f in parse_openmetrics(r.text) for s in f.samples if s.exemplar is not None]
    assert [e.labels["trace_id"] for e in exemplars] == [hop.trace_id]


async def test_dumps_are_json_from_the_callables(admin: Any) -> None:
    _, state, _, client = admin
    assert (await client.get("/config_dump")).json() == state.dump
    clusters = (await client.get("/clusters")).json()
    assert clusters[0]["service"] == "inv.demo:8080"
    # A failing callable answers 500 and the server keeps serving.
    r = await client.get("/stats/breakers")
    assert r.status_code == 500 and "boom" in r.text
    assert (await client.get("/healthz")).status_code == 200


async def test_unknown_path_and_wrong_method(admin: Any) -> None:
    _, _, _, client = admin
    assert (await client.get("/nope")).status_code == 404
    assert (await client.post("/config_dump")).status_code == 405
    assert (await client.get("/quitquitquit")).status_code == 405


async def test_runtime_log_level(admin: Any) -> None:
    _, _, _, client = admin
    logger = logging.getLogger("meshproxy.io")
    before = logger.level
    try:
        r = await client.post("/logging", params={"level": "debug", "logger": "meshproxy.io"})
        assert r.status_code == 200 and r.json()["meshproxy.io"] == "debug"
        assert logger.getEffectiveLevel() == logging.DEBUG
        assert (await client.get("/logging", params={"logger": "meshproxy.io"})).json()[
            "meshproxy.io"
        ] == "debug"
        assert (await client.post("/logging", params={"level": "loud"})).status_code == 400
    finally:
        logger.setLevel(before)


async def test_quitquitquit_from_loopback_calls_back_after_answering(admin: Any) -> None:
    _, state, _, client = admin
    r = await client.post("/quitquitquit")
    assert r.status_code == 200
    assert await eventually(lambda: state.quits == 1)


def test_loopback_check() -> None:
    assert _is_loopback("127.0.0.1") and _is_loopback("127.9.9.9") and _is_loopback("::1")
    assert _is_loopback("::ffff:127.0.0.1")
    assert not _is_loopback("198.18.0.5") and not _is_loopback("::ffff:198.18.0.5") and not _is_loopback("")


async def test_keep_alive_pipelined_requests_and_malformed_input(admin: Any) -> None:
    server, state, _, _ = admin
    state.ready = True
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /ready HTTP/1.1\r\nhost: x\r\n\r\nGET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
    await writer.drain()
    data = b""
    while data.count(b"HTTP/1.1 200") < 2:
        chunk = await asyncio.wait_for(reader.read(4096), 5)
        assert chunk, data
        data += chunk
    assert data.index(b"ready") < data.index(b"ok")
    writer.write(b"NOT HTTP AT ALL\r\n\r\n")
    await writer.drain()
    rest = await asyncio.wait_for(reader.read(), 5)  # answered 400, then closed
    assert rest.startswith(b"HTTP/1.1 400")
    writer.close()


async def test_app_health_runs_the_apps_original_probe() -> None:
    """kubelet's rewritten probe (/app-health/<container>/<probe>) reaches the app's own check."""
    import json
    import os

    from meshproxy.io.app_probes import AppProbes

    healthy = {"value": True}

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        status = b"200 OK" if healthy["value"] else b"500 Internal Server Error"
        writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    app_server = await asyncio.start_server(app, "127.0.0.1", 0)
    app_port = app_server.sockets[0].getsockname()[1]
    probes = AppProbes.from_env(
        {
            **os.environ,
            "MESHPROXY_APP_PROBES": json.dumps(
                {
                    "/app-health/web/readyz": {
                        "kind": "http",
                        "port": app_port,
                        "path": "/healthz",
                        "scheme": "HTTP",
                        "headers": [],
                        "timeoutSeconds": 2,
                    }
                }
            ),
        }
    )
    tel = Telemetry.build(model.Telemetry(), model.Workload(name="web", namespace="demo"), env={})
    server = AdminServer(
        "127.0.0.1",
        0,
        metrics_registry=tel.metrics.registry,
        ready=lambda: True,
        config_dump=dict,
        clusters=list,
        breakers=list,
        on_quit=lambda: None,
        app_health=probes.check,
    )
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=5) as client:
            assert (await client.get("/app-health/web/readyz")).status_code == 200
            healthy["value"] = False
            assert (await client.get("/app-health/web/readyz")).status_code == 503
            assert (await client.get("/app-health/other/livez")).status_code == 404
    finally:
        await server.close()
        app_server.close()
        await tel.shutdown()
