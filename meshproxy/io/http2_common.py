"""The asyncio shell shared by the HTTP/2 server and client connections.

Owns:
  * ``H2Endpoint``: an ``asyncio.Protocol`` around one ``h2.connection.H2Connection``:
    feeding inbound bytes (GOAWAY frames taken out first, see ``meshproxy.core.h2util``),
    writing ``h2``'s output, waiting for the peer's flow-control window before sending
    DATA, and transport write back-pressure (``pause_writing``/``resume_writing``).
  * ``InboundBody``: the ``BodyStream`` of one stream's inbound DATA frames.

Invariants:
  * Inbound DATA is acknowledged to ``h2`` (so WINDOW_UPDATE is sent) only when the
    consumer read it, or when the stream is discarded. The memory one connection can
    hold in ``InboundBody`` buffers is therefore bounded by the connection window we
    advertise, and a slow consumer slows the peer down (back-pressure).
  * DATA is sent only within the peer's window, split to its max frame size; a sender
    waits on a per-stream future woken by WINDOW_UPDATE, SETTINGS, reset or close.
  * ``h2`` is only touched from the event loop thread; no method blocks.

Concurrency: one event loop; the protocol callbacks run the ``h2`` state machine,
stream tasks (owned by the server/client subclasses) await futures set here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import cast

import h2.connection
import h2.events
import h2.exceptions
from mypy_extensions import mypyc_attr

from meshproxy.core.h2util import GoAway, GoAwaySplitter
from meshproxy.core.http import Headers
from meshproxy.io.body import DownstreamClosedError

log = logging.getLogger(__name__)

# RFC 9113 section 7 error codes used here (h2.errors.ErrorCodes values).
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
REFUSED_STREAM = 0x7
CANCEL = 0x8
ENHANCE_YOUR_CALM = 0xB

_READ_COALESCE = 64 * 1024  # one read() joins buffered chunks up to this many bytes
_FLUSH_AT = 64 * 1024  # DATA beyond this is written at once rather than at the end of the iteration


@mypyc_attr(native_class=False)  # an exception: see meshproxy.compiled
class StreamClosedError(DownstreamClosedError):
    """The HTTP/2 stream (or its connection) is gone: reset by the peer, or connection lost.

    A ``DownstreamClosedError`` because that is what the pipeline sees of it (the server
    side's sink and request body); the client side only uses it internally.
    """


class InboundBody:
    """``BodyStream`` over one stream's inbound DATA; acknowledges flow control on read.

    Producer side (the protocol): ``push``, ``finish``, ``fail``. Consumer: ``read``.
    ``discard`` gives back all buffered flow-control credit (stream finished or dropped).
    """

    __slots__ = ("_ack", "_buffered", "_chunks", "_done", "_error", "_trailers", "_waiter")

    def __init__(self, ack: Callable[[int], None]) -> None:
        self._ack = ack
        self._chunks: deque[tuple[bytes, int]] = deque()
        self._buffered = 0  # unacknowledged flow-controlled bytes held in _chunks
        self._done = False  # END_STREAM seen (or discarded)
        self._error: BaseException | None = None
        self._trailers: Headers | None = None
        self._waiter: asyncio.Future[None] | None = None

    # -- producer side -------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self._done or self._error is not None

    @property
    def content_length(self) -> int | None:
        """``KnownLength``: ``0`` for a body that ended empty (END_STREAM on HEADERS), else unknown."""
        return 0 if self.empty_and_ended else None

    @property
    def empty_and_ended(self) -> bool:
        """Ended normally (END_STREAM, no error) with nothing left to read and no trailers."""
        return self._done and self._error is None and not self._chunks and self._trailers is None

    def push(self, data: bytes, flow_len: int) -> None:
        if self._done or self._error is not None:
            if flow_len:
                self._ack(flow_len)
            return
        if not data:
            if flow_len:  # padding only: nothing to deliver, credit goes straight back
                self._ack(flow_len)
            return
        self._chunks.append((data, flow_len))
        self._buffered += flow_len
        self._wake()

    def finish(self, trailers: Headers | None = None) -> None:
        if self._done:
            return
        if trailers is not None:
            self._trailers = trailers
        self._done = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if self._done and not self._chunks:
            return  # already complete: the consumer will see a normal end
        if self._error is None:
            self._error = exc
        self._wake()

    def discard(self) -> None:
        """Drop buffered data and hand its flow-control credit back to the peer."""
        if self._buffered:
            self._ack(self._buffered)
        self._buffered = 0
        self._chunks.clear()
        self._done = True
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- consumer side -------------------------------------------------------------
    @property
    def trailers(self) -> Headers | None:
        return self._trailers

    @property
    def complete(self) -> bool:
        """The whole body has arrived (END_STREAM, no error); it may not all be read yet."""
        return self._done and self._error is None

    def take_complete(self) -> bytes | None:
        """Everything still buffered, in one piece, once the body has ended without error.

        None while more may come (or after an error): read chunk by chunk then. The
        taken bytes' flow-control credit goes back at once; ``read`` returns ``b""``
        afterwards and ``trailers`` are as usual. Lets a unary gRPC message that arrived
        with its HEADERS go on without a coroutine per chunk (``meshproxy.io.body``).
        """
        if not self._done or self._error is not None:
            return None
        chunks = self._chunks
        if not chunks:
            data = b""
        elif len(chunks) == 1:
            data = chunks.popleft()[0]
        else:
            data = b"".join([chunk for chunk, _ in chunks])
            chunks.clear()
        if self._buffered:
            self._ack(self._buffered)
            self._buffered = 0
        return data

    async def read(self) -> bytes:
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._done:
                return b""
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                self._waiter = None
        data, flow = self._chunks.popleft()
        if self._chunks and len(data) < _READ_COALESCE:
            parts = [data]
            size = len(data)
            while self._chunks and size + len(self._chunks[0][0]) <= _READ_COALESCE:
                more, n = self._chunks.popleft()
                parts.append(more)
                size += len(more)
                flow += n
            data = b"".join(parts)
        self._buffered -= flow
        if flow:
            self._ack(flow)
        return data


class H2Endpoint(asyncio.Protocol):
    """Transport + ``h2`` connection + flow-controlled sending; subclassed by server and client."""

    def __init__(self, conn: h2.connection.H2Connection, *, client_side: bool, name: str) -> None:
        self._h2 = conn
        self._name = name  # for logs: "h2-server 10.0.0.1:5123" / "h2-client 10.0.0.2:8080"
        self._splitter = GoAwaySplitter(expect_preface=not client_side)
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writable: asyncio.Event = asyncio.Event()
        self._writable.set()
        self._window_waiters: dict[int, asyncio.Future[None]] = {}
        self._flush_scheduled = False
        self._unflushed = 0  # DATA bytes handed to h2 since the last flush
        self._lost = False
        self._lingering = False  # FIN sent, reading (and dropping) until the peer's FIN
        self._linger_timer: asyncio.TimerHandle | None = None
        self._closed: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports do not subclass asyncio's.
        self._transport = cast(asyncio.Transport, transport)
        self._loop = asyncio.get_running_loop()
        self._closed = self._loop.create_future()

    def data_received(self, data: bytes) -> None:
        if self._lost or self._lingering:
            return
        try:
            for item in self._splitter.feed(data):
                if isinstance(item, GoAway):
                    self._on_goaway(item)
                    continue
                for event in self._h2.receive_data(item):
                    self._on_event(event)
        except h2.exceptions.ProtocolError as exc:
            self._connection_error(exc)
            return
        self._flush()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def eof_received(self) -> bool:
        return False  # the peer is done (or answered our FIN): close

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        self._writable.set()  # release writers; they re-check _lost
        for fut in self._window_waiters.values():
            if not fut.done():
                fut.set_result(None)
        self._window_waiters.clear()
        self._on_lost(exc)
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    # -- hooks for subclasses ---------------------------------------------------------
    def _on_event(self, event: h2.events.Event) -> None:
        raise NotImplementedError

    def _on_goaway(self, goaway: GoAway) -> None:
        raise NotImplementedError

    def _on_lost(self, exc: Exception | None) -> None:
        raise NotImplementedError

    # -- helpers ------------------------------------------------------------------------
    @property
    def is_closed(self) -> bool:
        return self._lost

    async def wait_closed(self) -> None:
        if self._closed is not None:
            await asyncio.shield(self._closed)

    def _connection_error(self, exc: h2.exceptions.ProtocolError) -> None:
        code = getattr(exc, "error_code", PROTOCOL_ERROR) or PROTOCOL_ERROR
        log.warning("%s: HTTP/2 protocol error, closing connection: %s", self._name, exc)
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._h2.close_connection(error_code=code)
        self._flush()
        self.close_transport()

    def close_transport(self, linger: float = 2.0) -> None:
        """Close after a lingering half-close: send FIN, drop input until the peer's FIN.

        Closing with unread input makes the kernel answer with RST, and an RST can destroy
        our last frames (a response, the GOAWAY saying why) before the peer reads them.
        ``linger`` bounds the wait; ``0`` closes at once.
        """
        t = self._transport
        if t is None or t.is_closing():
            return
        if linger <= 0 or not t.can_write_eof():
            t.close()
            return
        if self._lingering:
            return
        self._lingering = True
        try:
            t.write_eof()
        except (OSError, RuntimeError):
            t.close()
            return
        assert self._loop is not None
        self._linger_timer = self._loop.call_later(linger, t.close)

    def _flush(self) -> None:
        self._unflushed = 0
        data = self._h2.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing() and not self._lingering:
            self._transport.write(data)

    def _schedule_flush(self) -> None:
        """Flush at the end of this loop iteration.

        Frames produced by all the tasks that ran in this iteration (a response's HEADERS,
        DATA and trailers, WINDOW_UPDATEs from many reads) leave in one write: one system
        call instead of several, which is most of the per-request cost of a small request.
        """
        # A closed loop: a response body garbage-collected at interpreter exit; nothing to send.
        if not self._flush_scheduled and self._loop is not None and not self._loop.is_closed():
            self._flush_scheduled = True
            self._loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self._flush()

    def _ack(self, stream_id: int, n: int) -> None:
        if self._lost:
            return
        try:
            self._h2.acknowledge_received_data(n, stream_id)
        except h2.exceptions.ProtocolError:
            return
        self._schedule_flush()

    def _reset_stream(self, stream_id: int, code: int) -> None:
        """RST_STREAM unless the stream is already closed (then there is nothing to do)."""
        if self._lost:
            return
        try:
            self._h2.reset_stream(stream_id, error_code=code)
        except h2.exceptions.ProtocolError:  # includes StreamClosedError
            return
        self._schedule_flush()
        self._wake_window(stream_id)

    def _wake_window(self, stream_id: int | None) -> None:
        if stream_id is None or stream_id == 0:
            waiters = list(self._window_waiters.values())
            self._window_waiters.clear()
        else:
            w = self._window_waiters.pop(stream_id, None)
            waiters = [w] if w is not None else []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def _send_data_now(self, stream_id: int, data: bytes, *, end_stream: bool) -> bool:
        """Send ``data`` (END_STREAM too, if asked) in one DATA frame if that needs no wait.

        False, with nothing sent, when the peer's window or frame size is too small or the
        transport is above its high-water mark: the caller then takes ``_send_data``.
        Raises ``StreamClosedError`` if the stream or connection died.
        """
        if self._lost:
            raise StreamClosedError(f"{self._name}: connection lost")
        if not self._writable.is_set():
            return False
        h2conn = self._h2
        try:
            if (
                len(data) > h2conn.local_flow_control_window(stream_id)
                or len(data) > h2conn.max_outbound_frame_size
            ):
                return False
            h2conn.send_data(stream_id, data, end_stream=end_stream)
        except h2.exceptions.ProtocolError as exc:  # StreamClosedError included
            raise StreamClosedError(f"{self._name}: stream {stream_id} closed: {exc}") from None
        self._unflushed += len(data)
        if self._unflushed >= _FLUSH_AT:
            self._flush()
        else:
            self._schedule_flush()
        return True

    async def _send_data(self, stream_id: int, data: bytes) -> None:
        """Send ``data`` on ``stream_id`` within the peer's flow-control window.

        Returns once everything was handed to the transport and the transport is below
        its high-water mark. Raises ``StreamClosedError`` if the stream or connection died.
        """
        view = memoryview(data)
        while view:
            if self._lost:
                raise StreamClosedError(f"{self._name}: connection lost")
            try:
                window = self._h2.local_flow_control_window(stream_id)
                if window <= 0:
                    self._flush()
                    fut = self._window_waiters.get(stream_id)
                    if fut is None or fut.done():
                        assert self._loop is not None
                        fut = self._loop.create_future()
                        self._window_waiters[stream_id] = fut
                    await fut
                    continue
                size = min(window, self._h2.max_outbound_frame_size, len(view))
                # The whole chunk in one frame is the common case: send it without a copy.
                chunk = data if size == len(data) else view[:size].tobytes()
                self._h2.send_data(stream_id, chunk)
            except h2.exceptions.ProtocolError as exc:  # StreamClosedError included
                raise StreamClosedError(f"{self._name}: stream {stream_id} closed: {exc}") from None
            view = view[size:]
        self._unflushed += len(data)
        if self._unflushed >= _FLUSH_AT:
            self._flush()
        else:
            self._schedule_flush()
        if not self._writable.is_set():
            await self._writable.wait()
            if self._lost:
                raise StreamClosedError(f"{self._name}: connection lost")
