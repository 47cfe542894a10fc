"""The sidecar's listeners: accept, recover the original destination, detect the protocol, hand off.

Owns: ``Listener`` (one per direction: outbound 15001, inbound 15006), the
per-connection sniffer that reads the first bytes and picks the HTTP/1,
HTTP/2 or TCP handler, the registry of live connections, and graceful drain.

Invariants:
  * The original destination comes from ``SO_ORIGINAL_DST``; without a nat entry
    the listener uses ``destination_override`` (a test seam) or the local address.
    A destination equal to this listener (a loop: the app dialled the proxy port, or
    traffic was not redirected) is closed with a log line, never proxied.
  * Protocol detection looks at no more than ``detect.MAX_PREFIX`` bytes and waits at
    most ``sniff_timeout`` for them (server-first protocols send nothing: they become
    TCP). Ports declared opaque / services with protocol tcp are never sniffed; ports
    declared http2 skip detection; ports declared http1 only tell HTTP/2 prior knowledge
    from HTTP/1 (never TCP, and a silent client is HTTP/1 after the sniff timeout).
  * Every accepted connection is registered until it closes, so ``drain`` can stop
    them gracefully (finish in-flight requests, GOAWAY for HTTP/2) and abort the
    rest at the deadline.

Concurrency: asyncio; protocol callbacks for the sniffing phase, then the codec's
own tasks (HTTP) or one named task per TCP connection, kept in the registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import socket
from dataclasses import dataclass, field
from typing import cast

from meshproxy.config.model import Protocol
from meshproxy.core.detect import Detected, detect
from meshproxy.io.exchange import DownstreamContext
from meshproxy.io.http1_server import Http1ServerProtocol, Http1Settings
from meshproxy.io.http2_server import Http2ServerConnection, Http2ServerSettings, serve_http2
from meshproxy.io.proxy import Proxy, local_reply_for
from meshproxy.io.sockopt import normalize_address, original_dst, set_nodelay

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ListenerSettings:
    direction: str  # "outbound" or "inbound"
    port: int
    host: str = "::"  # dual-stack where IPv6 exists, else 0.0.0.0
    backlog: int = 1024  # a burst of new connections from a busy app must not see SYN drops
    # Server-first protocols (MySQL, SMTP, ...) say nothing first; 100 ms is far above a
    # client's first write after connect and short enough not to be noticed by a human.
    sniff_timeout: float = 0.1
    destination_override: tuple[str, int] | None = None  # used when there is no SO_ORIGINAL_DST
    http1: Http1Settings = field(default_factory=Http1Settings)
    http2: Http2ServerSettings = field(default_factory=Http2ServerSettings)


class _Connection:
    """Registry entry for one accepted connection, whatever protocol it turned out to speak."""

    def __init__(self, conn_id: int) -> None:
        self.id = conn_id
        self.kind = "sniffing"
        self.transport: asyncio.Transport | None = None
        self.http1: Http1ServerProtocol | None = None
        self.http2: Http2ServerConnection | None = None
        self.task: asyncio.Task[None] | None = None


class _Sniffer(asyncio.Protocol):
    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.entry = _Connection(listener._next_id())
        self.buffer = bytearray()
        self.timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None
        self.ctx: DownstreamContext | None = None
        self.done = False
        self.tcp_pending = False  # decided TCP, waiting for the upstream connection
        self.eof = False
        self.http_only = False  # declared HTTP: anything that is not HTTP/2 is HTTP/1

    def _decide(self, result: Detected) -> Detected:
        if result is Detected.HTTP2 or not self.http_only:
            return result
        return Detected.HTTP1  # its parser answers garbage with 400, silence with 408

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, hence a cast, not an assert.
        self.transport = self.entry.transport = t = cast(asyncio.Transport, transport)
        lst = self.listener
        sock = t.get_extra_info("socket")
        set_nodelay(sock)
        peer = t.get_extra_info("peername") or ("", 0)
        local = t.get_extra_info("sockname") or ("", 0)
        dst = original_dst(sock) if sock is not None else None
        if dst is None:
            dst = lst.settings.destination_override or (normalize_address(local[0]), local[1])
        if lst.is_self(dst):
            log.warning(
                "closing a connection to the proxy itself (not redirected, or a routing loop)",
                extra={
                    "direction": lst.settings.direction,
                    "peer": f"{peer[0]}:{peer[1]}",
                    "dst": f"{dst[0]}:{dst[1]}",
                },
            )
            t.abort()
            self.done = True
            return
        self.ctx = DownstreamContext(
            direction=lst.settings.direction,
            peer_address=normalize_address(peer[0]),
            peer_port=peer[1],
            original_dst_address=dst[0],
            original_dst_port=dst[1],
            connection_id=self.entry.id,
        )
        lst._register(self.entry)
        declared = lst.declared_protocol(dst)
        if declared is Protocol.TCP:
            self._handoff(Detected.TCP, eof=False)
        elif declared is Protocol.HTTP2:
            self._handoff(Detected.HTTP2, eof=False)
        else:
            # ``http1`` means "HTTP, never opaque TCP": the client may still speak HTTP/2 (prior
            # knowledge) and the upstream request then goes out as HTTP/1.1 (Proxy._upstream_version).
            self.http_only = declared is Protocol.HTTP1
            self.timer = asyncio.get_running_loop().call_later(lst.settings.sniff_timeout, self._timed_out)

    def data_received(self, data: bytes) -> None:
        if self.tcp_pending:
            # Handed to TCP but not spliced yet (uvloop may deliver a read even after
            # pause_reading in connection_made): keep it, and pause now that reading runs.
            self.buffer += data
            if self.transport is not None:
                self.transport.pause_reading()
            return
        if self.done:
            return
        self.buffer += data
        result = detect(bytes(self.buffer))
        if result is not Detected.NEED_MORE:
            self._handoff(self._decide(result), eof=False)

    def eof_received(self) -> bool:
        if self.tcp_pending:
            self.eof = True
            return True
        if self.done:
            return False
        if not self.buffer:
            return False  # connected and closed without a byte: nothing to proxy
        result = detect(bytes(self.buffer))
        self._handoff(self._decide(Detected.TCP if result is Detected.NEED_MORE else result), eof=True)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if not self.done:
            self.done = True
            self.listener._unregister(self.entry)

    def _timed_out(self) -> None:
        self.timer = None
        if not self.done:
            result = detect(bytes(self.buffer)) if self.buffer else Detected.TCP
            self._handoff(self._decide(Detected.TCP if result is Detected.NEED_MORE else result), eof=False)

    def _handoff(self, kind: Detected, *, eof: bool) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.done = True
        lst, t, ctx, entry = self.listener, self.transport, self.ctx, self.entry
        assert t is not None and ctx is not None
        data = bytes(self.buffer)
        self.buffer.clear()
        if kind is Detected.HTTP1:
            entry.kind = "http1"
            proto = Http1ServerProtocol(
                lst.proxy.handle,
                ctx,
                local_reply_for,
                lst.settings.http1,
                on_closed=lambda _p: lst._unregister(entry),
            )
            entry.http1 = proto
            t.set_protocol(proto)
            proto.connection_made(t)
            if data:
                proto.data_received(data)
            if eof:
                proto.eof_received()
        elif kind is Detected.HTTP2:
            entry.kind = "http2"
            conn = serve_http2(t, data, lst.proxy.handle, ctx, lst.settings.http2)
            entry.http2 = conn
            entry.task = asyncio.get_running_loop().create_task(
                self._await_h2(conn), name=f"h2-conn-{ctx.connection_id}"
            )
        else:
            entry.kind = "tcp"
            t.pause_reading()
            self.tcp_pending = True
            self.buffer += data
            self.eof = eof
            entry.task = asyncio.get_running_loop().create_task(
                self._tcp(ctx, t), name=f"tcp-conn-{ctx.connection_id}"
            )

    def _take_pending(self) -> tuple[bytes, bool]:
        self.tcp_pending = False
        data = bytes(self.buffer)
        self.buffer.clear()
        return data, self.eof

    async def _await_h2(self, conn: Http2ServerConnection) -> None:
        try:
            await conn.wait_closed()
        finally:
            self.listener._unregister(self.entry)

    async def _tcp(self, ctx: DownstreamContext, t: asyncio.Transport) -> None:
        try:
            await self.listener.proxy.handle_tcp(ctx, t, self._take_pending)
        except asyncio.CancelledError:
            t.abort()
        except Exception:
            log.exception("tcp connection failed", extra={"connection_id": ctx.connection_id})
            t.abort()
        finally:
            self.listener._unregister(self.entry)


class Listener:
    """One listening socket of the sidecar (see module doc)."""

    def __init__(self, settings: ListenerSettings, proxy: Proxy) -> None:
        self.settings = settings
        self.proxy = proxy
        self._server: asyncio.Server | None = None
        self._conns: dict[int, _Connection] = {}
        self._ids = itertools.count(1)
        self._idle = asyncio.Event()
        self._idle.set()
        self._bound: tuple[str, int] | None = None

    def _next_id(self) -> int:
        return next(self._ids)

    @property
    def port(self) -> int:
        assert self._bound is not None, "listener not started"
        return self._bound[1]

    @property
    def connections(self) -> int:
        return len(self._conns)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        sock = _bind(self.settings.host, self.settings.port, self.settings.backlog)
        self._server = await loop.create_server(
            lambda: _Sniffer(self), sock=sock, backlog=self.settings.backlog
        )
        name = sock.getsockname()
        self._bound = (normalize_address(name[0]), name[1])
        log.info(
            "listening",
            extra={"direction": self.settings.direction, "address": f"{name[0]}:{name[1]}"},
        )

    def is_self(self, dst: tuple[str, int]) -> bool:
        """Would connecting to ``dst`` reach this listener again?"""
        if self._bound is None or dst[1] != self._bound[1]:
            return False
        host = self._bound[0]
        if host in ("::", "0.0.0.0"):
            try:
                ip = ipaddress.ip_address(dst[0])
            except ValueError:
                return False
            # A wildcard listener is reached through any local address; loopback is the common case
            # and the one a misconfigured redirect produces. Other local addresses: ask the kernel.
            return ip.is_loopback or ip.is_unspecified or _is_local_address(dst[0])
        return normalize_address(dst[0]) == host

    def declared_protocol(self, dst: tuple[str, int]) -> Protocol:
        active = self.proxy.runtime.active
        if active is None:
            return Protocol.AUTO
        if self.settings.direction == "inbound":
            if dst[1] in active.snapshot.inbound.opaque_ports:
                return Protocol.TCP
            port = active.inbound_ports.get(dst[1])
            return port.protocol if port is not None else Protocol.AUTO
        svc = active.table.service_for(dst[0], dst[1], None)
        return svc.protocol if svc is not None else Protocol.AUTO

    def _register(self, entry: _Connection) -> None:
        self._conns[entry.id] = entry
        self._idle.clear()

    def _unregister(self, entry: _Connection) -> None:
        self._conns.pop(entry.id, None)
        if not self._conns:
            self._idle.set()

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def drain(self, deadline: float) -> None:
        """Finish in-flight work within ``deadline`` seconds, then abort what is left."""
        self.stop_accepting()
        shutdowns = []
        for entry in list(self._conns.values()):
            if entry.http1 is not None:
                entry.http1.shutdown()
            elif entry.http2 is not None:
                shutdowns.append(entry.http2.shutdown(deadline))
            elif entry.kind == "sniffing" and entry.transport is not None:
                entry.transport.close()
        gathered = asyncio.gather(*shutdowns, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(deadline):
                await self._idle.wait()
        if not gathered.done():
            gathered.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await gathered
        for entry in list(self._conns.values()):
            if entry.transport is not None:
                entry.transport.abort()
            if entry.task is not None:
                entry.task.cancel()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._server.wait_closed()


def _bind(host: str, port: int, backlog: int) -> socket.socket:
    """A listening socket; ``::`` is dual-stack (IPV6_V6ONLY off) and falls back to IPv4."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
        if family != socket.AF_INET6 or host != "::":
            raise
        family, host = socket.AF_INET, "0.0.0.0"
        sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _is_local_address(address: str) -> bool:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.bind((address, 0))
        except OSError:
            return False
    return True
