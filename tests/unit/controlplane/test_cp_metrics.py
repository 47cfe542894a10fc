"""The control plane's /metrics, /healthz and /ready endpoint over a real socket."""

from __future__ import annotations

import asyncio

from controlplane.metrics import ControlPlaneMetrics, MetricsServer


async def get(port: int, raw: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_health_readiness_and_metrics() -> None:
    ready = False
    metrics = ControlPlaneMetrics()
    server = MetricsServer(metrics, lambda: ready)
    port = await server.start("127.0.0.1", 0)
    try:
        assert (await get(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"))[0] == 200
        assert (await get(port, b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n"))[0] == 503
        ready = True
        assert (await get(port, b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n"))[0] == 200
        metrics.nacks.inc()
        metrics.watch_restarted("Pod", "gone")
        status, body = await get(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200 and b"meshcp_nacks_total 1.0" in body
        assert b'meshcp_watch_restarts_total{kind="Pod",reason="gone"} 1.0' in body
        assert (await get(port, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"))[0] == 404
        assert (await get(port, b"NOT HTTP AT ALL\r\n\r\n"))[0] == 400
        assert (await get(port, b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\n\r\n"))[0] == 400
    finally:
        await server.close()
