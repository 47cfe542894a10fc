"""HTTP/1.1 upstream client: a keep-alive connection pool per endpoint.

Owns: upstream HTTP/1.1 connections (an ``asyncio.Protocol`` over httptools'
response parser), the idle pool per ``(address, port)``, request framing,
streaming both bodies, and the hand-over of a connection after 101 / CONNECT 2xx.

Invariants:
  * A connection carries one exchange at a time (no upstream pipelining) and goes
    back to the idle pool only when the request was fully sent, the response fully
    received, nothing went wrong and neither side said ``connection: close``.
  * At most ``max_idle_per_endpoint`` idle connections are kept per endpoint; an idle
    connection is closed after the idle timeout, or as soon as the server closes it.
  * A request that fails on a *reused* connection before any response byte arrived
    and before any request body byte was consumed is sent again once on a fresh
    connection (the server closed the idle connection as we picked it up).
  * Response bodies are bounded queues: reading the upstream socket pauses above the
    high-water mark until the consumer catches up.
  * Interim 1xx responses (other than 101) are dropped; the caller sees the final one.
  * With ``limits`` (the service's breaker) every open connection holds one
    ``max_connections`` slot until it closes. A request that finds no idle connection and
    no free slot waits as a pending request (``max_pending_requests``) until a connection
    of the service goes idle or closes (an idle connection to another endpoint of the
    service is closed to free its slot); beyond that it fails at once with UO.

Concurrency: protocol callbacks on the event loop; one named upload task per
exchange streams the request body while the caller awaits the response head.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass
from typing import cast

import httptools
from mypy_extensions import mypyc_attr

from meshproxy.config.model import Endpoint
from meshproxy.core.errors import (
    ProtocolError,
    UpstreamConnectError,
    UpstreamOverflowError,
    UpstreamResetError,
)
from meshproxy.core.http import Headers, RequestHead, ResponseHead, get_header
from meshproxy.core.passthrough import source_for
from meshproxy.io.body import BodyQueue, known_length
from meshproxy.io.exchange import BodyStream, ConnectionLimits, UpstreamResponse
from meshproxy.io.sockopt import set_nodelay

log = logging.getLogger(__name__)

PoolKey = tuple[str, int]

_BODYLESS_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE", "CONNECT"})
_MAX_HEAD_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class PoolSettings:
    # Every connection a burst of concurrent requests opened stays for the next burst, until
    # the idle timeout; for a known service its breaker (``max_connections``, 1024 by
    # default) bounds how many there are. A small cap (it was 32) closed and reopened
    # connections at every burst above it: at saturation one new upstream connection per
    # three requests, in both sidecars, with its connect, accept, nat entry and sniff.
    max_idle_per_endpoint: int = 1024
    # Used when the caller gives no TrafficPolicy.idle_timeout.
    idle_timeout: float = 60.0
    body_high_water: int = 64 * 1024
    write_high_water: int = 64 * 1024
    # Connections to this pod's own app: bound to the passthrough source when the app is
    # not on loopback (``meshproxy.core.passthrough``). The inbound client's pools only.
    inbound: bool = False


@mypyc_attr(native_class=False)  # an exception: see meshproxy.compiled
class _StaleConnectionError(Exception):
    """A reused connection died before the request could have been seen: send it again."""


class TunnelBody:
    """The "body" of a 101/CONNECT-2xx response: the raw connection, to be spliced."""

    def __init__(self, conn: _Conn, leftover: bytes) -> None:
        self._conn = conn
        self._leftover = leftover

    @property
    def content_length(self) -> int | None:
        return 0

    @property
    def trailers(self) -> Headers | None:
        return None

    async def read(self) -> bytes:
        return b""  # a tunnel is spliced with ``detach``, never read as a body

    def detach(self) -> tuple[asyncio.Transport, bytes]:
        assert self._conn.transport is not None
        self._conn.transport.pause_reading()
        self._conn.detached = True
        return self._conn.transport, self._leftover

    def abort(self) -> None:
        if self._conn.transport is not None and not self._conn.detached:
            self._conn.transport.abort()


class _ResponseBody(BodyQueue):
    """A response body queue that can abort its connection when the consumer gives up."""

    __slots__ = ("_conn",)

    def __init__(self, conn: _Conn, content_length: int | None) -> None:
        t = conn.transport
        assert t is not None
        super().__init__(
            high_water=conn.client.settings.body_high_water,
            pause=t.pause_reading,
            resume=t.resume_reading,
            content_length=content_length,
            loop=conn.loop,
        )
        self._conn = conn

    def abort(self) -> None:
        """Called by the pipeline when it stops reading early: the connection cannot be reused."""
        if not self.complete:
            self._conn.close(abort=True)


class _Conn(asyncio.Protocol):
    """One upstream connection."""

    def __init__(self, client: Http1Client, key: PoolKey) -> None:
        self.client = client
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.detached = False
        self.reused = False
        # Idle expiry: ``idle_deadline`` moves on every release; the one timer re-arms itself
        # lazily when it fires early (one timer per idle period, not one per request).
        self.idle_handle: asyncio.TimerHandle | None = None
        self.idle_deadline = 0.0
        self.idle = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.limits: ConnectionLimits | None = None  # holds one max_connections slot while open
        self.writable = asyncio.Event()
        self.writable.set()
        self.unsolicited: bytes | None = None  # what a server sent before our first request
        # Why a parser callback refused the response (see Http1ServerProtocol.rejected).
        self.rejected: ProtocolError | None = None
        self._reset_exchange()

    def _reset_exchange(self) -> None:
        self.head_future: asyncio.Future[UpstreamResponse] | None = None
        self.request_head: RequestHead | None = None
        self.headers: list[tuple[str, str]] = []
        self.trailers: list[tuple[str, str]] = []
        self.in_body = False
        self.interim = False
        self.status = 0
        self.reason = ""
        self.body: _ResponseBody | None = None
        self.keep_alive = True
        self.close_delimited = False
        self.response_done = False
        self.upload_done = True
        self.upload_task: asyncio.Task[None] | None = None
        self.got_bytes = False
        self.body_consumed = False
        self.head_bytes = 0
        self.head_buffer: bytearray | None = None  # CONNECT: bytes up to the end of the head
        self.tunnel_head: ResponseHead | None = None

    # ---- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, hence a cast, not an assert.
        self.transport = t = cast(asyncio.Transport, transport)
        t.set_write_buffer_limits(high=self.client.settings.write_high_water)
        # Looked up once: on Python 3.11 every get_running_loop() is a getpid() system call.
        self.loop = asyncio.get_running_loop()
        set_nodelay(transport.get_extra_info("socket"))

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        if self.head_future is None:
            # Bytes on an idle connection: the server is not speaking HTTP/1.1 properly.
            if not self.reused and self.unsolicited is None:
                self.unsolicited = data[:32]  # before any request: a server-first protocol
            self.close(abort=True)
            return
        self.got_bytes = True
        if self.head_buffer is not None:
            # CONNECT: feed the parser only the head; what follows a 2xx is tunnel data.
            self.head_buffer += data
            end = self.head_buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head_buffer) > _MAX_HEAD_BYTES:
                    self._fail(ProtocolError("upstream response head too large", status=502))
                return
            data, rest = bytes(self.head_buffer[: end + 4]), bytes(self.head_buffer[end + 4 :])
            self.head_buffer = None
            self._feed(data)
            if 200 <= self.status < 300 and not self.interim:
                self._tunnel(rest)
            elif rest:
                self._feed(rest)
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args else len(data)
            if self.status == 101:
                self._tunnel(data[offset:])
            else:
                self._fail(ProtocolError("upstream sent an unexpected upgrade", status=502))
        except httptools.HttpParserCallbackError as exc:
            err, self.rejected = self.rejected, None
            self._fail(err if err is not None else ProtocolError(f"upstream: {exc}", status=502))
        except httptools.HttpParserError as exc:
            self._fail(ProtocolError(f"malformed upstream response: {exc}", status=502))

    def eof_received(self) -> bool:
        return False  # close: a half-closed upstream cannot take our next request

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.client._forget(self)
        if self.idle_handle is not None:
            self.idle_handle.cancel()
        if self.detached:
            return
        fut = self.head_future
        if fut is not None and not fut.done():
            if self.reused and not self.got_bytes and not self.body_consumed:
                fut.set_exception(_StaleConnectionError())
            else:
                fut.set_exception(UpstreamResetError(f"upstream closed before the response head: {exc}"))
        body = self.body
        if body is not None and not body.complete:
            if self.close_delimited and exc is None:
                body.feed_end(None)
            else:
                body.feed_error(UpstreamResetError(f"upstream closed mid-body: {exc or 'EOF'}"))
        if self.upload_task is not None and not self.upload_task.done():
            self.upload_task.cancel()
        self.writable.set()

    # ---- httptools callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.reason = ""
        self.headers = []
        self.trailers = []
        self.in_body = False
        self.head_bytes = 0

    def on_status(self, reason: bytes) -> None:
        self.reason += reason.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        # A broken upstream must not grow our memory without bound (trailers included).
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > _MAX_HEAD_BYTES:
            self.rejected = err = ProtocolError("upstream response header fields too large", status=502)
            raise err
        pair = (name.decode("latin-1").lower(), value.decode("latin-1"))
        (self.trailers if self.in_body else self.headers).append(pair)

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.interim = 100 <= self.status < 200 and self.status != 101
        if self.interim:
            self.reason = ""
            return
        self.in_body = True
        self.keep_alive = self.parser.should_keep_alive()
        headers = tuple(self.headers)
        head = ResponseHead(self.status, headers, self.parser.get_http_version(), self.reason)
        req = self.request_head
        assert req is not None and self.head_future is not None
        is_tunnel = self.status == 101 or (req.method == "CONNECT" and 200 <= self.status < 300)
        if is_tunnel:
            self.tunnel_head = head  # resolved in _tunnel, which knows the leftover bytes
            return
        te = cl = None
        for k, v in headers:
            if k == "content-length":
                if cl is None:
                    cl = v
            elif k == "transfer-encoding" and te is None:
                te = v
        no_body = req.method == "HEAD" or self.status in (204, 304)
        length: int | None
        if no_body:
            length = 0
        elif te is not None and "chunked" in te.lower():
            length = None
        elif cl is not None and cl.isdigit():
            length = int(cl)
        else:
            length, self.close_delimited, self.keep_alive = None, True, False
        self.body = _ResponseBody(self, length)
        if not self.head_future.done():
            self.head_future.set_result(UpstreamResponse(head=head, body=self.body))
        if no_body:
            # llhttp would wait for HEAD's announced body; a fresh parser reads the next response.
            self.parser = httptools.HttpResponseParser(self)
            self._message_done()

    def on_body(self, body: bytes) -> None:
        if self.body is not None:
            self.body.feed(bytes(body))

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if self.response_done or self.body is None:
            return
        self._message_done()

    # ---- exchange -----------------------------------------------------------------------

    def _message_done(self) -> None:
        self.response_done = True
        assert self.body is not None
        self.body.feed_end(tuple(self.trailers) or None)
        self._maybe_release()

    def _tunnel(self, leftover: bytes) -> None:
        head = self.tunnel_head
        assert head is not None
        self.keep_alive = False
        self.response_done = True
        assert self.transport is not None and self.head_future is not None
        self.transport.pause_reading()
        if not self.head_future.done():
            self.head_future.set_result(UpstreamResponse(head=head, body=TunnelBody(self, leftover)))

    def _fail(self, error: Exception) -> None:
        fut = self.head_future
        if fut is not None and not fut.done():
            fut.set_exception(error)
        if self.body is not None:
            self.body.feed_error(error)
        self.close(abort=True)

    def _maybe_release(self) -> None:
        if not (self.response_done and self.upload_done) or self.detached:
            return
        if self.body is not None:
            self.body.detach_flow_control()
        if self.keep_alive and not self.closed and self.transport is not None:
            assert self.transport is not None
            self.transport.resume_reading()
            self._reset_exchange()
            self.reused = True
            self.client._release(self)
        else:
            self.close()

    def close(self, *, abort: bool = False) -> None:
        if self.transport is not None and not self.closed:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()
        self.closed = True
        self.client._forget(self)

    def idle_expired(self) -> None:
        self.idle_handle = None
        if not self.idle or self.closed:
            return  # in use again: re-armed when it goes back to the pool
        loop = asyncio.get_running_loop()
        if loop.time() < self.idle_deadline:
            self.idle_handle = loop.call_at(self.idle_deadline, self.idle_expired)
            return
        self.close()

    async def exchange(self, head: RequestHead, body: BodyStream) -> UpstreamResponse:
        assert self.transport is not None
        loop = self.loop
        assert loop is not None
        self.request_head = head
        method = head.method
        if method == "CONNECT":
            self.head_buffer = bytearray()
        # Decided without a coroutine unless the body must be looked at first.
        framing = self._framing(head, body)
        upload, chunked, first, length = framing if framing is not None else await self._peek(body)
        if self.closed or self.transport.is_closing():
            # Closed by the server while idle (or while the body's first chunk was awaited).
            # Nothing was sent: another connection can take the request, unless a chunk of
            # its body was already read. Checked before the body is taken, and before the
            # response future exists, so that no failure is left on it for nobody to await.
            if self.unsolicited is not None:
                raise ProtocolError(
                    f"upstream spoke first ({self.unsolicited!r}): not an HTTP/1.1 server", status=502
                )
            if self.body_consumed:
                raise UpstreamResetError("upstream closed the connection before the request was sent")
            raise _StaleConnectionError()
        if upload and not chunked:
            # A body that has all arrived (a small POST usually comes with its head) leaves
            # in the head's write, with no upload task.
            take = getattr(body, "take_complete", None)
            whole: bytes | None = take() if take is not None else None
            if whole is not None:
                upload, first = False, whole
                self.body_consumed = bool(whole)
        # An HTTP/1.0 client may send no Host; the upstream still needs one.
        host = head.authority or (
            f"[{self.key[0]}]:{self.key[1]}" if ":" in self.key[0] else f"{self.key[0]}:{self.key[1]}"
        )
        lines = [f"{k}: {v}\r\n" for k, v in head.headers if k != "host"]
        if chunked:
            lines.append("transfer-encoding: chunked\r\n")
        elif length is not None:
            lines.append(f"content-length: {length}\r\n")
        target = head.path if method != "CONNECT" else head.authority
        block = f"{method} {target} HTTP/1.1\r\nhost: {host}\r\n{''.join(lines)}\r\n".encode("latin-1")
        if first:
            block += (b"%x\r\n%b\r\n" % (len(first), first)) if chunked else first
        head_future: asyncio.Future[UpstreamResponse] = loop.create_future()
        self.head_future = head_future
        self.transport.write(block)
        if upload:
            self.upload_done = False
            self.upload_task = loop.create_task(
                self._upload(body, chunked), name=f"http1-upload-{self.key[0]}:{self.key[1]}"
            )
        try:
            return await head_future
        except asyncio.CancelledError:
            self.close(abort=True)
            raise

    def _framing(self, head: RequestHead, body: BodyStream) -> tuple[bool, bool, bytes, int | None] | None:
        """(more body to upload, chunked, first chunk already read, content-length to add);
        None when the body's first chunk decides (``_peek``)."""
        if get_header(head.headers, "content-length") is not None:
            return head.method != "CONNECT", False, b"", None
        length = known_length(body)
        if length == 0:
            return False, False, b"", (0 if head.method not in _BODYLESS_METHODS else None)
        if length is not None:
            return True, False, b"", length
        if head.method in _BODYLESS_METHODS:
            return None  # unknown length on a method that rarely has a body: look before announcing chunked
        return True, True, b"", None

    async def _peek(self, body: BodyStream) -> tuple[bool, bool, bytes, int | None]:
        first = await body.read()
        if not first:
            return False, False, b"", None
        self.body_consumed = True
        return True, True, first, None

    async def _upload(self, body: BodyStream, chunked: bool) -> None:
        t = self.transport
        assert t is not None
        try:
            while True:
                data = await body.read()
                if not data:
                    break
                self.body_consumed = True
                if self.closed:
                    return
                t.write((b"%x\r\n%b\r\n" % (len(data), data)) if chunked else data)
                if not self.writable.is_set():
                    await self.writable.wait()
            if chunked and not self.closed:
                tail = "".join(f"{k}: {v}\r\n" for k, v in body.trailers or ())
                t.write(b"0\r\n" + tail.encode("latin-1") + b"\r\n")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The downstream body failed (client gone, malformed chunk): the upstream must not
            # take a truncated request for a complete one, so the connection is aborted.
            log.info(
                "request body upload aborted",
                extra={"upstream": f"{self.key[0]}:{self.key[1]}", "error": str(exc)},
            )
            self.close(abort=True)
            return
        self.upload_done = True
        if self.response_done:
            self._maybe_release()


class Http1Client:
    """``UpstreamClient`` for HTTP/1.1 with a keep-alive pool per endpoint."""

    def __init__(self, settings: PoolSettings | None = None) -> None:
        self.settings = settings or PoolSettings()
        self._idle: dict[PoolKey, deque[_Conn]] = {}
        self._idle_timeouts: dict[PoolKey, float] = {}
        self._all: set[_Conn] = set()
        self._waiters: list[asyncio.Future[None]] = []  # pending requests (bounded by the limits)
        self.connects = 0  # connections opened, for tests and /clusters

    def idle_count(self, key: PoolKey) -> int:
        return len(self._idle.get(key, ()))

    async def request(
        self,
        endpoint: Endpoint,
        head: RequestHead,
        body: BodyStream,
        *,
        connect_timeout: float,
        idle_timeout: float | None = None,
        limits: ConnectionLimits | None = None,
    ) -> UpstreamResponse:
        key = (endpoint.address, endpoint.port)
        if idle_timeout is not None:
            self._idle_timeouts[key] = idle_timeout
        for _ in range(3):
            conn = self._take_idle(key) or await self._acquire(key, connect_timeout, limits)
            try:
                return await conn.exchange(head, body)
            except _StaleConnectionError:
                conn.close(abort=True)
                log.debug("pooled connection was closed by the server; retrying on a fresh one")
                continue
        raise UpstreamResetError(f"{key[0]}:{key[1]}: connections keep closing before a response")

    def _take_idle(self, key: PoolKey) -> _Conn | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()  # most recently used first: the least likely to be timed out
            conn.idle = False
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def _acquire(self, key: PoolKey, connect_timeout: float, limits: ConnectionLimits | None) -> _Conn:
        """A connection for one exchange within the service's connection budget (see module doc)."""
        if limits is None:
            return await self._connect(key, connect_timeout)
        pending = False
        loop = asyncio.get_running_loop()
        try:
            while True:
                conn = self._take_idle(key)
                if conn is not None:
                    return conn
                if limits.try_acquire_connection():
                    try:
                        conn = await self._connect(key, connect_timeout)
                    except BaseException:
                        limits.release_connection()
                        self._wake()
                        raise
                    conn.limits = limits
                    return conn
                if self._close_idle_of(limits):
                    continue  # an idle connection to another endpoint gave its slot back
                if not pending:
                    admission = limits.try_acquire_pending()
                    if not admission:
                        raise UpstreamOverflowError(admission.reason)
                    pending = True
                waiter: asyncio.Future[None] = loop.create_future()
                self._waiters.append(waiter)
                try:
                    await waiter
                finally:
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(waiter)
        finally:
            if pending:
                limits.release_pending()

    def _close_idle_of(self, limits: ConnectionLimits) -> bool:
        for idle in self._idle.values():
            for conn in idle:
                if conn.limits is limits:
                    conn.close()
                    return True
        return False

    def _wake(self) -> None:
        """A connection went idle or a slot was freed: pending requests look again."""
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def _connect(self, key: PoolKey, connect_timeout: float) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Conn(self, key),
                    key[0],
                    key[1],
                    local_addr=source_for(key[0]) if self.settings.inbound else None,
                )
        except (OSError, TimeoutError) as exc:
            raise UpstreamConnectError(f"connect {key[0]}:{key[1]}: {exc or 'timeout'}") from exc
        self.connects += 1
        self._all.add(conn)
        return conn

    def _release(self, conn: _Conn) -> None:
        idle = self._idle.get(conn.key)
        if idle is None:
            idle = self._idle[conn.key] = deque()
        if len(idle) >= self.settings.max_idle_per_endpoint:
            conn.close()
            return
        if self._waiters:
            self._wake()
        timeout = self._idle_timeouts.get(conn.key, self.settings.idle_timeout)
        loop = conn.loop or asyncio.get_running_loop()
        conn.idle = True
        conn.idle_deadline = loop.time() + timeout
        if conn.idle_handle is not None and conn.idle_handle.when() > conn.idle_deadline:
            conn.idle_handle.cancel()  # the timeout was shortened by a new policy
            conn.idle_handle = None
        if conn.idle_handle is None:
            conn.idle_handle = loop.call_at(conn.idle_deadline, conn.idle_expired)
        idle.append(conn)

    def _forget(self, conn: _Conn) -> None:
        if conn.limits is not None:
            conn.limits.release_connection()
            conn.limits = None
            self._wake()
        idle = self._idle.get(conn.key)
        if idle is not None:
            with contextlib.suppress(ValueError):
                idle.remove(conn)
            if not idle:
                del self._idle[conn.key]
        self._all.discard(conn)

    async def close(self) -> None:
        """Close every connection (idle or busy)."""
        for conn in list(self._all):
            conn.close()
        self._idle.clear()
