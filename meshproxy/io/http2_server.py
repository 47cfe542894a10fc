"""Downstream HTTP/2 (h2c prior knowledge, how gRPC travels in the cluster).

Owns: ``Http2ServerConnection``, an ``asyncio.Protocol`` that speaks HTTP/2 to one
downstream client with ``h2`` and calls the pipeline's ``RequestHandler`` once per
stream, each in its own named task.

Hand-off from the listener (protocol detection). The listener reads until it can
tell the protocol; when the bytes start with the HTTP/2 client preface
(``meshproxy.core.h2util.PREFACE``) it hands the connection over::

    conn = Http2ServerConnection(handler, ctx, settings)
    transport.set_protocol(conn)
    conn.connection_made(transport)     # sends our SETTINGS
    conn.feed_initial(already_read)     # the sniffed bytes, preface included

(or ``serve_http2(transport, already_read, handler, ctx, settings)`` which does the
three steps). Reading must not be paused at that point. Keep the returned object to
call ``await conn.shutdown(grace)`` when the proxy drains (GOAWAY, in-flight streams
finish, the rest are cancelled after ``grace`` seconds) and ``await conn.wait_closed()``.

Mapping to the shared model (``meshproxy.io.exchange``):
  * request HEADERS -> ``RequestHead`` (version "2", ``:authority`` as ``authority``);
  * DATA -> the stream's ``BodyStream`` (``InboundBody``: flow-control credit is given
    back only when the pipeline reads a chunk, so a slow upstream slows the client);
    trailing HEADERS -> ``BodyStream.trailers``;
  * ``ResponseSink.send_head`` is sent on the next loop iteration, or merged with
    ``send_end`` when the body is empty: an upstream gRPC "trailers-only" response
    (one HEADERS frame with END_STREAM carrying ``grpc-status``) stays one;
  * ``send_data`` waits for the client's window (WINDOW_UPDATE) and splits to its max
    frame size; ``send_end(trailers)`` sends trailers (``grpc-status``/``grpc-message``
    preserved); ``reset`` sends RST_STREAM(INTERNAL_ERROR).
  * RST_STREAM from the client cancels that stream's task (so the pipeline's upstream
    request is abandoned and reset in turn). A handler that raises, or returns without
    ending its response, gets its stream reset; other streams are unaffected.
  * A connection-level protocol error closes the connection with GOAWAY and a log line.
  * A GOAWAY from the client: no new streams arrive; the connection closes when the
    in-flight ones are done.

Invariants: at most ``max_concurrent_streams`` stream tasks per connection (advertised
in SETTINGS and enforced by ``h2``); buffered request bytes per connection are bounded
by ``connection_window_size``.

Concurrency: protocol callbacks on the event loop drive ``h2``; one task per stream
runs the handler; tasks are kept in ``_streams`` and cancelled when the connection
is lost or the shutdown grace period ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import h2.events
import h2.exceptions
import h2.settings

from meshproxy.core.errors import ProtocolError
from meshproxy.core.h2util import (
    GoAway,
    goaway_frame,
    h2_response_headers,
    h2_trailers,
    new_connection,
    request_head_from_h2,
    trailers_from_h2,
)
from meshproxy.core.http import Headers, RequestHead, ResponseHead
from meshproxy.io.exchange import DownstreamContext, RequestHandler
from meshproxy.io.http2_common import (
    CANCEL,
    ENHANCE_YOUR_CALM,
    INTERNAL_ERROR,
    NO_ERROR,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    H2Endpoint,
    InboundBody,
    StreamClosedError,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Http2ServerSettings:
    """Per-connection limits advertised to downstream clients.

    Defaults: 128 concurrent streams is above gRPC clients' usual fan-out and keeps one
    connection's task count small; a 256 KiB stream window lets one stream reach high
    throughput on a pod network while the 1 MiB connection window bounds what a single
    connection can make us buffer; 64 KiB of headers is far above real gRPC metadata.
    ``max_client_resets`` per ``reset_window`` seconds guards against "rapid reset"
    (CVE-2023-44487: open a stream, reset it at once, repeat; each costs us a task and an
    upstream request): 2000 per 10 s is far above what cancelling or hedging clients do.
    """

    max_concurrent_streams: int = 128
    initial_window_size: int = 256 * 1024
    connection_window_size: int = 1024 * 1024
    max_header_list_size: int = 64 * 1024
    idle_timeout: float | None = None  # close (GOAWAY) after this long without streams
    max_client_resets: int = 2000
    reset_window: float = 10.0


class _ServerStream:
    """One request: its body (inbound) and the ``ResponseSink`` for its response."""

    __slots__ = ("_conn", "_ended", "_head_sent", "_pending_head", "body", "stream_id", "task")

    def __init__(self, conn: Http2ServerConnection, stream_id: int) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.body = InboundBody(lambda n: conn._ack(stream_id, n))
        self.task: asyncio.Task[None] | None = None
        self._pending_head: list[tuple[bytes, bytes]] | None = None
        self._head_sent = False
        self._ended = False

    @property
    def response_ended(self) -> bool:
        return self._ended

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The connection's event loop (spares the pipeline a lookup per request)."""
        return self._conn._loop

    # -- ResponseSink -------------------------------------------------------------------
    async def send_head(self, head: ResponseHead, *, end_stream: bool = False) -> None:
        if self._head_sent or self._pending_head is not None:
            raise ProtocolError("response head sent twice", status=500)
        block = h2_response_headers(head)
        if end_stream:
            self._head_sent = True
            self._ended = True
            self._conn._send_headers(self.stream_id, block, end_stream=True)
            return
        # Deferred by one loop iteration so an immediately following send_end() can make
        # it a single HEADERS+END_STREAM frame (gRPC trailers-only responses).
        self._pending_head = block
        assert self._conn._loop is not None
        self._conn._loop.call_soon(self._flush_head_soon)

    def _flush_head_soon(self) -> None:
        if self._pending_head is not None:
            self._flush_head()
            self._conn._flush()  # already at the end of an iteration: write now

    def _flush_head(self) -> None:
        block = self._pending_head
        if block is None:
            return
        self._pending_head = None
        self._head_sent = True
        with contextlib.suppress(StreamClosedError):
            self._conn._send_headers(self.stream_id, block, end_stream=False)

    async def send_data(self, data: bytes) -> None:
        if self._ended:
            raise ProtocolError("data after end of response", status=500)
        if self._pending_head is not None:
            self._flush_head()
        elif not self._head_sent:
            raise ProtocolError("data before response head", status=500)
        if data:
            await self._conn._send_data(self.stream_id, data)

    async def send_end(self, trailers: Headers | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        pending = self._pending_head
        if pending is not None and not trailers:
            self._pending_head = None
            self._head_sent = True
            self._conn._send_headers(self.stream_id, pending, end_stream=True)
            return
        if pending is not None:
            self._flush_head()
        if trailers:
            self._conn._send_headers(self.stream_id, h2_trailers(trailers), end_stream=True)
        else:
            self._conn._end_stream(self.stream_id)

    async def send_whole(
        self, head: ResponseHead, data: bytes, trailers: Headers | None, *, end_stream: bool
    ) -> None:
        """``send_head``, ``send_data(data)``, ``send_end(trailers)`` for a body that is all here.

        The same frames, except that END_STREAM rides on the last DATA frame when there are
        no trailers; without holding the head back a loop iteration and without a coroutine
        per step; one write at the end of the iteration. ``end_stream``: the body is known
        to be empty (``data`` and ``trailers`` are then ignored, as by ``send_head``), which
        keeps a gRPC trailers-only response one HEADERS frame.
        """
        if self._head_sent or self._pending_head is not None:
            raise ProtocolError("response head sent twice", status=500)
        conn = self._conn
        sid = self.stream_id
        block = h2_response_headers(head)
        tail = h2_trailers(trailers) if trailers and not end_stream else None  # checked before sending
        self._head_sent = self._ended = True
        if end_stream or (not data and tail is None):
            conn._send_headers(sid, block, end_stream=True)
            return
        conn._send_headers(sid, block, end_stream=False)
        if data and not conn._send_data_now(sid, data, end_stream=tail is None):
            await conn._send_data(sid, data)  # waits for the client's window
            if tail is None:
                conn._end_stream(sid)
        if tail is not None:
            conn._send_headers(sid, tail, end_stream=True)

    async def reset(self) -> None:
        self._ended = True
        self._pending_head = None
        self._conn._reset_stream(self.stream_id, INTERNAL_ERROR)


class Http2ServerConnection(H2Endpoint):
    """One downstream HTTP/2 connection. See the module docstring for the hand-off API."""

    def __init__(
        self,
        handler: RequestHandler,
        ctx: DownstreamContext,
        settings: Http2ServerSettings | None = None,
    ) -> None:
        self._settings = settings or Http2ServerSettings()
        super().__init__(
            new_connection(client_side=False),
            client_side=False,
            name=f"h2-server {ctx.peer_address}:{ctx.peer_port} #{ctx.connection_id}",
        )
        self._handler = handler
        self._ctx = ctx
        self._streams: dict[int, _ServerStream] = {}
        self._draining = False  # we sent a graceful GOAWAY
        self._last_stream_id = 0  # the GOAWAY's last-stream-id: later streams are refused
        self._peer_goaway = False
        self._refusing = False  # closing for abuse: events still queued are ignored
        self._reset_count = 0
        self._reset_window_start = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None

    # -- hand-off API ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        s = self._settings
        self._h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: s.max_concurrent_streams,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: s.initial_window_size,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: s.max_header_list_size,
            },
        )
        self._h2.initiate_connection()
        if s.connection_window_size > 65535:
            self._h2.increment_flow_control_window(s.connection_window_size - 65535)
        self._flush()
        self._arm_idle_timer()

    def feed_initial(self, data: bytes) -> None:
        """Bytes the listener read before handing over (starting with the client preface)."""
        if data:
            self.data_received(data)

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    @property
    def draining(self) -> bool:
        """A graceful GOAWAY was sent: no new streams are accepted."""
        return self._draining

    async def shutdown(self, grace: float) -> None:
        """Graceful close: GOAWAY, let in-flight streams finish for ``grace`` s, then cancel them."""
        self.start_drain()
        try:
            async with asyncio.timeout(grace):
                await self.wait_closed()
            return
        except TimeoutError:
            pass
        # Past the deadline; outside the handler, because this awaits (see meshproxy.compiled).
        log.info("%s: %d streams still open after %.1fs, cancelling", self._name, len(self._streams), grace)
        for stream in list(self._streams.values()):
            if stream.task is not None:
                stream.task.cancel()
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._h2.close_connection(error_code=NO_ERROR, last_stream_id=self._last_stream_id)
        self._flush()
        self.close_transport(linger=0)
        await self.wait_closed()

    def start_drain(self) -> None:
        """Send a graceful GOAWAY (no new streams); close once in-flight streams are done."""
        if self._draining or self._lost:
            return
        self._draining = True
        self._last_stream_id = self._h2.highest_inbound_stream_id
        # Written around h2 (see meshproxy.core.h2util): h2 would refuse all further frames.
        self._flush()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(goaway_frame(self._last_stream_id, NO_ERROR))
        self._maybe_close()

    # -- h2 events ------------------------------------------------------------------------
    def _on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.body.push(event.data, event.flow_controlled_length)
            elif event.flow_controlled_length:
                self._ack(event.stream_id, event.flow_controlled_length)
        elif isinstance(event, h2.events.RequestReceived):
            self._on_request(event)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.body.finish()
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                try:
                    stream.body.finish(trailers_from_h2(event.headers, client_side=False))
                except ProtocolError as exc:
                    log.info("%s: stream %d: %s", self._name, event.stream_id, exc)
                    self._reset_stream(event.stream_id, PROTOCOL_ERROR)
                    stream.body.fail(StreamClosedError(f"stream {event.stream_id}: {exc}"))
                    if stream.task is not None:
                        stream.task.cancel()
        elif isinstance(event, h2.events.WindowUpdated):
            self._wake_window(event.stream_id)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                self._wake_window(None)
        elif isinstance(event, h2.events.StreamReset):
            if event.remote_reset and self._too_many_resets():
                return
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                log.debug("%s: stream %d reset by client (%s)", self._name, event.stream_id, event.error_code)
                stream.body.fail(StreamClosedError(f"stream {event.stream_id} reset by client"))
                if stream.task is not None:
                    stream.task.cancel()
            self._wake_window(event.stream_id)
        elif isinstance(event, h2.events.ConnectionTerminated):  # not reached: GOAWAY is split off
            self._on_goaway(GoAway(event.last_stream_id or 0, int(event.error_code or 0)))

    def _too_many_resets(self) -> bool:
        """Count a client RST_STREAM; past the limit, close with GOAWAY(ENHANCE_YOUR_CALM)."""
        if self._refusing:
            return True
        assert self._loop is not None
        now = self._loop.time()
        if now - self._reset_window_start > self._settings.reset_window:
            self._reset_window_start = now
            self._reset_count = 0
        self._reset_count += 1
        if self._reset_count <= self._settings.max_client_resets:
            return False
        log.warning(
            "%s: %d stream resets in %.0fs, closing (rapid reset)",
            self._name,
            self._reset_count,
            self._settings.reset_window,
        )
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._h2.close_connection(error_code=ENHANCE_YOUR_CALM, additional_data=b"too many stream resets")
        self._flush()
        self._refusing = True
        for stream in list(self._streams.values()):
            if stream.task is not None:
                stream.task.cancel()
        self.close_transport()  # lingering, so the client gets to read the GOAWAY saying why
        return True

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        if self._refusing:
            return
        if self._draining and sid > self._last_stream_id:
            self._reset_stream(sid, REFUSED_STREAM)
            return
        try:
            head = request_head_from_h2(event.headers)
        except ProtocolError as exc:
            log.info("%s: stream %d: bad request head: %s", self._name, sid, exc)
            self._reset_stream(sid, PROTOCOL_ERROR)
            return
        stream = _ServerStream(self, sid)
        if event.stream_ended is not None:
            stream.body.finish()
        self._streams[sid] = stream
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        assert self._loop is not None
        stream.task = self._loop.create_task(
            self._run_stream(stream, head), name=f"h2-stream {self._ctx.connection_id}:{sid}"
        )
        # Cleanup in a done callback, not a ``finally``: a task cancelled before its first
        # step (a stream reset in the same read as its HEADERS) never runs its body.
        stream.task.add_done_callback(lambda task: self._stream_done(stream, task))

    async def _run_stream(self, stream: _ServerStream, head: RequestHead) -> None:
        sid = stream.stream_id
        try:
            await self._handler(self._ctx, head, stream.body, stream)
        except StreamClosedError as exc:
            log.debug("%s: stream %d: %s", self._name, sid, exc)
            self._reset_stream(sid, CANCEL)
        except Exception:
            # The one broad except per stream: a broken handler must not take the connection down.
            log.exception("%s: stream %d: handler failed", self._name, sid)
            self._reset_stream(sid, INTERNAL_ERROR)
        else:
            if not stream.response_ended:
                log.warning("%s: stream %d: handler returned without ending the response", self._name, sid)
                self._reset_stream(sid, INTERNAL_ERROR)
            elif not stream.body.finished:
                # Response complete but the client is still sending: tell it to stop (RFC 9113 8.1).
                self._reset_stream(sid, NO_ERROR)

    def _stream_done(self, stream: _ServerStream, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            self._reset_stream(stream.stream_id, CANCEL)  # no-op if the client reset it already
        stream.body.discard()
        self._streams.pop(stream.stream_id, None)
        self._maybe_close()
        if not self._streams:
            self._arm_idle_timer()

    def _on_goaway(self, goaway: GoAway) -> None:
        if goaway.error_code:
            log.info("%s: client sent GOAWAY error %d %r", self._name, goaway.error_code, goaway.debug_data)
        self._peer_goaway = True
        self._maybe_close()

    def _on_lost(self, exc: Exception | None) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        for stream in list(self._streams.values()):
            stream.body.fail(StreamClosedError("connection lost"))
            if stream.task is not None:
                stream.task.cancel()

    # -- sending helpers used by _ServerStream --------------------------------------------
    def _send_headers(self, sid: int, block: list[tuple[bytes, bytes]], *, end_stream: bool) -> None:
        if self._lost:
            raise StreamClosedError(f"{self._name}: connection lost")
        try:
            self._h2.send_headers(sid, block, end_stream=end_stream)
        except h2.exceptions.StreamClosedError:
            raise StreamClosedError(f"{self._name}: stream {sid} closed") from None
        except h2.exceptions.ProtocolError as exc:
            # Invalid header from the pipeline (e.g. a forbidden field): a bug upstream of us.
            raise ProtocolError(f"cannot send header block on stream {sid}: {exc}", status=502) from None
        self._schedule_flush()

    def _end_stream(self, sid: int) -> None:
        if self._lost:
            raise StreamClosedError(f"{self._name}: connection lost")
        try:
            self._h2.end_stream(sid)
        except h2.exceptions.ProtocolError:
            raise StreamClosedError(f"{self._name}: stream {sid} closed") from None
        self._schedule_flush()

    def _maybe_close(self) -> None:
        if (self._draining or self._peer_goaway) and not self._streams and not self._lost:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._h2.close_connection(
                    error_code=NO_ERROR, last_stream_id=self._h2.highest_inbound_stream_id
                )
            self._flush()
            self.close_transport()

    def _arm_idle_timer(self) -> None:
        timeout = self._settings.idle_timeout
        if timeout is None or self._loop is None or self._lost or self._draining:
            return
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = self._loop.call_later(timeout, self._on_idle)

    def _on_idle(self) -> None:
        self._idle_timer = None
        if not self._streams:
            log.debug("%s: idle, closing", self._name)
            self.start_drain()


def serve_http2(
    transport: asyncio.Transport,
    initial: bytes,
    handler: RequestHandler,
    ctx: DownstreamContext,
    settings: Http2ServerSettings | None = None,
) -> Http2ServerConnection:
    """Take over ``transport`` (already connected, ``initial`` = bytes read so far) for HTTP/2."""
    conn = Http2ServerConnection(handler, ctx, settings)
    transport.set_protocol(conn)
    conn.connection_made(transport)
    conn.feed_initial(initial)
    return conn
