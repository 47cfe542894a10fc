"""Upstream HTTP/2 (h2c prior knowledge): an ``UpstreamClient`` with multiplexed connections.

Owns: ``Http2Client`` (the pool: a few connections per endpoint, each carrying many
streams), its connections (``asyncio.Protocol`` around ``h2``) and streams.

Behaviour the pipeline relies on (``meshproxy.io.exchange.UpstreamClient``):
  * ``request`` returns as soon as the response HEADERS arrive; the request body is
    streamed concurrently by a per-stream pump task within the server's flow-control
    window; the response body and trailers are streamed through ``Http2ResponseBody``
    (flow-control credit is returned only when the pipeline reads, so a slow
    downstream slows the upstream server).
  * A connection is "made" once TCP is up and the server's SETTINGS frame arrived
    (so its MAX_CONCURRENT_STREAMS is known). Failure or ``connect_timeout`` ->
    ``UpstreamConnectError``. Stream reset, GOAWAY above our stream, or connection
    loss before the response head -> ``UpstreamResetError`` (after the head: raised by
    ``Http2ResponseBody.read``).
  * MAX_CONCURRENT_STREAMS is honoured: a full connection makes the pool open another
    (up to ``max_connections_per_endpoint``), then requests wait for a free stream.
  * GOAWAY from the server: no new streams on that connection, streams it covers
    complete, the connection closes when they are done.
  * Idle connections (no streams for ``idle_timeout``) are closed with GOAWAY. With
    ``keepalive_interval`` set, a connection with streams that heard nothing from the
    server for that long sends a PING; no answer within ``keepalive_timeout`` closes it.

Abandoning a response (the pipeline's task was cancelled, a timeout fired): the
upstream stream is reset with RST_STREAM(CANCEL) when (a) ``request`` is cancelled while
waiting for the head, (b) ``Http2ResponseBody.read`` is cancelled, (c) the pipeline calls
``body.abort()`` or ``await body.aclose()``, or (d) as a last resort, when the
``Http2ResponseBody`` is garbage-collected before the stream finished.

Invariants: ``h2`` is touched only on the event loop; every buffer is bounded (inbound by
the windows we advertise, outbound by the server's windows); each pump task is referenced
by its stream and cancelled when the stream ends.

Concurrency: callbacks from the transport drive ``h2``; one pump task per stream with a
request body still to send; pool bookkeeping runs on the same loop, so no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from dataclasses import dataclass

import h2.events
import h2.exceptions
import h2.settings
from mypy_extensions import mypyc_attr

from meshproxy.config.model import Endpoint
from meshproxy.core.errors import (
    ProtocolError,
    UpstreamConnectError,
    UpstreamOverflowError,
    UpstreamResetError,
)
from meshproxy.core.h2util import (
    GoAway,
    h2_request_headers,
    h2_trailers,
    new_connection,
    response_head_from_h2,
    trailers_from_h2,
)
from meshproxy.core.http import Headers, RequestHead, ResponseHead
from meshproxy.core.passthrough import source_for
from meshproxy.io.body import BytesBody, known_length
from meshproxy.io.exchange import BodyStream, ConnectionLimits, UpstreamResponse
from meshproxy.io.http2_common import (
    CANCEL,
    NO_ERROR,
    PROTOCOL_ERROR,
    H2Endpoint,
    InboundBody,
    StreamClosedError,
)

log = logging.getLogger(__name__)

_MAX_STREAM_ID = 2**31 - 1
_RETIRE_STREAM_ID = _MAX_STREAM_ID - 2**16  # open a fresh connection well before ids run out


@dataclass(frozen=True, slots=True)
class Http2ClientSettings:
    """Upstream HTTP/2 pool settings.

    Defaults: 4 connections per endpoint spread load over a server's accept loop without
    defeating multiplexing; 60 s idle matches ``TrafficPolicy.idle_timeout``; windows as
    for the server side (256 KiB per stream, 1 MiB per connection, which bounds what one
    upstream connection can make us buffer). Keepalive is off by default: the pipeline's
    timeouts already bound a request; turn it on to detect dead peers of long streams.
    """

    max_connections_per_endpoint: int = 4
    idle_timeout: float = 60.0
    initial_window_size: int = 256 * 1024
    connection_window_size: int = 1024 * 1024
    max_header_list_size: int = 64 * 1024
    keepalive_interval: float | None = None
    keepalive_timeout: float = 20.0
    # Connections to this pod's own app: bound to the passthrough source when the app is
    # not on loopback (``meshproxy.core.passthrough``). The inbound client's pools only.
    inbound: bool = False


# Not a native class when compiled: those cannot be weakly referenced (the finalizer that
# resets an abandoned stream needs it).
@mypyc_attr(native_class=False)
class Http2ResponseBody:
    """The response ``BodyStream``; ``aclose()`` abandons the stream (RST_STREAM if unfinished)."""

    __slots__ = ("__weakref__", "_stream")

    def __init__(self, stream: _ClientStream) -> None:
        self._stream = stream

    async def read(self) -> bytes:
        try:
            return await self._stream.body.read()
        except asyncio.CancelledError:
            self._stream.abandon()
            raise

    @property
    def trailers(self) -> Headers | None:
        return self._stream.body.trailers

    @property
    def content_length(self) -> int | None:
        """``0`` when the response already ended with no data and no trailers (``KnownLength``).

        Lets the pipeline answer with one HEADERS+END_STREAM frame, which keeps a gRPC
        trailers-only response what it was. ``None`` (unknown) otherwise.
        """
        return 0 if self._stream.body.empty_and_ended else None

    @property
    def complete(self) -> bool:
        """The whole response body has arrived (it may not all have been read yet)."""
        return self._stream.body.complete

    def take_complete(self) -> bytes | None:
        """The rest of the body in one piece once it has all arrived, else None (see
        ``InboundBody.take_complete``); lets the pipeline forward it with ``send_whole``."""
        return self._stream.body.take_complete()

    def abort(self) -> None:
        """Give up on the response: RST_STREAM(CANCEL) if the stream is still open."""
        self._stream.abandon()

    async def aclose(self) -> None:
        self._stream.abandon()


class _ClientStream:
    """One request/response exchange on a connection."""

    __slots__ = (
        "_finalizer",
        "body",
        "conn",
        "head",
        "pump",
        "request_done",
        "response_done",
        "stream_id",
    )

    def __init__(self, conn: _ClientConnection, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        assert conn._loop is not None
        self.head: asyncio.Future[ResponseHead] = conn._loop.create_future()
        self.body = InboundBody(lambda n: conn._ack(stream_id, n))
        self.pump: asyncio.Task[None] | None = None
        self.request_done = False
        self.response_done = False
        self._finalizer: weakref.finalize[[], Http2ResponseBody] | None = None

    def watch(self, body: Http2ResponseBody) -> None:
        # Last-resort cleanup: reset the stream if the pipeline drops the body unfinished.
        self._finalizer = weakref.finalize(body, self.abandon)

    def fail(self, exc: Exception) -> None:
        """The stream is dead (reset, GOAWAY, connection lost): wake whoever waits on it."""
        if not self.head.done():
            self.head.set_exception(exc)
            self.head.exception()  # retrieved here: nobody may await a request that was cancelled
        self.body.fail(exc)
        self._finish()

    def abandon(self) -> None:
        """The consumer gave up: reset the stream if it is still open and drop buffers."""
        if not (self.request_done and self.response_done):
            self.conn._reset_stream(self.stream_id, CANCEL)
        self.body.discard()
        self.fail(UpstreamResetError("response abandoned"))

    def _finish(self) -> None:
        self.request_done = self.response_done = True
        if self.pump is not None and not self.pump.done():
            self.pump.cancel()
        self.conn._stream_finished(self)

    def maybe_finished(self) -> None:
        if self.request_done and self.response_done:
            self._finish()

    def detach(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None


class _ClientConnection(H2Endpoint):
    def __init__(self, pool: _EndpointPool, settings: Http2ClientSettings) -> None:
        super().__init__(new_connection(client_side=True), client_side=True, name=f"h2-client {pool.label}")
        self._pool = pool
        self._settings = settings
        self._streams: dict[int, _ClientStream] = {}
        self.ready: asyncio.Future[None] | None = None  # set when the server's SETTINGS arrived
        self._goaway: GoAway | None = None
        self._closing = False
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_since = 0.0  # loop time the last stream ended (see _arm_idle_timer)
        self._keepalive_timer: asyncio.TimerHandle | None = None
        self._ping_deadline: asyncio.TimerHandle | None = None
        self._heard = False  # any frame from the server since the last keepalive check
        self.limits: ConnectionLimits | None = None  # holds one max_connections slot while open

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self._loop is not None
        self.ready = self._loop.create_future()
        s = self._settings
        self._h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: s.initial_window_size,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: s.max_header_list_size,
            },
        )
        self._h2.initiate_connection()
        if s.connection_window_size > 65535:
            self._h2.increment_flow_control_window(s.connection_window_size - 65535)
        self._flush()

    def data_received(self, data: bytes) -> None:
        self._heard = True
        super().data_received(data)

    # -- pool interface -------------------------------------------------------------------
    @property
    def stream_count(self) -> int:
        return len(self._streams)

    @property
    def usable(self) -> bool:
        return not (self._lost or self._closing or self._goaway is not None)

    def has_capacity(self) -> bool:
        if not self.usable or self._h2.highest_outbound_stream_id >= _RETIRE_STREAM_ID:
            return False
        return self._h2.open_outbound_streams < self._h2.remote_settings.max_concurrent_streams

    def start_request(self, head: RequestHead, body: BodyStream) -> _ClientStream:
        # A body known to be empty goes as END_STREAM on the HEADERS frame, with no pump task.
        # (``known_length``, not ``isinstance(body, KnownLength)``: a runtime Protocol check
        # was ~9 us per request on the bench VM.)
        empty = known_length(body) == 0
        try:
            block = h2_request_headers(head)
            sid = self._h2.get_next_available_stream_id()
            self._h2.send_headers(sid, block, end_stream=empty)
        except h2.exceptions.ProtocolError as exc:
            if isinstance(exc, h2.exceptions.TooManyStreamsError):
                raise UpstreamResetError(f"{self._name}: no stream available") from None
            raise ProtocolError(f"request head not valid for HTTP/2: {exc}", status=400) from None
        stream = _ClientStream(self, sid)
        self._streams[sid] = stream
        self._arm_keepalive()
        rest: BodyStream | None = None
        if not empty:
            try:
                rest = self._send_whole_body(sid, body)
            except (StreamClosedError, ProtocolError) as exc:
                self._reset_stream(sid, CANCEL)
                stream.fail(exc if isinstance(exc, ProtocolError) else UpstreamResetError(str(exc)))
                self._schedule_flush()
                return stream
        if rest is None:
            stream.request_done = True
        else:
            assert self._loop is not None
            stream.pump = self._loop.create_task(
                self._pump(stream, rest), name=f"h2-upstream-body {self._name}:{sid}"
            )
        # Scheduled after the pump's first step: a body that is already here (a gRPC unary
        # request arrives with its HEADERS) is sent by that step, and HEADERS, DATA and
        # END_STREAM leave in one write; scheduled first, they took two writes, and the
        # server was woken twice per request.
        self._schedule_flush()
        return stream

    def close(self) -> None:
        """Close now (GOAWAY + FIN); in-flight streams fail with ``UpstreamResetError``."""
        self._closing = True
        if not self._lost:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._h2.close_connection(error_code=NO_ERROR)
            self._flush()
            self.close_transport()

    # -- request body ---------------------------------------------------------------------
    def _send_whole_body(self, sid: int, body: BodyStream) -> BodyStream | None:
        """Send a request body that has all arrived (``take_complete``) now; None once sent.

        A unary gRPC request arrives whole with its HEADERS: its DATA (carrying END_STREAM,
        or followed by the trailers) leaves with the HEADERS, without a pump task and its
        coroutine per chunk. Otherwise returns what the pump must send: ``body`` itself
        while it is not all here, or what was taken when it does not fit the server's
        window. Raises ``ProtocolError`` for trailers HTTP/2 cannot carry (nothing of the
        body sent), ``StreamClosedError`` if the stream is gone.
        """
        take = getattr(body, "take_complete", None)
        data = take() if take is not None else None
        if data is None:
            return body
        trailers = body.trailers
        tail = h2_trailers(trailers) if trailers else None
        if data and not self._send_data_now(sid, data, end_stream=tail is None):
            return BytesBody(data, trailers)
        try:
            if tail is not None:
                self._h2.send_headers(sid, tail, end_stream=True)
            elif not data:
                self._h2.end_stream(sid)
        except h2.exceptions.ProtocolError as exc:
            raise StreamClosedError(f"{self._name}: stream {sid}: {exc}") from None
        return None

    async def _pump(self, stream: _ClientStream, body: BodyStream) -> None:
        sid = stream.stream_id
        while True:
            try:
                chunk = await body.read()
            except Exception as exc:
                # The downstream body failed (client went away): the upstream exchange is moot.
                log.debug("%s: stream %d: request body failed: %r", self._name, sid, exc)
                self._reset_stream(sid, CANCEL)
                stream.fail(UpstreamResetError(f"request body failed: {exc!r}"))
                return
            if not chunk:
                break
            try:
                await self._send_data(sid, chunk)
            except StreamClosedError:
                return  # the upstream stream is gone; the response side reports why
        if self._lost:
            return
        trailers = body.trailers
        try:
            if trailers:
                self._h2.send_headers(sid, h2_trailers(trailers), end_stream=True)
            else:
                self._h2.end_stream(sid)
        except h2.exceptions.ProtocolError:
            return
        except ProtocolError as exc:  # trailers HTTP/2 cannot carry: the request fails
            self._reset_stream(sid, CANCEL)
            stream.fail(exc)
            return
        self._schedule_flush()
        stream.request_done = True
        stream.maybe_finished()

    # -- h2 events ------------------------------------------------------------------------
    def _on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.body.push(event.data, event.flow_controlled_length)
            elif event.flow_controlled_length:
                self._ack(event.stream_id, event.flow_controlled_length)
        elif isinstance(event, h2.events.ResponseReceived):
            stream = self._streams.get(event.stream_id)
            if stream is None:
                return
            try:
                head = response_head_from_h2(event.headers)
            except ProtocolError as exc:
                self._reset_stream(event.stream_id, PROTOCOL_ERROR)
                stream.fail(exc)
                return
            if not stream.head.done():
                stream.head.set_result(head)
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                try:
                    stream.body.finish(trailers_from_h2(event.headers, client_side=True))
                except ProtocolError as exc:
                    self._reset_stream(event.stream_id, PROTOCOL_ERROR)
                    stream.fail(exc)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.body.finish()
                stream.response_done = True
                if not stream.request_done:
                    # The server answered in full before reading all of the request
                    # (e.g. a gRPC error mid-upload): stop sending (RFC 9113 8.1).
                    self._reset_stream(event.stream_id, NO_ERROR)
                    stream.request_done = True
                stream.maybe_finished()
        elif isinstance(event, h2.events.StreamReset):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.fail(
                    UpstreamResetError(f"stream reset by upstream (error code {int(event.error_code)})")
                )
            self._wake_window(event.stream_id)
        elif isinstance(event, h2.events.WindowUpdated):
            self._wake_window(event.stream_id)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            if self.ready is not None and not self.ready.done():
                self.ready.set_result(None)
            if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                self._wake_window(None)
            if h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS in event.changed_settings:
                self._pool.wake()
        elif isinstance(event, h2.events.PingAckReceived):
            if self._ping_deadline is not None:
                self._ping_deadline.cancel()
                self._ping_deadline = None
        elif isinstance(event, h2.events.ConnectionTerminated):  # not reached: GOAWAY is split off
            self._on_goaway(GoAway(event.last_stream_id or 0, int(event.error_code or 0)))

    def _on_goaway(self, goaway: GoAway) -> None:
        level = logging.INFO if goaway.error_code else logging.DEBUG
        log.log(
            level,
            "%s: GOAWAY last=%d error=%d %r",
            self._name,
            goaway.last_stream_id,
            goaway.error_code,
            goaway.debug_data,
        )
        self._goaway = goaway
        self._pool.discard(self)
        for sid, stream in list(self._streams.items()):
            if sid > goaway.last_stream_id:
                # Never processed by the server: safe to retry elsewhere.
                stream.fail(UpstreamResetError("refused by GOAWAY"))
        self._maybe_close()

    def _on_lost(self, exc: Exception | None) -> None:
        for timer in (self._idle_timer, self._keepalive_timer, self._ping_deadline):
            if timer is not None:
                timer.cancel()
        if self.ready is not None and not self.ready.done():
            self.ready.set_exception(ConnectionError(f"connection closed before SETTINGS: {exc}"))
            self.ready.exception()
        for stream in list(self._streams.values()):
            stream.fail(UpstreamResetError(f"upstream connection lost: {exc or 'closed'}"))
        if self.limits is not None:
            self.limits.release_connection()
            self.limits = None
        self._pool.discard(self)

    # -- bookkeeping ----------------------------------------------------------------------
    def _stream_finished(self, stream: _ClientStream) -> None:
        stream.detach()
        if self._streams.pop(stream.stream_id, None) is None:
            return
        self._pool.wake()
        if not self._streams:
            self._maybe_close()
            self._arm_idle_timer()

    def _maybe_close(self) -> None:
        if (self._goaway is not None or self._closing) and not self._streams and not self._lost:
            self.close()

    def _arm_idle_timer(self) -> None:
        """The connection just went idle: make sure an idle check is pending.

        One timer, re-armed lazily: a connection that goes idle between every request
        (a few streams in flight at a time) would otherwise cancel and create a timer
        per request. ``_on_idle`` re-checks how long the connection has really been idle.
        """
        if self._lost or self._closing or self._loop is None:
            return
        self._idle_since = self._loop.time()
        timer = self._idle_timer
        if timer is not None and timer.when() > self._idle_since + self._pool.idle_timeout:
            timer.cancel()  # the idle timeout was shortened since the timer was armed
            timer = None
        if timer is None:
            self._idle_timer = self._loop.call_later(self._pool.idle_timeout, self._on_idle)

    def _on_idle(self) -> None:
        self._idle_timer = None
        if self._streams or self._lost or self._closing or self._loop is None:
            return  # busy: the timer is armed again when the last stream ends
        left = self._idle_since + self._pool.idle_timeout - self._loop.time()
        if left > 0:
            self._idle_timer = self._loop.call_later(left, self._on_idle)
            return
        log.debug("%s: idle, closing", self._name)
        self._pool.discard(self)
        self.close()

    def _arm_keepalive(self) -> None:
        interval = self._settings.keepalive_interval
        if interval is None or self._keepalive_timer is not None or self._loop is None:
            return
        self._heard = False
        self._keepalive_timer = self._loop.call_later(interval, self._keepalive_check)

    def _keepalive_check(self) -> None:
        self._keepalive_timer = None
        if self._lost or not self._streams:
            return
        if not self._heard and self._ping_deadline is None:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._h2.ping(b"meshprxy")
            self._flush()
            assert self._loop is not None
            self._ping_deadline = self._loop.call_later(
                self._settings.keepalive_timeout, self._on_ping_timeout
            )
        self._arm_keepalive()

    def _on_ping_timeout(self) -> None:
        self._ping_deadline = None
        log.warning("%s: no PING answer in %.1fs, closing", self._name, self._settings.keepalive_timeout)
        self._pool.discard(self)
        self.close_transport()


class _EndpointPool:
    """The connections to one endpoint; opens at most one connection at a time."""

    def __init__(self, address: str, port: int, settings: Http2ClientSettings) -> None:
        self.address = address
        self.port = port
        self.label = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        self._settings = settings
        # The destination service's TrafficPolicy.idle_timeout once a request passed one.
        self.idle_timeout = settings.idle_timeout
        self.conns: list[_ClientConnection] = []  # usable connections (not going away)
        self._all: set[_ClientConnection] = set()  # including draining ones, for aclose()
        self._connecting: asyncio.Task[None] | None = None
        self._waiters: list[asyncio.Future[None]] = []

    def ready(self) -> _ClientConnection | None:
        """A connection with a free stream right now, if there is one."""
        for conn in self.conns:
            if conn.has_capacity():
                return conn
        return None

    async def acquire(
        self, connect_timeout: float, limits: ConnectionLimits | None = None
    ) -> _ClientConnection:
        """A connection with a free stream. With ``limits`` (the service's breaker) a new
        connection needs a ``max_connections`` slot; waiting for capacity counts as a pending
        request (``max_pending_requests``), beyond which ``UpstreamOverflowError`` (UO)."""
        loop = asyncio.get_running_loop()
        pending = False
        try:
            while True:
                for conn in self.conns:
                    if conn.has_capacity():
                        return conn
                if self._connecting is not None:
                    await asyncio.shield(self._connecting)  # raises its UpstreamConnectError
                    continue
                if len(self.conns) < self._settings.max_connections_per_endpoint and (
                    limits is None or limits.try_acquire_connection()
                ):
                    task = loop.create_task(
                        self._connect(connect_timeout, limits), name=f"h2-connect {self.label}"
                    )
                    task.add_done_callback(_consume_exception)
                    self._connecting = task
                    continue
                if limits is not None and not pending:
                    admission = limits.try_acquire_pending()
                    if not admission:
                        raise UpstreamOverflowError(admission.reason)
                    pending = True
                waiter = loop.create_future()
                self._waiters.append(waiter)
                try:
                    await waiter
                finally:
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(waiter)
        finally:
            if pending and limits is not None:
                limits.release_pending()

    async def _connect(self, connect_timeout: float, limits: ConnectionLimits | None = None) -> None:
        loop = asyncio.get_running_loop()
        conn = _ClientConnection(self, self._settings)
        conn.limits = limits  # the slot acquired for it; given back when the connection is lost
        transport: asyncio.BaseTransport | None = None
        try:
            async with asyncio.timeout(connect_timeout):
                transport, _ = await loop.create_connection(
                    lambda: conn,
                    self.address,
                    self.port,
                    local_addr=source_for(self.address) if self._settings.inbound else None,
                )
                assert conn.ready is not None
                await conn.ready
        except TimeoutError:
            if transport is not None:
                transport.close()
            raise UpstreamConnectError(f"{self.label}: connect timeout after {connect_timeout}s") from None
        except OSError as exc:  # includes ConnectionError from ``ready``
            if transport is not None:
                transport.close()
            raise UpstreamConnectError(f"{self.label}: {exc}") from None
        finally:
            self._connecting = None
            if transport is None and conn.limits is not None:
                # Never connected, so connection_lost (which gives the slot back) never runs.
                conn.limits.release_connection()
                conn.limits = None
                self.wake()
        self.conns.append(conn)
        self._all.add(conn)

    def active_streams(self) -> int:
        return sum(c.stream_count for c in self._all | set(self.conns))

    def discard(self, conn: _ClientConnection) -> None:
        if conn in self.conns:
            self.conns.remove(conn)
        if conn.is_closed:
            self._all.discard(conn)
        self.wake()

    def wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def close_all(self) -> list[_ClientConnection]:
        conns = list(self._all | set(self.conns))
        for conn in conns:
            conn.close()
        self.conns.clear()
        return conns


def _consume_exception(task: asyncio.Task[None]) -> None:
    # The connect task's error reaches every waiter through shield(); if none is left
    # (all cancelled), it is still "retrieved" here so asyncio does not log it.
    if not task.cancelled():
        task.exception()


class Http2Client:
    """``UpstreamClient`` for HTTP/2 endpoints. One instance per proxy; not thread-safe."""

    def __init__(self, settings: Http2ClientSettings | None = None) -> None:
        self._settings = settings or Http2ClientSettings()
        self._pools: dict[tuple[str, int], _EndpointPool] = {}
        self._closed = False

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
        """``idle_timeout``: the destination's ``TrafficPolicy.idle_timeout`` (else the settings')."""
        if self._closed:
            raise UpstreamConnectError("client closed")
        key = (endpoint.address, endpoint.port)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _EndpointPool(endpoint.address, endpoint.port, self._settings)
        if idle_timeout is not None:
            pool.idle_timeout = idle_timeout
        # A connection with a free stream is the common case: no coroutine for it.
        conn = pool.ready() or await pool.acquire(connect_timeout, limits)
        stream = conn.start_request(head, body)
        try:
            response_head = await stream.head
        except asyncio.CancelledError:
            stream.abandon()
            raise
        response_body = Http2ResponseBody(stream)
        if not stream.response_done:
            stream.watch(response_body)
        return UpstreamResponse(response_head, response_body)

    def active_streams(self, endpoint: Endpoint) -> int:
        """Streams in flight to ``endpoint`` (request or response not finished yet)."""
        pool = self._pools.get((endpoint.address, endpoint.port))
        return pool.active_streams() if pool is not None else 0

    def connection_count(self, endpoint: Endpoint) -> int:
        """Usable connections to ``endpoint`` (for /clusters-style introspection and tests)."""
        pool = self._pools.get((endpoint.address, endpoint.port))
        return len(pool.conns) if pool is not None else 0

    async def close(self) -> None:
        """Same as ``aclose`` (the name ``Http1Client`` uses)."""
        await self.aclose()

    async def aclose(self) -> None:
        """Close every connection (GOAWAY + FIN) and wait until they are gone."""
        self._closed = True
        conns: list[_ClientConnection] = []
        for pool in self._pools.values():
            conns.extend(pool.close_all())
        self._pools.clear()
        for conn in conns:
            await conn.wait_closed()
