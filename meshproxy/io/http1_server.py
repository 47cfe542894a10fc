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
import functools
import http
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import httptools

from meshproxy.core.errors import ProtocolError, ProxyError
from meshproxy.core.http import Headers, RequestHead, ResponseHead
from meshproxy.io.body import EMPTY, BodyQueue, DownstreamClosedError, EmptyBody
from meshproxy.io.exchange import DownstreamContext, RequestHandler

log = logging.getLogger(__name__)

LocalReply = Callable[[ProxyError], tuple[ResponseHead, bytes]]
"""Turns an error into the response the client gets (``meshproxy.io.proxy.local_reply``)."""

_NO_BODY_STATUS = frozenset({204, 304})
# Request headers that on_headers_complete takes out or reads for framing.
_FRAMING = frozenset({"host", "expect", "transfer-encoding", "content-length"})


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
    body: BodyQueue | EmptyBody
    keep_alive: bool
    upgrade: bool  # Upgrade or CONNECT: the connection may become a tunnel
    expect_continue: bool


@dataclass(slots=True)
class _Failure:
    error: ProtocolError


class _Parsing:
    """The message being parsed. A plain slot class: built for every request, and a
    dataclass with ``default_factory`` fields costs several calls more."""

    __slots__ = ("header_bytes", "headers", "request", "trailers", "url")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.header_bytes = 0
        self.request: _Request | None = None
        self.trailers: list[tuple[str, str]] | None = None  # made when the first trailer arrives


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
        self.failures = 0  # _Failure items ever queued: data_received looks for one only then
        # The error a parser callback refused the request with. httptools wraps whatever a
        # callback raises in HttpParserCallbackError; the original is kept here rather than
        # read back from ``__context__``, which CPython rewrites when another exception is
        # still being handled further up the stack.
        self.rejected: ProtocolError | None = None
        # Woken when a request head, an error, EOF or shutdown arrives. A bare future rather
        # than an asyncio.Event: Event.wait looks the loop up on every call, and on Python 3.11
        # that is a getpid() system call, several per request across the data path.
        self.waiter: asyncio.Future[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.writable: asyncio.Event = asyncio.Event()
        self.writable.set()
        self.pause_reasons: set[str] = set()
        # A request body's flow-control hooks, made once per connection rather than per request.
        self.pause_body = functools.partial(self._pause, "body")
        self.resume_body = functools.partial(self._resume, "body")
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
        if self.failures and any(isinstance(p, _Failure) for p in self.pending):
            return  # after a parse error nothing more is read
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args else len(data)
            self.upgrade_buffer = bytearray(data[offset:])
            self._pause("upgrade")
        except httptools.HttpParserCallbackError as exc:
            err, self.rejected = self.rejected, None
            self._fail(err if err is not None else ProtocolError(f"bad request: {exc}"))
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
        self.failures += 1
        self._pause("error")
        self._wake()

    # ---- httptools callbacks ------------------------------------------------------------

    def _reject(self, error: ProtocolError) -> ProtocolError:
        """Remember why a callback refuses the request; the caller raises what this returns."""
        self.rejected = error
        return error

    def on_message_begin(self) -> None:
        self.parsing = _Parsing()

    def on_url(self, url: bytes) -> None:
        p = self.parsing
        assert p is not None
        p.url += url
        p.header_bytes += len(url)
        if p.header_bytes > self.settings.max_header_bytes:
            raise self._reject(ProtocolError("request line too long", status=414))

    def on_header(self, name: bytes, value: bytes) -> None:
        p = self.parsing
        assert p is not None
        pair = (name.decode("latin-1").lower(), value.decode("latin-1"))
        # Trailers count against the same budget: they are headers that arrive late.
        p.header_bytes += len(name) + len(value) + 4
        if p.header_bytes > self.settings.max_header_bytes:
            raise self._reject(ProtocolError("request header fields too large", status=431))
        if p.request is None:
            p.headers.append(pair)
        elif p.trailers is None:
            p.trailers = [pair]
        else:
            p.trailers.append(pair)

    def on_headers_complete(self) -> None:
        p = self.parsing
        assert p is not None
        parser = self.parser
        method = parser.get_method().decode("ascii")
        version = parser.get_http_version()
        # One pass: the first host/expect/transfer-encoding/content-length, and the headers
        # without host and expect (four scans and three tuple copies before).
        host = expect_value = te = cl = None
        kept: list[tuple[str, str]] = []
        for kv in p.headers:
            name = kv[0]
            if name in _FRAMING:
                if name == "host":
                    if host is None:
                        host = kv[1]
                    continue
                if name == "expect":
                    if expect_value is None:
                        expect_value = kv[1]
                    continue
                if name == "transfer-encoding":
                    if te is None:
                        te = kv[1]
                elif cl is None:
                    cl = kv[1]
            kept.append(kv)
        headers = tuple(kept)
        path, authority = split_target(method, p.url.decode("latin-1"), host)
        expect = expect_value is not None and expect_value.lower() == "100-continue"
        length: int | None
        if te is not None and "chunked" in te.lower():
            length = None
        elif cl is not None:
            try:
                length = int(cl)
            except ValueError as exc:
                raise self._reject(ProtocolError(f"bad content-length {cl!r}")) from exc
        else:
            length = 0
        head = RequestHead(method, path, authority, headers, "http", version)
        upgrade = method == "CONNECT" or parser.should_upgrade()
        body: BodyQueue | EmptyBody
        if length == 0 and not upgrade:
            body = EMPTY  # framed without a body: nothing can arrive, nothing to queue
        else:
            body = BodyQueue(
                high_water=self.settings.body_high_water,
                pause=self.pause_body,
                resume=self.resume_body,
                content_length=length,
                loop=self.loop,
            )
        req = _Request(
            head=head,
            body=body,
            keep_alive=parser.should_keep_alive(),
            upgrade=upgrade,
            expect_continue=expect and version == "1.1" and length != 0,
        )
        if req.expect_continue and isinstance(body, BodyQueue):
            body._on_first_read = lambda: self._send_continue(req)
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
        p.request.body.feed_end(tuple(p.trailers) if p.trailers else None)
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
        failed: ProxyError | None = None
        try:
            await self.handler(self.ctx, req.head, req.body, sink)
        except (asyncio.CancelledError, DownstreamClosedError):
            return False
        except Exception as exc:
            log.exception(
                "request handler failed",
                extra={"connection_id": self.ctx.connection_id, "path": req.head.path},
            )
            if sink.started:
                return False
            failed = exc if isinstance(exc, ProxyError) else ProxyError(f"internal error: {exc}")
        finally:
            self.in_flight = False
        if failed is not None:  # answered outside the handler, which must not await (meshproxy.compiled)
            head, body = self.local_reply(failed)
            with contextlib.suppress(DownstreamClosedError):
                await sink.send_head(head, end_stream=not body)
                if body:
                    await sink.send_data(body)
                    await sink.send_end()
            return False
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

    # One per request: slots make it smaller and quicker to build.
    __slots__ = ("chunked", "conn", "finished", "held", "must_close", "no_body", "req", "started", "status")

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

    def _head_bytes(self, head: ResponseHead, end_stream: bool) -> bytes:
        """The final response head on the wire; decides the framing (chunked, close, no body).

        One pass over the headers to see what is there, one join to build the block."""
        self.started = True
        self.status = status = head.status
        req = self.req
        method = req.head.method
        self.no_body = method == "HEAD" or status in _NO_BODY_STATUS or status == 101
        if req.expect_continue and not req.body.complete:
            # Final answer without 100 Continue: the client may never send the body.
            self.must_close = True
            req.expect_continue = False
        keep_alive = req.keep_alive and not self.conn.draining
        tunnel = status == 101 or (method == "CONNECT" and 200 <= status < 300)
        has_length = has_te = has_connection = False
        for k, _ in head.headers:
            if k == "content-length":
                has_length = True
            elif k == "transfer-encoding":
                has_te = True
            elif k == "connection":
                has_connection = True
        extra = ""
        if tunnel or self.no_body or has_length:
            # Tunnels have no framing (the proxy splices the connection after this head);
            # HEAD/204/304 keep the upstream's content-length as metadata.
            pass
        elif end_stream:
            extra = "content-length: 0\r\n"
        elif req.head.version == "1.1":
            extra = "transfer-encoding: chunked\r\n"
            self.chunked = True
        else:
            # HTTP/1.0 client and no length: the end of the body is the end of the connection.
            self.must_close = True
            keep_alive = False
        if not keep_alive or self.must_close:
            self.must_close = True
            if status != 101:
                extra += "connection: close\r\n"
        else:
            has_connection = False  # kept as the upstream sent it
            if req.head.version == "1.0":
                extra += "connection: keep-alive\r\n"
        if has_te or has_connection:
            lines = [
                f"{k}: {v}\r\n"
                for k, v in head.headers
                if k != "transfer-encoding" and not (has_connection and k == "connection")
            ]
        else:
            lines = [f"{k}: {v}\r\n" for k, v in head.headers]
        reason = head.reason or _phrase(status)
        return f"HTTP/1.1 {status} {reason}\r\n{''.join(lines)}{extra}\r\n".encode("latin-1")

    async def send_head(self, head: ResponseHead, *, end_stream: bool = False) -> None:
        if self.started:
            raise RuntimeError("response head already sent")
        if 100 <= head.status < 200 and head.status != 101:
            return  # interim responses are handled by this codec (100-continue), not forwarded
        data = self._head_bytes(head, end_stream)
        tunnel = head.status == 101 or (self.req.head.method == "CONNECT" and 200 <= head.status < 300)
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

    async def send_whole(
        self, head: ResponseHead, data: bytes, trailers: Headers | None, *, end_stream: bool
    ) -> None:
        """``send_head``, ``send_data(data)``, ``send_end(trailers)`` for a body that is all
        here, as one write: the same bytes, without holding the head back with a
        ``call_soon`` and without a coroutine per step. ``end_stream`` as for ``send_head``
        (the body is known to be empty; ``data`` is then ignored, as the pipeline would)."""
        if self.started:
            raise RuntimeError("response head already sent")
        status = head.status
        if (100 <= status < 200) or (self.req.head.method == "CONNECT" and 200 <= status < 300):
            # Interim and tunnel heads have their own paths: take them one step at a time.
            await self.send_head(head, end_stream=end_stream)
            if not end_stream:
                await self.send_data(data)
                await self.send_end(trailers)
            return
        out = self._head_bytes(head, end_stream)
        if not end_stream and not self.no_body:
            if self.chunked:
                if data:
                    out += b"%x\r\n%b\r\n" % (len(data), data)
                tail = "".join(f"{k}: {v}\r\n" for k, v in trailers or ())
                out += b"0\r\n" + tail.encode("latin-1") + b"\r\n"
            else:
                out += data
        self._write(out)
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
