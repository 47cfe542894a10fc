"""Body streams shared by the HTTP codecs and the pipeline.

Owns: the bounded chunk queue a codec fills from its protocol callbacks
(``BodyQueue``), the shared body of bodyless requests (``EMPTY``), fixed bodies
for local replies (``BytesBody``), the replay
buffer that makes a request body retryable (``ReplayBuffer``), and the optional
``KnownLength``/``Detachable`` capabilities the codecs look for.

Invariants:
  * ``BodyQueue`` holds at most about ``high_water`` bytes plus one read chunk: above
    the mark it calls ``pause`` (the codec stops reading its socket) and below the
    low-water mark it calls ``resume``. Nothing in here grows without bound.
  * ``ReplayBuffer`` keeps at most ``limit`` bytes; once a body is longer it stops
    keeping chunks and is no longer replayable (``replayable`` turns False), so a
    large upload streams through with constant memory and is simply not retried.
  * A stream ends with ``b""``; a failed stream raises the stored error from ``read``.

Concurrency: one reader task per stream; the writer is the event loop's protocol
callbacks (synchronous ``feed*`` methods), so no locks are needed.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Protocol, cast

from mypy_extensions import mypyc_attr

from meshproxy.core.errors import ProxyError
from meshproxy.core.http import Headers
from meshproxy.io.exchange import BodyStream


@mypyc_attr(native_class=False)  # an exception: see meshproxy.compiled
class DownstreamClosedError(ProxyError):
    """The downstream client went away (reset or EOF) before the exchange finished."""

    flag = "DC"


class KnownLength(Protocol):
    """A body that knows its size before it is read: ``0`` empty, ``None`` unknown (chunked)."""

    @property
    def content_length(self) -> int | None: ...


class Detachable(Protocol):
    """A codec endpoint that can hand its raw transport over (after 101 / CONNECT 2xx)."""

    def detach(self) -> tuple[asyncio.Transport, bytes]:
        """Stop the codec; return its transport (paused for reading) and bytes read past the head."""
        ...


def detachable(endpoint: object) -> Detachable | None:
    """``endpoint`` when it can hand its transport over, else None.

    A capability check by attribute, not ``isinstance`` on a runtime-checkable Protocol:
    compiled modules (``meshproxy.compiled``) cannot define those, and it is cheaper."""
    return cast("Detachable", endpoint) if callable(getattr(endpoint, "detach", None)) else None


def known_length(body: object) -> int | None:
    """The ``content_length`` of a body that knows it, else None.

    ``isinstance(body, KnownLength)`` on a runtime-checkable Protocol costs tens of
    microseconds; this is on the per-request path, so a plain attribute read is used.
    """
    value = getattr(body, "content_length", None)
    return value if isinstance(value, int) else None


def _noop() -> None:
    return None


class BodyQueue:
    """A ``BodyStream`` fed by protocol callbacks, with pause/resume flow control."""

    # One or two per request: slots make it smaller and quicker to build.
    __slots__ = (
        "_chunks",
        "_content_length",
        "_ended",
        "_error",
        "_high",
        "_loop",
        "_low",
        "_on_first_read",
        "_pause",
        "_paused",
        "_resume",
        "_size",
        "_trailers",
        "_waiter",
        "received",
    )

    def __init__(
        self,
        *,
        high_water: int = 64 * 1024,
        pause: Callable[[], None] = _noop,
        resume: Callable[[], None] = _noop,
        content_length: int | None = None,
        on_first_read: Callable[[], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._loop = loop  # the codec's loop, if it knows it (saves a lookup per wait)
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._high = high_water
        self._low = high_water // 4
        self._pause = pause
        self._resume = resume
        self._paused = False
        self._ended = False
        self._error: BaseException | None = None
        self._trailers: Headers | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._content_length = content_length
        self._on_first_read = on_first_read
        self.received = 0  # bytes fed so far

    @property
    def content_length(self) -> int | None:
        return self._content_length

    @property
    def trailers(self) -> Headers | None:
        return self._trailers

    @property
    def complete(self) -> bool:
        """The whole body arrived (it may not all have been read yet)."""
        return self._ended

    def detach_flow_control(self) -> None:
        """Stop calling pause/resume (the transport was handed to someone else)."""
        self._pause = _noop
        self._resume = _noop

    # -- writer side (protocol callbacks) --

    def feed(self, data: bytes) -> None:
        if self._ended or self._error is not None or not data:
            return
        self._chunks.append(data)
        self._size += len(data)
        self.received += len(data)
        if self._size > self._high and not self._paused:
            self._paused = True
            self._pause()
        self._wake()

    def feed_end(self, trailers: Headers | None = None) -> None:
        if self._ended or self._error is not None:
            return
        self._ended = True
        self._trailers = trailers or None
        self._wake()

    def feed_error(self, error: BaseException) -> None:
        if self._ended or self._error is not None:
            return
        self._error = error
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- reader side --

    def take_complete(self) -> bytes | None:
        """Everything still queued, in one piece, once the body has ended without error.

        None while more may come (or after an error, or before an ``on_first_read`` hook
        ran): the caller then reads chunk by chunk. After a take, ``read`` returns ``b""``
        and ``trailers`` are as usual. Lets the pipeline forward a small response that
        arrived whole without a coroutine and a write per chunk."""
        if not self._ended or self._on_first_read is not None:
            return None
        chunks = self._chunks
        if not chunks:
            data = b""
        elif len(chunks) == 1:
            data = chunks.popleft()
        else:
            data = b"".join(chunks)
            chunks.clear()
        self._size = 0
        if self._paused:
            self._paused = False
            self._resume()
        return data

    async def read(self) -> bytes:
        if self._on_first_read is not None:
            cb, self._on_first_read = self._on_first_read, None
            cb()
        while True:
            if self._chunks:
                data = self._chunks.popleft()
                self._size -= len(data)
                if self._paused and self._size <= self._low:
                    self._paused = False
                    self._resume()
                return data
            if self._error is not None:
                raise self._error
            if self._ended:
                return b""
            self._waiter = (self._loop or asyncio.get_running_loop()).create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None


class EmptyBody:
    """The body of a request framed with no body (no content-length, or 0, and not chunked).

    Behaves as a ``BodyQueue`` that has already ended: ``read`` returns ``b""``, the feed
    methods do nothing. Stateless, so the HTTP/1 codec shares one (``EMPTY``) instead of
    building a queue and its flow-control callbacks for every GET."""

    __slots__ = ()

    content_length = 0
    trailers = None
    complete = True
    received = 0

    async def read(self) -> bytes:
        return b""

    def take_complete(self) -> bytes:
        return b""

    def feed(self, data: bytes) -> None:
        return None

    def feed_end(self, trailers: Headers | None = None) -> None:
        return None

    def feed_error(self, error: BaseException) -> None:
        return None

    def detach_flow_control(self) -> None:
        return None


EMPTY = EmptyBody()


class BytesBody:
    """A fixed body (local replies, tests)."""

    def __init__(self, data: bytes = b"", trailers: Headers | None = None) -> None:
        self._data = data
        self._done = False
        self._trailers = trailers

    @property
    def content_length(self) -> int | None:
        return len(self._data)

    @property
    def trailers(self) -> Headers | None:
        return self._trailers if self._done else None

    async def read(self) -> bytes:
        if self._done:
            return b""
        self._done = True
        return self._data


@mypyc_attr(native_class=False)  # an exception: see meshproxy.compiled
class NotReplayableError(ProxyError):
    """A retry needed a request body that was too large to keep."""

    flag = "URX"


class ReplayBuffer:
    """Makes a request body readable more than once while it stays under ``limit`` bytes.

    Each try calls ``stream()`` and reads from the start: first the kept chunks, then
    (reading on) the source. Tries are sequential, never concurrent.
    """

    def __init__(self, source: BodyStream, limit: int) -> None:
        self._source = source
        self._limit = limit
        self._kept: list[bytes] = []
        self._kept_size = 0
        self._overflowed = False
        self._source_done = False
        self._streams = 0

    @property
    def replayable(self) -> bool:
        return not self._overflowed

    @property
    def trailers(self) -> Headers | None:
        return self._source.trailers

    @property
    def content_length(self) -> int | None:
        return known_length(self._source)

    def stream(self) -> _ReplayStream:
        if self._streams > 0 and self._overflowed:
            raise NotReplayableError(f"request body larger than {self._limit} bytes cannot be replayed")
        self._streams += 1
        return _ReplayStream(self, self._streams)

    async def _read_at(self, index: int, generation: int) -> tuple[bytes, int]:
        if generation != self._streams:
            raise NotReplayableError("an older try's body stream was read after a newer try started")
        if index < len(self._kept) and not self._overflowed:
            return self._kept[index], index + 1
        if self._source_done:
            return b"", index
        data = await self._source.read()
        if not data:
            self._source_done = True
            return b"", index
        if not self._overflowed:
            self._kept_size += len(data)
            if self._kept_size > self._limit:
                self._overflowed = True
                self._kept.clear()
            else:
                self._kept.append(data)
        return data, index + 1

    def _take_at(self, index: int, generation: int) -> tuple[bytes, int] | None:
        """Everything from chunk ``index`` on, in one piece, if the source has all arrived
        (its ``take_complete``); None when it has not, or cannot say: read chunk by chunk."""
        if generation != self._streams or self._overflowed:
            return None
        if not self._source_done:
            take = getattr(self._source, "take_complete", None)
            data: bytes | None = take() if take is not None else None
            if data is None:
                return None
            self._source_done = True  # the source's read returns b"" from now on
            if data:
                self._kept_size += len(data)
                if self._kept_size > self._limit:
                    # Too large to keep for another try; this one still sends all of it.
                    rest = b"".join([*self._kept[index:], data])
                    self._overflowed = True
                    self._kept.clear()
                    return rest, index
                self._kept.append(data)
        kept = self._kept
        rest = kept[index] if len(kept) == index + 1 else b"".join(kept[index:])
        return rest, len(kept)


class _ReplayStream:
    def __init__(self, buffer: ReplayBuffer, generation: int) -> None:
        self._buffer = buffer
        self._generation = generation
        self._index = 0

    @property
    def content_length(self) -> int | None:
        return self._buffer.content_length

    @property
    def trailers(self) -> Headers | None:
        return self._buffer.trailers

    def take_complete(self) -> bytes | None:
        """The rest of this try's body in one piece once the source has all arrived, else None."""
        taken = self._buffer._take_at(self._index, self._generation)
        if taken is None:
            return None
        data, self._index = taken
        return data

    async def read(self) -> bytes:
        data, self._index = await self._buffer._read_at(self._index, self._generation)
        return data
