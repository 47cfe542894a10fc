"""HTTP/1.1 downstream codec: an ``asyncio.Protocol`` over httptools' request parser.

Owns: one downstream HTTP/1.x connection: parsing requests, keep-alive,
sequential handling of pipelined requests, streaming request bodies to the
pipeline and responses back (content-length, chunked with trailers, or
close-delimited for HTTP/1.0), ``Expect: 100-continue``, malformed input
(-> 400 and close), and handing the raw transport over after an Upgrade/CONNECT.

Invariants:
  * Requests on one connection are handled strictly one after another; pipelined
    requests wait in a bounded queue (reading pauses when it is full).
  * Reading pauses when the current request's body queue is above its high-water
    mark, so a slow upstream bounds memory whatever the client sends.
  * ``send_data`` awaits while the transport's write buffer is above its mark.
  * A parse error never raises out of the protocol: it becomes a local reply (400,
    or 431 for oversized headers) after the requests before it, then a close.
  * The connection is only reused when the response was complete and the request
    body was read to its end; otherwise it is closed after the response.

Concurrency: protocol callbacks feed the parser on the event loop; one named task
per connection (``_serve``) runs the pipeline for each request in turn. Losing the
connection cancels that task, which cancels the upstream exchange.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import httptools

from meshproxy.core.errors import ProtocolError, ProxyError
from meshproxy.core.http import Headers, RequestHead, ResponseHead, get_header
from meshproxy.io.body import BodyQueue, DownstreamClosedError
from meshproxy.io.exchange import DownstreamContext, RequestHandler

log = logging.getLogger(__name__)

LocalReply = Callable[[ProxyError], tuple[ResponseHead, bytes]]
"""Turns an error into the response the client gets (``meshproxy.io.proxy.local_reply``)."""

_NO_BODY_STATUS = frozenset({204, 304})


@dataclass(frozen=True, slots=True)
class Http1Settings:
    # 64 KiB: the largest header block common servers accept (nginx allows 4x8 KiB, Node 16 KiB);
    # beyond that a request is almost certainly abuse and gets 431.
    max_header_bytes: int = 64 * 1024
    # Per-request body buffer before reading pauses: one socket read or so, keeps RSS flat.
    body_high_water: int = 64 * 1024
    # Transport write buffer before send_data waits: same reasoning, for responses.
    write_high_water: int = 64 * 1024
    # Idle keep-alive connections are closed after this (clients reconnect cheaply).
    keepalive_timeout: float = 300.0
    # A started request head must be complete within this; slow-drip heads are an attack.
    header_timeout: float = 30.0
    # Pipelined requests parsed ahead of the one being handled; rarely more than a few.
    max_pipelined: int = 8


@dataclass(slots=True)
class _Request:
    head: RequestHead
    body: BodyQueue
    keep_alive: bool
    upgrade: bool  # Upgrade or CONNECT: the connection may become a tunnel
    expect_continue: bool


@dataclass(slots=True)
class _Failure:
    error: ProtocolError


@dataclass(slots=True)
class _Parsing:
    url: bytearray = field(default_factory=bytearray)
    headers: list[tuple[str, str]] = field(default_factory=list)
    header_bytes: int = 0
    request: _Request | None = None
    trailers: list[tuple[str, str]] = field(default_factory=list)


def split_target(method: str, url: str, host: str | None) -> tuple[str, str]:
    """(path, authority) from the request target: origin-form, absolute-form or authority-form."""
    if method == "CONNECT":
        return "", url
    if url.startswith(("http://", "https://")):
        rest = url.split("://", 1)[1]
        slash = rest.find("/")
        qmark = rest.find("?")
        cut = min(i for i in (slash, qmark, len(rest)) if i >= 0)
        path = rest[cut:] or "/"
        if path.startswith("?"):
            path = "/" + path
        return path, rest[:cut]
    return url, host or ""


class Http1ServerProtocol(asyncio.Protocol):
    """One downstream HTTP/1.x connection."""

    def __init__(
        self,
        handler: RequestHandler,
        ctx: DownstreamContext,
        local_reply: LocalReply,
        settings: Http1Settings | None = None,
        on_closed: Callable[[Http1ServerProtocol], None] | None = None,
    ) -> None:
        self.handler = handler
        self.ctx = ctx
        self.local_reply = local_reply
        self.settings = settings or Http1Settings()
        self.on_closed = on_closed
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.parsing: _Parsing | None = None
        self.pending: deque[_Request | _Failure] = deque()
        # Woken when a request head, an error, EOF or shutdown arrives. A bare future rather
        # than an asyncio.Event: Event.wait looks the loop up on every call, and on Python 3.11
        # that is a getpid() system call, several per request across the data path.
        self.waiter: asyncio.Future[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.writable: asyncio.Event = asyncio.Event()
        self.writable.set()
        self.pause_reasons: set[str] = set()
        self.upgrade_buffer: bytearray | None = None  # bytes after an upgrade request's head
        self.read_eof = False
        self.closed = False
        self.detached = False
        self.draining = False
        self.in_flight = False
        self.task: asyncio.Task[None] | None = None
        # The keep-alive / header deadline of the current wait, and the one timer that enforces
        # it. The timer is re-armed lazily when it fires early, so a busy keep-alive connection
        # costs one timer per timeout period rather than one per request.
        self.wait_deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0

    # ---- flow control -------------------------------------------------------------------

    def _pause(self, reason: str) -> None:
        if not self.pause_reasons and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self.pause_reasons.add(reason)

    def _resume(self, reason: str) -> None:
        if reason not in self.pause_reasons:
            return
        self.pause_reasons.discard(reason)
        if not self.pause_reasons and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    # ---- connection events --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, hence a cast, not an assert.
        self.transport = t = cast(asyncio.Transport, transport)
        t.set_write_buffer_limits(high=self.settings.write_high_water)
        self.loop = asyncio.get_running_loop()
        self.task = self.loop.create_task(self._serve(), name=f"http1-conn-{self.ctx.connection_id}")

    def data_received(self, data: bytes) -> None:
        if self.upgrade_buffer is not None:
            self.upgrade_buffer += data
            return
        if any(isinstance(p, _Failure) for p in self.pending):
            return  # after a parse error nothing more is read
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args else len(data)
            self.upgrade_buffer = bytearray(data[offset:])
            self._pause("upgrade")
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            err = cause if isinstance(cause, ProtocolError) else ProtocolError(f"bad request: {exc}")
            self._fail(err)
        except httptools.HttpParserError as exc:
            self._fail(ProtocolError(f"malformed HTTP/1 request: {exc}"))

    def eof_received(self) -> bool:
        self.read_eof = True
        p = self.parsing
        if p is not None and p.request is not None and not p.request.body.complete:
            p.request.body.feed_error(DownstreamClosedError("client closed the connection mid-body"))
        self._wake()
        # Keep the transport open: a half-closed client still waits for its response.
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        err = DownstreamClosedError(f"client connection lost: {exc or 'closed'}")
        p = self.parsing
        if p is not None and p.request is not None:
            p.request.body.feed_error(err)
        for item in self.pending:
            if isinstance(item, _Request):
                item.body.feed_error(err)
        self.writable.set()
        self._wake()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.task is not None and not self.task.done() and self.in_flight:
            self.task.cancel()

    def _fail(self, error: ProtocolError) -> None:
        p = self.parsing
        if p is not None and p.request is not None:
            p.request.body.feed_error(error)
        self.parsing = None
        self.pending.append(_Failure(error))
        self._pause("error")
        self._wake()

    # ---- httptools callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.parsing = _Parsing()

    def on_url(self, url: bytes) -> None:
        assert self.parsing is not None
        self.parsing.url += url
        self.parsing.header_bytes += len(url)
        if self.parsing.header_bytes > self.settings.max_header_bytes:
            raise ProtocolError("request line too long", status=414)

    def on_header(self, name: bytes, value: bytes) -> None:
        p = self.parsing
        assert p is not None
        pair = (name.decode("latin-1").lower(), value.decode("latin-1"))
        # Trailers count against the same budget: they are headers that arrive late.
        p.header_bytes += len(name) + len(value) + 4
        if p.header_bytes > self.settings.max_header_bytes:
            raise ProtocolError("request header fields too large", status=431)
        (p.headers if p.request is None else p.trailers).append(pair)

    def on_headers_complete(self) -> None:
        p = self.parsing
        assert p is not None
        method = self.parser.get_method().decode("ascii")
        version = self.parser.get_http_version()
        host = get_header(tuple(p.headers), "host")
        path, authority = split_target(method, p.url.decode("latin-1"), host)
        headers = tuple((k, v) for k, v in p.headers if k not in ("host", "expect"))
        expect = (get_header(tuple(p.headers), "expect") or "").lower() == "100-continue"
        te = (get_header(headers, "transfer-encoding") or "").lower()
        cl = get_header(headers, "content-length")
        length: int | None
        if "chunked" in te:
            length = None
        elif cl is not None:
            try:
                length = int(cl)
            except ValueError as exc:
                raise ProtocolError(f"bad content-length {cl!r}") from exc
        else:
            length = 0
        head = RequestHead(method=method, path=path, authority=authority, headers=headers, version=version)
        upgrade = method == "CONNECT" or self.parser.should_upgrade()
        req = _Request(
            head=head,
            body=BodyQueue(
                high_water=self.settings.body_high_water,
                pause=lambda: self._pause("body"),
                resume=lambda: self._resume("body"),
                content_length=length,
                loop=self.loop,
            ),
            keep_alive=self.parser.should_keep_alive(),
            upgrade=upgrade,
            expect_continue=expect and version == "1.1" and length != 0,
        )
        if req.expect_continue:
            req.body._on_first_read = lambda: self._send_continue(req)
        p.request = req
        self.pending.append(req)
        if len(self.pending) >= self.settings.max_pipelined:
            self._pause("pipeline")
        self._wake()

    def on_body(self, body: bytes) -> None:
        assert self.parsing is not None and self.parsing.request is not None
        self.parsing.request.body.feed(bytes(body))

    def on_message_complete(self) -> None:
        p = self.parsing
        if p is None or p.request is None:
            return
        p.request.body.feed_end(tuple(p.trailers) or None)
        self.parsing = None

    # ---- the per-connection task --------------------------------------------------------

    def _send_continue(self, req: _Request) -> None:
        if req.expect_continue and not req.body.complete and self.transport is not None and not self.closed:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        req.expect_continue = False

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _arm(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        self.wait_deadline = deadline
        if self.timer is not None and self.timer_at <= deadline:
            return  # fires early and re-arms itself for the later deadline
        if self.timer is not None:
            self.timer.cancel()
        self.timer_at = deadline
        self.timer = loop.call_at(deadline, self._timer_fired, loop)

    def _timer_fired(self, loop: asyncio.AbstractEventLoop) -> None:
        self.timer = None
        if self.closed:
            return
        if loop.time() >= self.wait_deadline:
            self._wake()
        else:
            self._arm(loop, self.wait_deadline)

    async def _next_item(self) -> _Request | _Failure | None:
        loop = self.loop
        assert loop is not None
        while not self.pending:
            if self.closed or self.read_eof or self.draining:
                return None
            idle = self.parsing is None
            limit = self.settings.keepalive_timeout if idle else self.settings.header_timeout
            deadline = loop.time() + limit
            self._arm(loop, deadline)
            self.waiter = loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
            if self.pending or loop.time() < deadline:
                continue
            if idle:
                return None
            # A request head that trickles in (slowloris) holds a connection for free.
            self._pause("error")
            return _Failure(ProtocolError(f"request head not received within {limit}s", status=408))
        item = self.pending.popleft()
        if len(self.pending) < self.settings.max_pipelined:
            self._resume("pipeline")
        return item

    async def _serve(self) -> None:
        try:
            while True:
                item = await self._next_item()
                if item is None:
                    break
                if isinstance(item, _Failure):
                    await self._write_local(item.error)
                    break
                if not await self._handle(item):
                    break
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("http1 connection failed", extra={"connection_id": self.ctx.connection_id})
        finally:
            if not self.detached and self.transport is not None:
                self.transport.close()
            if self.on_closed is not None:
                self.on_closed(self)

    async def _handle(self, req: _Request) -> bool:
        """Run the pipeline for one request; True when the connection can serve another."""
        sink = Http1ResponseSink(self, req)
        self.in_flight = True
        try:
            await self.handler(self.ctx, req.head, req.body, sink)
        except (asyncio.CancelledError, DownstreamClosedError):
            return False
        except Exception as exc:
            log.exception(
                "request handler failed",
                extra={"connection_id": self.ctx.connection_id, "path": req.head.path},
            )
            if not sink.started:
                err = exc if isinstance(exc, ProxyError) else ProxyError(f"internal error: {exc}")
                head, body = self.local_reply(err)
                with contextlib.suppress(DownstreamClosedError):
                    await sink.send_head(head, end_stream=not body)
                    if body:
                        await sink.send_data(body)
                        await sink.send_end()
            return False
        finally:
            self.in_flight = False
        if self.detached:
            return False
        if not sink.finished:
            # The handler returned mid-response: the client cannot tell where it ended.
            return False
        if self.upgrade_buffer is not None:
            return False  # an upgrade that the upstream refused: the parser is past the request
        return req.keep_alive and not sink.must_close and req.body.complete and not self.draining

    async def _write_local(self, error: ProtocolError) -> None:
        if self.transport is None or self.closed:
            return
        head, body = self.local_reply(error)
        lines = [f"HTTP/1.1 {head.status} {head.reason or _phrase(head.status)}"]
        lines += [f"{k}: {v}" for k, v in head.headers if k not in ("content-length", "connection")]
        lines += [f"content-length: {len(body)}", "connection: close"]
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        log.info(
            "rejected malformed request",
            extra={"connection_id": self.ctx.connection_id, "reason": str(error), "status": head.status},
        )

    # ---- lifecycle hooks used by the listener -------------------------------------------

    def shutdown(self) -> None:
        """Graceful drain: finish the request in flight (if any), then close."""
        self.draining = True
        self._wake()

    def detach_transport(self) -> tuple[asyncio.Transport, bytes]:
        assert self.transport is not None
        self.detached = True
        self._pause("detached")
        data = bytes(self.upgrade_buffer or b"")
        self.upgrade_buffer = None
        return self.transport, data


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class Http1ResponseSink:
    """``ResponseSink`` writing one HTTP/1.1 response to the downstream connection."""

    def __init__(self, conn: Http1ServerProtocol, req: _Request) -> None:
        self.conn = conn
        self.req = req
        self.started = False
        self.finished = False
        self.must_close = False
        self.chunked = False
        self.status = 0
        self.no_body = False
        # A response head waiting to go out with the first body bytes (one send() instead
        # of two for a small response); flushed at the end of this loop iteration at the
        # latest, so a slow body never delays the head.
        self.held: bytes | None = None

    def _write(self, data: bytes) -> None:
        t = self.conn.transport
        if t is None or self.conn.closed or t.is_closing():
            self.held = None
            raise DownstreamClosedError("client connection closed")
        if self.held is not None:
            data, self.held = self.held + data, None
        t.write(data)

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The connection's event loop (spares the pipeline a lookup per request)."""
        return self.conn.loop

    @property
    def downstream_closed(self) -> bool:
        """The client's connection is gone (read by the pipeline to tell DC from UC)."""
        t = self.conn.transport
        return self.conn.closed or t is None or t.is_closing()

    def _flush_held(self) -> None:
        if self.held is not None:
            with contextlib.suppress(DownstreamClosedError):
                self._write(b"")

    async def send_head(self, head: ResponseHead, *, end_stream: bool = False) -> None:
        if self.started:
            raise RuntimeError("response head already sent")
        if 100 <= head.status < 200 and head.status != 101:
            return  # interim responses are handled by this codec (100-continue), not forwarded
        self.started = True
        self.status = head.status
        req = self.req
        headers: list[tuple[str, str]] = [(k, v) for k, v in head.headers if k != "transfer-encoding"]
        self.no_body = req.head.method == "HEAD" or head.status in _NO_BODY_STATUS or head.status == 101
        if req.expect_continue and not req.body.complete:
            # Final answer without 100 Continue: the client may never send the body.
            self.must_close = True
            req.expect_continue = False
        keep_alive = req.keep_alive and not self.conn.draining
        tunnel = head.status == 101 or (req.head.method == "CONNECT" and 200 <= head.status < 300)
        if tunnel or self.no_body or get_header(head.headers, "content-length") is not None:
            # Tunnels have no framing (the proxy splices the connection after this head);
            # HEAD/204/304 keep the upstream's content-length as metadata.
            pass
        elif end_stream:
            headers.append(("content-length", "0"))
        elif req.head.version == "1.1":
            headers.append(("transfer-encoding", "chunked"))
            self.chunked = True
        else:
            # HTTP/1.0 client and no length: the end of the body is the end of the connection.
            self.must_close = True
            keep_alive = False
        if not keep_alive or self.must_close:
            self.must_close = True
            headers = [(k, v) for k, v in headers if k != "connection"]
            if head.status != 101:
                headers.append(("connection", "close"))
        elif req.head.version == "1.0":
            headers.append(("connection", "keep-alive"))
        reason = head.reason or _phrase(head.status)
        block = f"HTTP/1.1 {head.status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
        data = block.encode("latin-1") + b"\r\n"
        if end_stream or tunnel or self.no_body:
            self._write(data)
        else:
            t = self.conn.transport
            if t is None or self.conn.closed or t.is_closing():
                raise DownstreamClosedError("client connection closed")
            self.held = data
            loop = self.conn.loop
            assert loop is not None
            loop.call_soon(self._flush_held)
        if end_stream:
            self.finished = True
        await self._drain()

    async def send_data(self, data: bytes) -> None:
        if not data or self.no_body:
            return
        if self.chunked:
            self._write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self._write(data)
        await self._drain()

    async def send_end(self, trailers: Headers | None = None) -> None:
        if self.finished:
            return
        if self.chunked:
            tail = "".join(f"{k}: {v}\r\n" for k, v in trailers or ())
            self._write(b"0\r\n" + tail.encode("latin-1") + b"\r\n")
        elif self.held is not None:
            self._write(b"")
        self.finished = True
        await self._drain()

    async def reset(self) -> None:
        self.must_close = True
        self.finished = True
        self.held = None
        if self.conn.transport is not None:
            self.conn.transport.abort()

    def detach(self) -> tuple[asyncio.Transport, bytes]:
        """Hand the raw connection to a relay (after a 101 or a CONNECT 2xx was sent)."""
        self.req.body.detach_flow_control()
        return self.conn.detach_transport()

    async def _drain(self) -> None:
        if not self.conn.writable.is_set():
            await self.conn.writable.wait()
        if self.conn.closed:
            raise DownstreamClosedError("client connection closed")
