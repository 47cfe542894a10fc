"""JSON access log: one line per request (and per opaque TCP connection).

Owns: the record format and the writer that gets lines to stdout or a file
without ever blocking the event loop.

Invariants:
  * Fields mirror the span attributes (same names where one exists) plus
    ``trace_id``, ``span_id``, ``request_id``, ``duration_ms`` and ``flag``, so a
    log line, a span and an exemplar can be joined on ``trace_id``.
  * ``AccessLogMode.SAMPLED`` logs only requests whose trace is sampled; ``ON``
    logs every request; ``OFF`` builds nothing.
  * The queue between the event loop and the writer thread is bounded: when the
    sink cannot keep up (a full stdout pipe), lines are dropped and counted in
    ``meshproxy_access_log_dropped_total`` instead of stalling traffic.

Concurrency: ``log`` is called on the event-loop thread and only enqueues; one
daemon writer thread ("meshproxy-accesslog") serialises, writes and flushes.
``close`` stops it with a deadline.
"""

from __future__ import annotations

import contextlib
import json
import queue
import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

_STOP = object()


class AccessLog:
    """A bounded, non-blocking JSON-lines writer."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        max_queue: int = 8192,
        on_drop: Callable[[], None] | None = None,
    ) -> None:
        self._stream = stream if stream is not None else sys.stdout
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max_queue)
        self._on_drop = on_drop
        self._closed = False
        self._owns_stream = False
        self._thread = threading.Thread(target=self._run, name="meshproxy-accesslog", daemon=True)
        self._thread.start()

    @classmethod
    def open_file(cls, path: str, **kwargs: Any) -> AccessLog:
        # Line buffering keeps each record whole on disk even if we are killed.
        return cls(open(path, "a", buffering=1, encoding="utf-8"), **kwargs)

    def log(self, record: dict[str, Any]) -> None:
        """Enqueue one record (a flat dict of JSON scalars). Never blocks."""
        if self._closed:
            return
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            if self._on_drop is not None:
                self._on_drop()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                break
            try:
                self._stream.write(json.dumps(item, separators=(",", ":"), default=str) + "\n")
                if self._queue.empty():
                    # Flush when idle, not per line: a burst is written in one go.
                    self._stream.flush()
            except (OSError, ValueError):
                # A closed or broken stream: keep draining so callers never block.
                if self._on_drop is not None:
                    self._on_drop()
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()
            if self._owns_stream:
                self._stream.close()

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued (within ``timeout``) and stop the writer thread."""
        if self._closed:
            return
        self._closed = True
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)
