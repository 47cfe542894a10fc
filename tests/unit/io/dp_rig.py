"""Test rig for the data path: real loopback upstreams and an in-process sidecar.

* ``Upstream``: a stdlib ``ThreadingHTTPServer`` speaking HTTP/1.1 with keep-alive on
  127.0.0.1, recording which client connections it saw, with a few behaviours
  (echo, chunked streaming, status codes, flaky, slow).
* ``RawServer``: an asyncio TCP server on 127.0.0.1 running a coroutine per connection
  (echo, server-first greeting, WebSocket-style 101 then echo).
* ``Sidecar``: ``Runtime`` + ``Proxy`` + ``Listener`` on 127.0.0.1 with a fixed
  ``destination_override`` (the test seam standing in for SO_ORIGINAL_DST).

Everything listens and connects on loopback only.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import uvloop
from prometheus_client import CollectorRegistry

from meshproxy.config.model import Endpoint, Service, Snapshot
from meshproxy.core.clock import Clock, MonotonicClock
from meshproxy.io.exchange import UpstreamClient
from meshproxy.io.http1_client import Http1Client
from meshproxy.io.http1_server import Http1Settings
from meshproxy.io.http2_client import Http2Client
from meshproxy.io.proxy import Proxy
from meshproxy.io.runtime import Runtime
from meshproxy.io.server import Listener, ListenerSettings
from meshproxy.telemetry.hop import Telemetry

VIP = "198.18.0.10"  # a service ClusterIP: only ever a routing key, never dialled


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if "chunked" in (self.headers.get("transfer-encoding") or "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("content-length") or 0)
        return self.rfile.read(n) if n else b""

    def _count_body(self) -> int:
        """Read and drop the body, counting it (bounded memory for big uploads)."""
        total = 0
        if "chunked" in (self.headers.get("transfer-encoding") or "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return total
                left = size
                while left:
                    left -= len(self.rfile.read(min(left, 1 << 16)))
                total += size
                self.rfile.readline()
        n = int(self.headers.get("content-length") or 0)
        while total < n:
            chunk = self.rfile.read(min(n - total, 1 << 16))
            if not chunk:
                break
            total += len(chunk)
        return total

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        srv = self.server
        with srv.lock:
            srv.requests += 1
            srv.connections.add(self.client_address)
            srv.paths.append(self.path)
        url = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        path = url.path
        if path == "/echo":
            self._send(200, self._body(), {"x-method": self.command})
        elif path == "/sink":
            self._send(200, str(self._count_body()).encode())
        elif path == "/headers":
            self._body()
            self._send(200, json.dumps([[k.lower(), v] for k, v in self.headers.items()]).encode())
        elif path.startswith("/status/"):
            self._body()
            self._send(int(path.rsplit("/", 1)[1]), b"status\n")
        elif path == "/flaky":
            self._body()
            with srv.lock:
                fail = srv.flaky_failures > 0
                srv.flaky_failures -= 1 if fail else 0
            self._send(503 if fail else 200, b"flaky-fail\n" if fail else b"flaky-ok\n")
        elif path == "/slow":
            self._body()
            srv.release.wait(float(q.get("max", "10")))
            self._send(200, b"slow\n")
        elif path == "/stream":
            self._body()
            n, size = int(q.get("n", "5")), int(q.get("size", "10"))
            self.send_response(200)
            self.send_header("transfer-encoding", "chunked")
            self.send_header("trailer", "x-checksum")
            self.end_headers()
            for i in range(n):
                data = bytes([65 + i % 26]) * size
                self.wfile.write(b"%x\r\n%b\r\n" % (len(data), data))
                self.wfile.flush()
            self.wfile.write(b"0\r\nx-checksum: done\r\n\r\n")
        elif path == "/big":
            self._body()
            n = int(q.get("n", "1000"))
            self.send_response(200)
            self.send_header("content-length", str(n))
            self.end_headers()
            block = b"x" * (1 << 16)
            left = n
            while left:
                step = min(left, len(block))
                self.wfile.write(block[:step])
                left -= step
        else:
            self._body()
            self._send(200, b"hello\n")

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # the listen backlog: bursts of concurrent connections (5 by default)

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.requests = 0
        self.connections: set[tuple[str, int]] = set()
        self.paths: list[str] = []
        self.flaky_failures = 0
        self.release = threading.Event()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A proxy that gave up on a request (timeout tests) closes the socket under a handler.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class Upstream:
    """A real HTTP/1.1 server on loopback, in a thread."""

    def __init__(self) -> None:
        self.server = _Server()
        self.thread = threading.Thread(target=self.server.serve_forever, name="upstream", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def __enter__(self) -> Upstream:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.release.set()
        self.server.shutdown()
        self.server.server_close()


ConnHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """An asyncio TCP server on loopback running ``handler`` per connection."""

    def __init__(self, handler: ConnHandler) -> None:
        self.handler = handler
        self.server: asyncio.Server | None = None
        self.accepted = 0

    async def _run(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            await self.handler(r, w)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the proxy hung up on a scripted upstream: the test checks what it saw
        finally:
            w.close()

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._run, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])


async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while data := await r.read(65536):
        w.write(data)
        await w.drain()
    # Half-close: the client finished sending; answer once more, then close.
    w.write(b"<eof>")
    await w.drain()


@dataclass
class Sidecar:
    """An in-process sidecar listener for one direction, fed one snapshot."""

    snapshot: Snapshot | None
    destination: tuple[str, int] | None
    direction: str = "outbound"
    clock: Clock = field(default_factory=MonotonicClock)
    sniff_timeout: float = 0.1
    telemetry: Telemetry | None = None
    http1: Http1Settings = field(default_factory=Http1Settings)
    http2_upstreams: bool = False  # an HTTP/2 client too (else HTTP/2 requests go upstream as HTTP/1.1)
    runtime: Runtime = field(init=False)
    client: Http1Client = field(init=False)
    h2_client: Http2Client = field(init=False)
    proxy: Proxy = field(init=False)
    listener: Listener = field(init=False)

    async def __aenter__(self) -> Sidecar:
        self.runtime = Runtime(clock=self.clock, rng=random.Random(7))
        if self.snapshot is not None:
            self.runtime.apply(self.snapshot)
        self.client = Http1Client()
        clients: dict[str, UpstreamClient] = {"1.1": self.client}
        if self.http2_upstreams:
            clients["2"] = self.h2_client = Http2Client()
        self.proxy = Proxy(self.runtime, clients, telemetry=self.telemetry, rng=random.Random(11))
        self.listener = Listener(
            ListenerSettings(
                direction=self.direction,
                port=0,
                host="127.0.0.1",
                destination_override=self.destination,
                sniff_timeout=self.sniff_timeout,
                http1=self.http1,
            ),
            self.proxy,
        )
        await self.listener.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.listener.drain(1.0)
        await self.client.close()
        if self.http2_upstreams:
            await self.h2_client.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.port}"


def service(port: int, *, endpoints: tuple[Endpoint, ...] | None = None, **kw: Any) -> Service:
    """A service reached at VIP:80 whose endpoint is the loopback upstream on ``port``."""
    eps = endpoints if endpoints is not None else (Endpoint(address="127.0.0.1", port=port),)
    return Service(name="web", namespace="demo", port=80, vips=(VIP,), endpoints=eps, **kw)


def snapshot(*services: Service) -> Snapshot:
    return Snapshot(services=tuple(services)).with_version()


async def wait_for(cond: Callable[[], bool], within: float = 5.0) -> None:
    """Poll ``cond`` until true (never a fixed sleep as synchronisation)."""
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    """Data-path tests run on both event loops the sidecar supports (import this into a test module)."""
    if request.param == "uvloop":
        policy: asyncio.AbstractEventLoopPolicy = uvloop.EventLoopPolicy()
        return policy
    return asyncio.DefaultEventLoopPolicy()


def requests_by_flag(registry: CollectorRegistry) -> dict[str, float]:
    """``meshproxy_requests_total`` summed by response flag."""
    out: dict[str, float] = {}
    for metric in registry.collect():
        if metric.name != "meshproxy_requests":
            continue
        for s in metric.samples:
            if s.name.endswith("_total"):
                flag = s.labels["response_flag"]
                out[flag] = out.get(flag, 0.0) + s.value
    return out
