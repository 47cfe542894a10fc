"""OTLP/HTTP (binary protobuf) span export on the proxy's event loop: ``POST`` over HTTP/1.1.

Owns: ``OtlpHttpClient``, a client for the one OTLP/HTTP request, ``ExportTraceServiceRequest``
to the traces endpoint, on a plaintext keep-alive HTTP/1.1 connection (``httptools``, the
same llhttp parser the proxy uses, reads the answers).

Why: this is the cheapest way to get spans out of a Python sidecar. One export is a request
head, the body and a small answer: in-process 55-85 us of user CPU on the loop against
350-410 us for the same request over OTLP/gRPC, where the ``h2`` state machine and HPACK run
in Python (docs/performance.md, round 5). The sidecar's loop serves requests between the slices of a
large body. TLS (``https://``) and compression are the OpenTelemetry SDK exporter's job:
``exporters.build`` chooses that one for them.

Protocol, as the OTLP specification defines OTLP/HTTP:
  * request: ``POST <path of the endpoint, "/" if it has none>``, ``Content-Type:
    application/x-protobuf``, ``Content-Length``, ``Host``, ``User-Agent``, the configured
    headers (``OTEL_EXPORTER_OTLP_[TRACES_]HEADERS``; the ones this client sets itself are
    not overridden); body: the request, uncompressed.
  * success: any 2xx. A ``partial_success`` in the answer (spans the collector rejected) is
    logged with the collector's message; the batch counts as exported.
  * retry, while the export's deadline allows: 429, 502, 503 and 504, and a refused, reset
    or timed-out connection; after ``Retry-After`` seconds when the collector says so,
    otherwise 1 s, 2 s, 4 s ... (x0.8-1.2 jitter). Any other answer fails the batch, logged
    with the ``google.rpc.Status`` message the collector sent (or its text).

Invariants: one request at a time per connection (the queue's task awaits each export); the
connection is kept alive unless the collector closes it, and made anew after any failure;
an answer the parser refuses, or one nobody asked for, closes the connection.

Concurrency: everything runs on the event-loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import cast
from urllib.parse import urlsplit

import httptools

from meshproxy import __version__
from meshproxy.telemetry.otlp_loop import SLICE, ExportError, LoopClient, connect

log = logging.getLogger(__name__)

RETRYABLE = frozenset({429, 502, 503, 504})
_OWN_HEADERS = frozenset(
    {"host", "content-type", "content-length", "transfer-encoding", "connection", "user-agent"}
)
_MAX_BODY = 64 * 1024  # of an answer kept to read its message; the rest is parsed and dropped


class _Answer:
    __slots__ = ("body", "done", "headers", "keep_alive", "status")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.keep_alive = True
        self.done: asyncio.Future[str | None] = loop.create_future()  # an error text, or None


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to the collector; at most one answer awaited."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.answer: _Answer | None = None
        self.error: str | None = None
        self.writable = asyncio.Event()
        self.writable.set()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports quack alike

    def data_received(self, data: bytes) -> None:
        if self.answer is None:
            self._fail("the collector sent bytes no request asked for")
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(f"malformed HTTP answer from the collector: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"connection lost: {exc}" if exc else "connection closed by the collector")

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.answer is not None:
            self.answer.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        answer = self.answer
        if answer is not None and len(answer.body) < _MAX_BODY:
            answer.body += body[: _MAX_BODY - len(answer.body)]

    def on_message_complete(self) -> None:
        answer, self.answer = self.answer, None
        if answer is not None:
            answer.status = self.parser.get_status_code()
            answer.keep_alive = self.parser.should_keep_alive()
            if not answer.done.done():
                answer.done.set_result(None)

    # the client's side

    def expect(self) -> _Answer:
        self.answer = _Answer(asyncio.get_running_loop())
        return self.answer

    def _fail(self, why: str) -> None:
        self.error = self.error or why
        answer, self.answer = self.answer, None
        if answer is not None and not answer.done.done():
            answer.done.set_result(why)
        self.writable.set()
        if self.transport is not None:
            self.transport.close()


class OtlpHttpClient(LoopClient):
    """Sends serialized ``ExportTraceServiceRequest``s to one collector (see module doc)."""

    kind = "OTLP/HTTP"

    def __init__(
        self,
        endpoint: str,
        *,
        timeout: float,
        headers: Sequence[tuple[str, str]] = (),
        backoff: Callable[[int], float] | None = None,
    ) -> None:
        super().__init__(timeout=timeout, headers=tuple(headers), backoff=backoff)
        url = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"OTLP/HTTP endpoint {endpoint!r}: expected http://host[:port]/path")
        self.host = url.hostname
        self.port = url.port or 80
        self.authority = url.netloc
        self.path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        lines = [
            f"POST {self.path} HTTP/1.1",
            f"host: {self.authority}",
            "content-type: application/x-protobuf",
            f"user-agent: meshproxy-otlp-http/{__version__}",
            *(f"{k}: {v}" for k, v in self.headers if k not in _OWN_HEADERS),
            "content-length: ",
        ]
        self._head = "\r\n".join(lines).encode("latin-1", "replace")
        self._conn: _Connection | None = None

    async def _connection(self, deadline: float) -> _Connection:
        conn = self._conn
        if conn is not None and conn.error is None:
            return conn
        conn = await connect(_Connection, self.host, self.port, self.authority, deadline)
        self._conn = conn
        return conn

    async def _call(self, payload: bytes, deadline: float) -> None:
        conn = await self._connection(deadline)
        assert conn.transport is not None
        answer = conn.expect()
        head = self._head + b"%d\r\n\r\n" % len(payload)
        try:
            async with asyncio.timeout(max(0.001, deadline - time.monotonic())):
                if len(payload) <= SLICE:
                    conn.transport.write(head + payload)
                else:
                    # A slice per loop iteration: requests that arrive meanwhile are served
                    # between the slices instead of after the whole body.
                    conn.transport.write(head)
                    body = memoryview(payload)
                    for at in range(0, len(body), SLICE):
                        await asyncio.sleep(0)
                        await conn.writable.wait()
                        if conn.error is not None:
                            break
                        conn.transport.write(body[at : at + SLICE])
                failure = await answer.done
        except TimeoutError as exc:
            self._drop(conn)
            raise ExportError(f"no answer from {self.authority} before the deadline", retryable=True) from exc
        if failure is not None:
            self._drop(conn)
            raise ExportError(failure, retryable=True)
        if not answer.keep_alive:
            self._drop(conn)
        if 200 <= answer.status < 300:
            _log_partial_success(self.authority, answer)
            return
        retry_after = answer.headers.get("retry-after", "").strip()
        raise ExportError(
            f"HTTP {answer.status} from {self.authority}{self.path}: {_message(answer)}",
            retryable=answer.status in RETRYABLE,
            retry_after=float(retry_after) if retry_after.isdigit() else None,
        )

    def _drop(self, conn: _Connection) -> None:
        if self._conn is conn:
            self._conn = None
        if conn.transport is not None:
            conn.transport.abort()

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and conn.transport is not None:
            conn.transport.close()


def _message(answer: _Answer) -> str:
    """What the collector said was wrong: its ``google.rpc.Status`` message, or its text."""
    body = bytes(answer.body)
    if answer.headers.get("content-type", "").startswith("application/x-protobuf"):
        # The protobuf runtime (~3 MB of RSS) loads only when a collector answers with a body.
        from google.protobuf.message import DecodeError
        from google.rpc.status_pb2 import Status

        with contextlib.suppress(DecodeError):
            return Status.FromString(body).message or "(no message)"
    return body[:200].decode("utf-8", "replace").strip() or "(no message)"


def _log_partial_success(authority: str, answer: _Answer) -> None:
    if not answer.body or not answer.headers.get("content-type", "").startswith("application/x-protobuf"):
        return
    from google.protobuf.message import DecodeError
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

    try:
        partial = ExportTraceServiceResponse.FromString(bytes(answer.body)).partial_success
    except DecodeError:
        return
    if partial.rejected_spans or partial.error_message:
        log.warning(
            "OTLP/HTTP collector %s rejected %d spans: %s",
            authority,
            partial.rejected_spans,
            partial.error_message or "(no message)",
        )
