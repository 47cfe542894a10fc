"""OTLP span export on the proxy's event loop: what the gRPC and the HTTP client share.

Owns: ``ExportError`` (one failed attempt, and whether it may be retried), ``parse_headers``
(``OTEL_EXPORTER_OTLP_[TRACES_]HEADERS``), ``LoopClient`` (the retry loop with jittered
exponential backoff and ``Retry-After``, bounded by the export's deadline; a transport
implements one attempt, ``_call``), ``QueueBounds`` and ``SpanBatches`` (the bounds, batching and counting every
export queue shares) and ``AsyncExportQueue`` (the bounded span queue a task drains through a
``LoopClient``). The transports are ``otlp_grpc.OtlpGrpcClient`` and
``otlp_http.OtlpHttpClient``.

Why on the loop: the sidecar encodes spans on its loop already (``otlp_wire``); sending a
request of ~0.1 MB a few times a second needs no thread, and a thread would compete with
the loop for the GIL. Nothing here blocks the loop; large bodies are written in slices with
the loop's other work between them.

Invariants: at most one export in flight per client (the queue's task awaits it); a client
whose attempt failed at the transport drops its connection and opens a new one; an export
never outlives ``timeout`` (connect, send, answer and backoff pauses included).

Concurrency: everything runs on the event-loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar
from urllib.parse import unquote

from mypy_extensions import mypyc_attr

log = logging.getLogger(__name__)

SLICE = 16 * 1024  # bytes of a large request written per loop iteration
T = TypeVar("T")
P = TypeVar("P", bound=asyncio.Protocol)


@mypyc_attr(native_class=False)  # an exception: see meshproxy.compiled
class ExportError(Exception):
    """One export attempt failed. ``retryable``: the OTLP rules allow another attempt;
    ``retry_after``: seconds the collector asked to wait (``Retry-After``), if it did."""

    def __init__(self, message: str, *, retryable: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


def parse_headers(raw: str | None) -> tuple[tuple[str, str], ...]:
    """``OTEL_EXPORTER_OTLP_HEADERS``: ``k1=v1,k2=v2``, values URL-encoded. Entries that are
    malformed, or whose name or value could not travel as one header line, are skipped with a
    warning naming them."""
    out: list[tuple[str, str]] = []
    for item in (raw or "").split(","):
        key, sep, value = item.partition("=")
        key, value = key.strip().lower(), unquote(value.strip())
        if sep and key and not key.startswith(":") and _header_safe(key, value):
            out.append((key, value))
        elif item.strip():
            log.warning("ignoring malformed OTLP header entry %r", item.strip())
    return tuple(out)


def _header_safe(name: str, value: str) -> bool:
    # RFC 9110 token for the name; no control characters (CR, LF, NUL...) in the value.
    return all(c.isascii() and (c.isalnum() or c in "!#$%&'*+-.^_`|~") for c in name) and all(
        c == "\t" or (c >= " " and c != "\x7f") for c in value
    )


async def connect(factory: Callable[[], P], host: str, port: int, authority: str, deadline: float) -> P:
    """A new connection to the collector before ``deadline``; a refusal or a timeout is a
    retryable ``ExportError`` (the OTLP specifications treat both as UNAVAILABLE)."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(max(0.001, deadline - time.monotonic())):
            _, proto = await loop.create_connection(factory, host, port)
    except (OSError, TimeoutError) as exc:
        raise ExportError(f"cannot connect to {authority}: {exc}", retryable=True) from exc
    return proto


def default_backoff(attempt: int) -> float:
    """1 s, 2 s, 4 s ... with 0.8-1.2 jitter, as the OpenTelemetry exporters wait."""
    return float(2**attempt) * random.uniform(0.8, 1.2)


class LoopClient:
    """Sends serialized ``ExportTraceServiceRequest``s to one collector, retrying what the OTLP
    specification calls transient until the export's deadline. Subclasses do one attempt."""

    kind = "OTLP"

    def __init__(
        self, *, timeout: float, headers: tuple[tuple[str, str], ...], backoff: Callable[[int], float] | None
    ) -> None:
        self.timeout = timeout
        self.headers = headers
        self._backoff = backoff or default_backoff
        self.authority = ""

    async def _call(self, payload: bytes, deadline: float) -> None:
        """One attempt; raises ``ExportError`` unless the collector accepted the request."""
        raise NotImplementedError

    async def export(self, payload: bytes) -> bool:
        """Send one request; retry transient failures until ``timeout``. True if accepted."""
        deadline = time.monotonic() + self.timeout
        attempt = 0
        while True:
            try:
                await self._call(payload, deadline)
                return True
            except ExportError as exc:
                pause = exc.retry_after if exc.retry_after is not None else self._backoff(attempt)
                attempt += 1
                if not exc.retryable or time.monotonic() + pause >= deadline:
                    log.warning("%s export to %s failed: %s", self.kind, self.authority, exc)
                    return False
                log.debug("%s export to %s: %s; retrying in %.1fs", self.kind, self.authority, exc, pause)
            # Not inside the handler: compiled, its exception would be every other task's
            # sys.exc_info() while this waits (see meshproxy.compiled).
            await asyncio.sleep(pause)

    async def aclose(self) -> None:
        """Close the connection (an export in flight fails)."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class QueueBounds:
    """How one export queue batches and where its losses are counted."""

    max_queue_size: int
    batch: int  # spans per export request
    delay: float  # seconds a partial batch waits
    on_full: Callable[[int], None]  # spans refused because the queue was full
    on_failed: Callable[[int], None]  # spans whose export failed


class SpanBatches(Generic[T]):
    """What every export queue shares: at most ``max_queue_size`` items, taken ``batch`` at a
    time, a partial batch after ``delay`` seconds; each loss counted once, by its cause."""

    def __init__(self, name: str, bounds: QueueBounds) -> None:
        self.name = name
        self._max = max(1, bounds.max_queue_size)
        self._batch = max(1, min(bounds.batch, self._max))
        self._delay = bounds.delay
        self._on_full = bounds.on_full
        self._on_failed = bounds.on_failed
        self._queue: deque[T] = deque()
        self.exported = 0  # items the exporter accepted (read by tests and the admin page)

    @property
    def batch(self) -> int:
        """Spans per export request."""
        return self._batch

    @property
    def delay(self) -> float:
        """Seconds a partial batch waits before it is exported anyway."""
        return self._delay

    def _has_batch(self, everything: bool) -> bool:
        """A full batch waits, or (``everything``) anything at all."""
        return len(self._queue) >= self._batch or (everything and bool(self._queue))

    def _take(self) -> list[T]:
        queue = self._queue
        return [queue.popleft() for _ in range(min(len(queue), self._batch))]

    def _settle(self, n: int, ok: bool) -> None:
        if ok:
            self.exported += n
        else:
            self._on_failed(n)


class AsyncExportQueue(SpanBatches[bytes]):
    """The event-loop twin of ``tracing.ExportQueue``: same bounds, same counting, no thread.

    ``offer`` starts the draining task on first use (the queue may be built before the loop
    runs); the task exports a batch when ``batch`` spans wait or ``delay`` seconds passed."""

    def __init__(
        self, name: str, client: LoopClient, request: Callable[[list[bytes]], bytes], bounds: QueueBounds
    ) -> None:
        super().__init__(name, bounds)
        self.client = client
        self._request = request
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._idle: asyncio.Event | None = None
        self._closing = False
        self._flushing = False

    def offer(self, item: bytes) -> None:
        queue = self._queue
        if len(queue) >= self._max or self._closing:
            self._on_full(1)
            return
        queue.append(item)
        if self._task is None:
            self._start()
        elif len(queue) >= self._batch:
            assert self._wake is not None
            self._wake.set()

    def _start(self) -> None:
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"meshproxy-export-{self.name}")

    async def _run(self) -> None:
        assert self._wake is not None and self._idle is not None
        while True:
            if not self._queue:
                self._idle.set()
            ticked = False
            try:
                async with asyncio.timeout(self._delay):
                    await self._wake.wait()
            except TimeoutError:
                ticked = True
            self._wake.clear()
            self._idle.clear()
            # Full batches go at once; a partial one waits for the timer (or a flush/close).
            # Draining "whatever is there" after each export made one small export per round
            # trip under steady load (~30 spans each when the collector took ~30 ms).
            await self._drain(everything=ticked or self._closing or self._flushing)
            self._flushing = False
            if self._closing and not self._queue:
                self._idle.set()
                return

    async def _drain(self, *, everything: bool) -> None:
        while self._has_batch(everything):
            batch = self._take()
            try:
                ok = await self.client.export(self._request(batch))
            except Exception:
                log.warning("OTLP export %s raised; dropping %d spans", self.name, len(batch), exc_info=True)
                ok = False
            self._settle(len(batch), ok)

    async def flush(self) -> None:
        """Export everything queued so far (awaitable; the loop keeps serving meanwhile)."""
        if self._task is None or self._task.done():
            return
        assert self._wake is not None and self._idle is not None
        self._idle.clear()
        self._flushing = True
        self._wake.set()
        await self._idle.wait()

    async def aclose(self, grace: float) -> None:
        """Export what is queued (within ``grace`` seconds), then stop and close the connection."""
        self._closing = True
        task = self._task
        if task is not None and not task.done():
            assert self._wake is not None
            self._wake.set()
            timed_out = False
            try:
                async with asyncio.timeout(grace):
                    await asyncio.shield(task)
            except TimeoutError:
                timed_out = True
            if timed_out:  # awaited outside the handler (see export)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                if self._queue:
                    self._on_failed(len(self._queue))
                    self._queue.clear()
        await self.client.aclose()

    def __repr__(self) -> str:
        return f"AsyncExportQueue({self.name!r}, queued={len(self._queue)})"
