"""The control plane's Prometheus metrics and its /metrics, /healthz, /ready endpoint.

Owns: ``ControlPlaneMetrics`` (every metric, registered on a registry built at
start-up and passed in; nothing is registered at import time) and
``MetricsServer``, a tiny asyncio HTTP/1.1 server on port 15014:

    GET /metrics   Prometheus text format
    GET /healthz   200 while the event loop runs (liveness)
    GET /ready     200 once ``ready()`` says so (the cluster was listed and the
                   gRPC server is up), else 503 (readiness)

Metric names follow Prometheus conventions (``meshcp_`` prefix); labels are
bounded (no node names).

Invariants: one request per connection (``Connection: close``); a request head
is at most 8 KiB and must arrive within 5 s, so a slow or hostile scraper
cannot hold memory or a task for long. Concurrency: asyncio, one short task per
connection (asyncio.start_server owns them). Metric methods are thread-safe
(prometheus_client), so the watch's threads may call ``watch_restarted``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import httptools
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ControlPlaneMetrics:
    """Every metric the control plane reports, on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.connected_proxies = Gauge(
            "meshcp_connected_proxies", "Proxies with an open discovery stream.", registry=r
        )
        self.pushes = Counter("meshcp_pushes_total", "Snapshots sent to proxies.", registry=r)
        self.acks = Counter("meshcp_acks_total", "Snapshots proxies ACKed.", registry=r)
        self.nacks = Counter("meshcp_nacks_total", "Snapshots proxies rejected (NACK).", registry=r)
        self.stale_requests = Counter(
            "meshcp_stale_requests_total",
            "ACK/NACKs ignored because their nonce was not the latest.",
            registry=r,
        )
        self.slow_closes = Counter(
            "meshcp_slow_proxy_closes_total",
            "Streams closed with RESOURCE_EXHAUSTED because the proxy did not keep up.",
            registry=r,
        )
        self.push_latency = Histogram(
            "meshcp_push_latency_seconds",
            "From sending a snapshot to the proxy's ACK.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.convergence_latency = Histogram(
            "meshcp_convergence_latency_seconds",
            "From the first cluster event of a burst to the compiled snapshots being published.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.compile_duration = Histogram(
            "meshcp_compile_duration_seconds",
            "Time to compile the mesh and every connected workload's snapshot.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.compile_errors = Counter(
            "meshcp_compile_errors_total",
            "Reconciles that failed (the last good snapshots were kept).",
            registry=r,
        )
        self.watch_restarts = Counter(
            "meshcp_watch_restarts_total",
            "Times a watch started over (gone: relist after 410; error: backoff; missing: kind absent).",
            ["kind", "reason"],
            registry=r,
        )
        self.policies = Gauge(
            "meshcp_policies",
            "HTTPRoutes and TrafficPolicies by acceptance.",
            ["kind", "accepted"],
            registry=r,
        )

    # Callbacks with the shapes other modules expect.

    def watch_restarted(self, kind: str, reason: str) -> None:
        self.watch_restarts.labels(kind=kind, reason=reason).inc()


class _Request:
    """httptools callbacks for one request head."""

    def __init__(self) -> None:
        self.url = b""
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_headers_complete(self) -> None:
        self.complete = True


class MetricsServer:
    """Serves /metrics, /healthz and /ready until ``close()``."""

    MAX_HEAD = 8 * 1024
    READ_TIMEOUT = 5.0

    def __init__(self, metrics: ControlPlaneMetrics, ready: Callable[[], bool]) -> None:
        self._metrics = metrics
        self._ready = ready
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (useful with port 0)."""
        self._server = await asyncio.start_server(self._handle, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _respond(self, path: str) -> tuple[int, str, bytes]:
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self._metrics.registry)
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/ready":
            return (200, "text/plain", b"ready\n") if self._ready() else (503, "text/plain", b"not ready\n")
        return 404, "text/plain", b"not found\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, ctype, body = await self._read_and_route(reader)
            reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 503: "Service Unavailable"}[status]
            head = (
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode("latin-1") + body)
            await writer.drain()
        except (ConnectionError, _Gone):
            pass
        finally:
            writer.close()

    async def _read_and_route(self, reader: asyncio.StreamReader) -> tuple[int, str, bytes]:
        req = _Request()
        parser = httptools.HttpRequestParser(req)
        seen = 0
        try:
            async with asyncio.timeout(self.READ_TIMEOUT):
                while not req.complete:
                    chunk = await reader.read(4096)
                    if not chunk:
                        raise _Gone
                    seen += len(chunk)
                    if seen > self.MAX_HEAD:
                        return 400, "text/plain", b"request head too large\n"
                    parser.feed_data(chunk)
        except (httptools.HttpParserError, TimeoutError):
            return 400, "text/plain", b"bad request\n"
        path = httptools.parse_url(req.url).path.decode("latin-1")
        return self._respond(path)


class _Gone(Exception):
    """The client closed the connection before sending a whole request head."""
