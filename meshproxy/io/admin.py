"""The sidecar's admin HTTP server (port 15000): readiness, metrics, state dumps, control.

Owns: a small HTTP/1.1 server (asyncio streams + httptools), separate from the
data path, serving:

    GET  /ready            200 once the first config is applied, else 503 (the pod's readinessProbe)
    GET  /healthz          200 while the event loop answers (livenessProbe)
    GET  /metrics          Prometheus text, or OpenMetrics (with exemplars) when the scraper
                           sends ``Accept: application/openmetrics-text``
    GET  /config_dump      the snapshot in use, as JSON
    GET  /clusters         endpoints with health, ejection and in-flight requests, as JSON
    GET  /stats/breakers   circuit-breaker state per destination, as JSON
    GET  /logging          current log levels; POST /logging?level=debug[&logger=meshproxy.io]
    POST /quitquitquit     ask the proxy to shut down (loopback peers only)

Everything the server reports comes from callables injected at construction,
so it holds no proxy state and the wiring (``meshproxy.io.app``) decides what
"ready" means.

Invariants:
  * Binds 127.0.0.1 by default: state dumps and /quitquitquit are not for the
    network. Binding 0.0.0.0 (for Prometheus scraping in a cluster) is an
    explicit choice of the caller; /quitquitquit still refuses non-loopback peers.
  * Bounded: at most ``max_connections`` connections (more are closed at once),
    64 KiB of request head and body, an idle timeout per connection.
  * A failing callable answers 500 for that request; it never kills the server.

Concurrency: one asyncio task per connection (created by ``asyncio.start_server``,
tracked so ``close`` can end them); requests on a connection are answered in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import httptools
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 1024
IDLE_TIMEOUT = 30.0
APP_HEALTH_PREFIX = b"/app-health/"  # must match controlplane/inject.py's probe rewriting
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


@dataclass(slots=True)
class _Request:
    method: str = ""
    keep_alive: bool = True
    url: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


_REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def _json(value: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(value, indent=2, default=str).encode() + b"\n", "application/json")


def _text(status: int, text: str) -> Response:
    return Response(status, text.encode() + b"\n")


def _is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


class _Parser:
    """httptools callbacks collecting complete requests."""

    def __init__(self) -> None:
        self.current = _Request()
        self.done: list[_Request] = []
        self.size = 0
        self.parser: Any = None  # the httptools parser feeding us (method and keep-alive live there)

    def on_url(self, url: bytes) -> None:
        self.current.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.current.method = self.parser.get_method().decode("latin-1")
        self.current.keep_alive = bool(self.parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        self.current.body += body

    def on_message_complete(self) -> None:
        self.done.append(self.current)
        self.current = _Request()


class AdminServer:
    """The admin endpoint. ``await start()`` to listen; ``port`` is the bound port."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 15000,
        *,
        metrics_registry: CollectorRegistry,
        ready: Callable[[], bool],
        config_dump: Callable[[], dict[str, Any]],
        clusters: Callable[[], list[dict[str, Any]]],
        breakers: Callable[[], list[dict[str, Any]]],
        on_quit: Callable[[], None],
        app_health: Callable[[str], Awaitable[int | None]] | None = None,
        root_logger: str = "meshproxy",
        max_connections: int = 64,
    ) -> None:
        self.host = host
        self._requested_port = port
        self._registry = metrics_registry
        self._ready = ready
        self._config_dump = config_dump
        self._clusters = clusters
        self._breakers = breakers
        self._on_quit = on_quit
        self._app_health = app_health
        self._root_logger = root_logger
        self._max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("admin server not started")
        return self._port

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self._requested_port)
        self._port = self._server.sockets[0].getsockname()[1]
        log.info("admin server listening on %s:%d", self.host, self._port)

    async def close(self) -> None:
        """Stop listening and close open connections."""
        if self._server is None:
            return
        self._server.close()
        for w in list(self._writers):
            w.close()
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> AdminServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- connection ---------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._writers) >= self._max_connections:
            writer.close()
            return
        self._writers.add(writer)
        peer = writer.get_extra_info("peername")
        peer_host = str(peer[0]) if peer else ""
        sink = _Parser()
        parser = httptools.HttpRequestParser(sink)
        sink.parser = parser
        try:
            while True:
                async with asyncio.timeout(IDLE_TIMEOUT):
                    data = await reader.read(16384)
                if not data:
                    return
                sink.size += len(data)
                try:
                    parser.feed_data(data)
                except httptools.HttpParserError:
                    await self._write(writer, _text(400, "malformed request"), keep_alive=False)
                    return
                if sink.size > MAX_REQUEST_BYTES and not sink.done:
                    await self._write(writer, _text(413, "request too large"), keep_alive=False)
                    return
                while sink.done:
                    req = sink.done.pop(0)
                    sink.size = 0
                    keep_alive = req.keep_alive
                    if req.url.startswith(APP_HEALTH_PREFIX):
                        response, after = await self._probe(req), None
                    else:
                        response, after = self._dispatch(req, peer_host)
                    await self._write(writer, response, keep_alive=keep_alive)
                    if after is not None:
                        after()
                    if not keep_alive:
                        return
        except (TimeoutError, ConnectionError):
            return
        except Exception:
            log.exception("admin connection from %s failed", peer_host)
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _write(self, writer: asyncio.StreamWriter, r: Response, *, keep_alive: bool) -> None:
        head = (
            f"HTTP/1.1 {r.status} {_REASONS.get(r.status, '')}\r\n"
            f"content-type: {r.content_type}\r\n"
            f"content-length: {len(r.body)}\r\n"
            f"connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
        )
        writer.write(head.encode("latin-1") + r.body)
        await writer.drain()

    # -- routes ------------------------------------------------------------------------------

    async def _probe(self, req: _Request) -> Response:
        """kubelet's probe of an app container, rewritten by the injector to this port.

        The app listens on the pod's loopback only as far as kubelet is concerned: its probe
        port is behind interception, so the injector points kubelet here and the sidecar runs
        the original probe against 127.0.0.1 (``app_health``; ``meshproxy.io.app_probes``).
        """
        if req.method != "GET":
            return _text(405, "use GET")
        path = req.url.split(b"?", 1)[0].decode("latin-1")
        status = None if self._app_health is None else await self._app_health(path)
        if status is None:
            return _text(404, f"no such app probe: {path}")
        return _text(status, "ok" if status == 200 else "probe failed")

    def _dispatch(self, req: _Request, peer_host: str) -> tuple[Response, Callable[[], None] | None]:
        url = httptools.parse_url(req.url)
        path = url.path.decode("latin-1")
        query = {k: v[-1] for k, v in parse_qs((url.query or b"").decode("latin-1")).items()}
        try:
            return self._route(req.method, path, query, req, peer_host)
        except Exception as e:
            log.exception("admin %s %s failed", req.method, path)
            return _text(500, f"error: {type(e).__name__}: {e}"), None

    def _route(
        self, method: str, path: str, query: dict[str, str], req: _Request, peer_host: str
    ) -> tuple[Response, Callable[[], None] | None]:
        gets: dict[str, Callable[[], Response]] = {
            "/": self._index,
            "/ready": lambda: _text(200, "ready") if self._ready() else _text(503, "not ready"),
            "/healthz": lambda: _text(200, "ok"),
            "/metrics": lambda: self._metrics(req.headers.get("accept", "")),
            "/config_dump": lambda: _json(self._config_dump()),
            "/clusters": lambda: _json(self._clusters()),
            "/stats/breakers": lambda: _json(self._breakers()),
        }
        if path == "/logging":
            if method == "GET":
                return self._logging(query, change=False), None
            if method == "POST":
                return self._logging(query, change=True), None
            return _text(405, "use GET or POST"), None
        if path == "/quitquitquit":
            if method != "POST":
                return _text(405, "use POST"), None
            if not _is_loopback(peer_host):
                return _text(403, "only from loopback"), None
            # Answer first, then ask for shutdown: the caller (a preStop hook) gets its 200.
            return _text(200, "OK"), self._on_quit
        handler = gets.get(path)
        if handler is None:
            return _text(404, f"no such endpoint: {path}"), None
        if method != "GET":
            return _text(405, "use GET"), None
        return handler(), None

    def _index(self) -> Response:
        return _text(
            200,
            "\n".join(
                [
                    "GET  /ready /healthz /metrics /config_dump /clusters /stats/breakers /logging",
                    "POST /logging?level=debug|info|warning|error[&logger=NAME]  /quitquitquit",
                ]
            ),
        )

    def _metrics(self, accept: str) -> Response:
        encoder, content_type = choose_encoder(accept)
        return Response(200, encoder(self._registry), content_type)

    def _logging(self, query: dict[str, str], *, change: bool) -> Response:
        name = query.get("logger", self._root_logger)
        if change:
            level = query.get("level", "").lower()
            if level not in LEVELS:
                return _text(400, f"level must be one of {', '.join(LEVELS)}")
            logging.getLogger(name).setLevel(LEVELS[level])
            log.warning("log level of %s set to %s via admin", name, level)
        names = sorted({name, self._root_logger})
        return _json(
            {n: logging.getLevelName(logging.getLogger(n).getEffectiveLevel()).lower() for n in names}
        )
