"""OTLP/gRPC span export on the proxy's event loop: one unary call, ``TraceService/Export``, over h2c.

Owns: ``OtlpGrpcClient``, a client for exactly one gRPC method on a plaintext HTTP/2
connection (the ``h2`` library does the framing, flow control and HPACK), with the OTLP
exporter's retry rules. The retry loop and the span queue are ``otlp_loop``'s.

Why not grpcio here: the sidecar already runs an event loop and encodes spans on it
(``otlp_wire``), and sending one request of ~70 KB a few times a second needs no thread.
The grpcio exporter instead brings gRPC's C core (~14 MB of RSS with the OpenTelemetry
exporter module, its own threads) and a worker thread that competes with the event loop for
the GIL. With this client a sidecar exporting traces stays near its telemetry-off RSS and
has no thread at all. TLS (``https://`` endpoints), compression and credential plug-ins are
the OpenTelemetry SDK exporter's job: ``exporters.build`` chooses that one for them.
Cost: ``h2`` and HPACK run in Python, ~350-410 us of CPU per export in-process; OTLP/HTTP
(``otlp_http``, the chart's default) costs a fifth of that.

Protocol, as the OTLP specification and gRPC over HTTP/2 define it:
  * request: ``POST /opentelemetry.proto.collector.trace.v1.TraceService/Export``,
    ``content-type: application/grpc``, ``te: trailers``, ``grpc-timeout``, the configured
    headers; body: one length-prefixed message (flag 0, 4-byte big-endian length).
  * success: HTTP 200 and ``grpc-status: 0`` (in trailers, or in a trailers-only response).
  * retry, with exponential backoff (1 s, 2 s, 4 s ... x0.8-1.2 jitter) while the export's
    deadline allows: codes CANCELLED, DEADLINE_EXCEEDED, ABORTED, OUT_OF_RANGE, UNAVAILABLE,
    DATA_LOSS, RESOURCE_EXHAUSTED; a refused or lost connection counts as UNAVAILABLE (the
    connection is made anew). Any other outcome fails the batch (counted as dropped).

Invariants: at most one export in flight per client (the queue's task awaits it); the
connection is opened lazily and re-opened after any failure; nothing here blocks the loop.

Concurrency: everything runs on the event-loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import cast
from urllib.parse import unquote

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

from meshproxy.telemetry.otlp_loop import ExportError, LoopClient, connect

log = logging.getLogger(__name__)

PATH = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
# OTLP/gRPC: the codes worth retrying (RESOURCE_EXHAUSTED only when the server says so, but a
# collector under memory pressure answers it for exactly that reason, so it is retried too).
RETRYABLE = frozenset({1, 4, 8, 10, 11, 14, 15})
UNAVAILABLE = 14
_WINDOW = 1 << 20  # our receive window: responses are tiny, this only avoids updates


def _grpc_error(code: int, message: str) -> ExportError:
    return ExportError(f"grpc-status {code}: {message}", retryable=code in RETRYABLE)


class _Protocol(asyncio.Protocol):
    """One h2c connection to the collector; routes h2 events to the streams waiting on them."""

    def __init__(self, authority: str) -> None:
        self.authority = authority
        # The request's headers are built here, already lower-case and valid, and the only
        # headers read back are :status and grpc-*: h2's checks of both cost about a tenth of an export.
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding="utf-8",
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
            normalize_inbound_headers=False,
        )
        self.conn = h2.connection.H2Connection(config)
        self.transport: asyncio.Transport | None = None
        self.window_opened: asyncio.Event = asyncio.Event()
        self.responses: dict[int, _Response] = {}
        self.error: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        self.conn.initiate_connection()
        self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _WINDOW})
        self.conn.increment_flow_control_window(_WINDOW)
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._fail(f"HTTP/2 protocol error from the collector: {exc}")
            return
        for event in events:
            if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                r = self.responses.get(event.stream_id)
                if r is not None:
                    r.headers.update(dict(event.headers))  # type: ignore[arg-type]
            elif isinstance(event, h2.events.DataReceived):
                # The response message is read only for its size; the window is given back.
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                r = self.responses.pop(event.stream_id, None)
                if r is not None and not r.done.done():
                    reset = isinstance(event, h2.events.StreamReset)
                    r.done.set_result("stream reset by the collector" if reset else None)
            elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                self.window_opened.set()
            elif isinstance(event, h2.events.ConnectionTerminated):
                self._fail(f"collector closed the connection (GOAWAY, error {event.error_code})")
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"connection lost: {exc}" if exc else "connection closed by the collector")

    def _fail(self, why: str) -> None:
        self.error = self.error or why
        for r in self.responses.values():
            if not r.done.done():
                r.done.set_result(why)
        self.responses.clear()
        self.window_opened.set()
        if self.transport is not None:
            self.transport.close()


class _Response:
    __slots__ = ("done", "headers")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.headers: dict[str, str] = {}
        self.done: asyncio.Future[str | None] = loop.create_future()  # an error text, or None


class OtlpGrpcClient(LoopClient):
    """Sends serialized ``ExportTraceServiceRequest``s to one collector (see module doc)."""

    kind = "OTLP/gRPC"

    def __init__(
        self,
        endpoint: str,
        *,
        timeout: float,
        headers: Sequence[tuple[str, str]] = (),
        backoff: Callable[[int], float] | None = None,
    ) -> None:
        super().__init__(timeout=timeout, headers=tuple(headers), backoff=backoff)
        target = endpoint.split("://", 1)[1] if "://" in endpoint else endpoint
        target = target.split("/", 1)[0]
        host, _, port = target.rpartition(":")
        if not host or not port.isdigit():
            host, port = target, "4317"
        self.host = host.strip("[]")
        self.port = int(port)
        self.authority = target if ":" in target else f"{target}:{port}"
        self._proto: _Protocol | None = None

    async def _connection(self, deadline: float) -> _Protocol:
        proto = self._proto
        if proto is not None and proto.error is None:
            return proto
        proto = await connect(
            lambda: _Protocol(self.authority), self.host, self.port, self.authority, deadline
        )
        self._proto = proto
        return proto

    async def _call(self, payload: bytes, deadline: float) -> None:
        proto = await self._connection(deadline)
        conn = proto.conn
        loop = asyncio.get_running_loop()
        remaining_ms = max(1, int((deadline - time.monotonic()) * 1000))
        try:
            stream_id = conn.get_next_available_stream_id()
            response = proto.responses[stream_id] = _Response(loop)
            conn.send_headers(
                stream_id,
                [
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":path", PATH),
                    (":authority", self.authority),
                    ("content-type", "application/grpc"),
                    ("te", "trailers"),
                    ("grpc-timeout", f"{remaining_ms}m"),
                    *self.headers,
                ],
            )
            body = memoryview(b"\x00" + len(payload).to_bytes(4, "big") + payload)
            while body:
                size = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size, len(body))
                if size <= 0:
                    proto.window_opened.clear()
                    proto.flush()
                    async with asyncio.timeout(max(0.001, deadline - time.monotonic())):
                        await proto.window_opened.wait()
                    if proto.error is not None:
                        raise _grpc_error(UNAVAILABLE, proto.error)
                    continue
                last = size == len(body)  # END_STREAM on the last DATA frame: no empty frame
                conn.send_data(stream_id, body[:size].tobytes(), end_stream=last)
                body = body[size:]
                if body:
                    # One frame per loop iteration: requests waiting behind a large export
                    # are served between its frames instead of after all of them.
                    proto.flush()
                    await asyncio.sleep(0)
            proto.flush()
            async with asyncio.timeout(max(0.001, deadline - time.monotonic())):
                failure = await response.done
        except TimeoutError as exc:
            self._drop(proto)
            raise _grpc_error(4, f"no answer from {self.authority} before the deadline") from exc
        except h2.exceptions.H2Error as exc:  # e.g. the connection was closed under us
            self._drop(proto)
            raise _grpc_error(UNAVAILABLE, f"HTTP/2 error: {exc}") from exc
        if failure is not None:
            self._drop(proto)
            raise _grpc_error(UNAVAILABLE, failure)
        status = response.headers.get(":status")
        if status != "200":
            # gRPC maps HTTP statuses it did not expect: 503/502/504/429 to UNAVAILABLE.
            code = UNAVAILABLE if status in ("429", "502", "503", "504") else 2
            raise _grpc_error(code, f"HTTP status {status} from {self.authority}")
        code_text = response.headers.get("grpc-status", "2")
        code = int(code_text) if code_text.isdigit() else 2
        if code != 0:
            raise _grpc_error(code, unquote(response.headers.get("grpc-message", "")))

    def _drop(self, proto: _Protocol) -> None:
        if self._proto is proto:
            self._proto = None
        if proto.transport is not None:
            proto.transport.abort()

    async def aclose(self) -> None:
        proto, self._proto = self._proto, None
        if proto is not None and proto.transport is not None:
            with contextlib.suppress(h2.exceptions.H2Error):
                proto.conn.close_connection()
                proto.flush()
            proto.transport.close()
