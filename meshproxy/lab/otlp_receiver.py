"""An in-process OTLP trace receiver (OTLP/gRPC and OTLP/HTTP) for tests and the demo.

Owns: one store of received spans fed by two listeners, a ``grpc.aio`` server implementing
OpenTelemetry's ``TraceService`` (the generated servicer from opentelemetry-proto) and a
small asyncio HTTP/1.1 server for OTLP/HTTP (``POST /v1/traces``, framed by ``h11``); an awaitable ``wait_for``
to synchronise tests on what arrived, and ``trace_tree`` to print one trace as an indented
tree of hops. Every span records the transport its batch came in on (``GRPC`` or ``HTTP``),
and ``batches`` counts batches per transport.

    receiver = OtlpReceiver()                 # 127.0.0.1, a free port for each transport
    await receiver.start()
    tracing = Tracing(otlp_http_endpoint=receiver.http_endpoint)   # or otlp_grpc_endpoint=receiver.endpoint
    ...
    spans = await receiver.wait_for(lambda spans: len(spans) >= 4, timeout=10)
    print(receiver.trace_tree(spans[0].trace_id))
    await receiver.stop()

``python -m meshproxy.lab.otlp_receiver --port 4317 --http-port 4318`` runs it stand-alone
and prints each trace's tree as it completes.

OTLP/HTTP, as the OTLP specification defines it (the parts a receiver needs):
  * ``POST /v1/traces`` with ``Content-Type: application/x-protobuf`` or ``application/json``
    (OTLP/JSON: trace and span ids in hex, enums as integers, unknown fields ignored), the
    body optionally ``Content-Encoding: gzip``; ``Content-Length`` or chunked.
  * 200 with an empty ``ExportTraceServiceResponse`` in the request's content type once the
    spans are in the store (so an exporter that saw 200 can be checked right away).
  * Errors carry a ``google.rpc.Status`` (JSON for a JSON request, protobuf otherwise):
    400 for a body that does not decode (or bad gzip), 404 for another path, 405 (with
    ``Allow: POST``) for another method, 413 above ``MAX_BODY`` (20 MiB, also after
    decompression), 415 for another content type or encoding.
  Connections are kept alive (HTTP/1.1) unless the client asks otherwise; a request that
  cannot be framed (bad head, bad chunk, too large) is answered and the connection closed.

Invariants:
  * At most ``max_spans`` spans are kept (oldest dropped first): memory is bounded, and so
    is every request (``MAX_BODY``) and request head (``MAX_HEAD``).
  * It listens where it is told (loopback by default), nothing else.

Concurrency: one asyncio loop; the servicer's ``Export`` and the HTTP connections run on
it, append spans and wake waiters through an ``asyncio.Condition``. The HTTP answer is pure
(``answer``); only ``_http_connection`` touches sockets.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import json
import logging
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Final

import grpc
import h11
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

log = logging.getLogger(__name__)

GRPC: Final = "OTLP/gRPC"
HTTP: Final = "OTLP/HTTP"
TRACES_PATH: Final = "/v1/traces"
PROTOBUF: Final = "application/x-protobuf"
JSON: Final = "application/json"
MAX_BODY: Final = 20 * 1024 * 1024  # the OTLP specification's recommended limit
MAX_HEAD: Final = 64 * 1024

_KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
_STATUS = {0: "UNSET", 1: "OK", 2: "ERROR"}


@dataclass(frozen=True, slots=True)
class ReceivedSpan:
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str  # "" for a root span
    name: str
    kind: str  # "SERVER", "CLIENT", ...
    service: str  # the resource's service.name
    start_ns: int
    end_ns: int
    status: str  # "UNSET", "OK", "ERROR"
    attributes: Mapping[str, Any] = field(default_factory=dict)
    resource: Mapping[str, Any] = field(default_factory=dict)
    transport: str = ""  # GRPC or HTTP: how its batch arrived ("" when made elsewhere)


def _value(v: Any) -> Any:
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, which)


def _attrs(kvs: Sequence[Any]) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


def spans_of(request: Any, transport: str) -> list[ReceivedSpan]:
    """The spans of one ``ExportTraceServiceRequest``, tagged with the transport it came over."""
    spans: list[ReceivedSpan] = []
    for rs in request.resource_spans:
        resource = _attrs(rs.resource.attributes)
        service = str(resource.get("service.name", ""))
        for ss in rs.scope_spans:
            for s in ss.spans:
                spans.append(
                    ReceivedSpan(
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(),
                        name=s.name,
                        kind=_KINDS.get(s.kind, str(s.kind)),
                        service=service,
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        status=_STATUS.get(s.status.code, str(s.status.code)),
                        attributes=_attrs(s.attributes),
                        resource=resource,
                        transport=transport,
                    )
                )
    return spans


class _Servicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    async def Export(self, request: Any, context: Any) -> Any:
        await self._receiver._add(spans_of(request, GRPC), GRPC)
        return trace_service_pb2.ExportTraceServiceResponse()


# --- OTLP/HTTP: the answer to one request (pure) -------------------------------------------


class HttpError(Exception):
    """A request the receiver refuses, with the HTTP status to answer and the Status message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = int(status)
        self.message = message


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    target: str
    headers: Mapping[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    status: int
    content_type: str
    body: bytes
    keep_alive: bool = True
    headers: tuple[tuple[str, str], ...] = ()

    def events(self) -> list[h11.Event]:
        """The answer as ``h11`` events: head, body, end."""
        headers = [
            ("content-type", self.content_type),
            ("content-length", str(len(self.body))),
            *self.headers,
            *([] if self.keep_alive else [("connection", "close")]),
        ]
        return [
            h11.Response(status_code=self.status, reason=HTTPStatus(self.status).phrase, headers=headers),
            h11.Data(data=self.body),
            h11.EndOfMessage(),
        ]


def _media_type(headers: Mapping[str, str]) -> str:
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _encode(message: Message, media: str) -> bytes:
    if media == JSON:
        return json_format.MessageToJson(message, indent=None).encode()
    return message.SerializeToString()


def error_answer(exc: HttpError, media: str = PROTOBUF, *, keep_alive: bool = True) -> HttpAnswer:
    """``exc`` as the OTLP/HTTP failure answer: its status and a ``google.rpc.Status`` body."""
    media = JSON if media == JSON else PROTOBUF
    allow = (("allow", "POST"),) if exc.status == HTTPStatus.METHOD_NOT_ALLOWED else ()
    return HttpAnswer(exc.status, media, _encode(Status(message=exc.message), media), keep_alive, allow)


def answer(request: HttpRequest) -> tuple[HttpAnswer, Any]:
    """The answer to one OTLP/HTTP request and the ``ExportTraceServiceRequest`` it carried
    (``None`` when it is refused). Pure: the caller stores the spans, then sends the answer."""
    media = _media_type(request.headers)
    try:
        export = decode_export(request)
    except HttpError as exc:
        return error_answer(exc, media), None
    response = _encode(trace_service_pb2.ExportTraceServiceResponse(), media)
    return HttpAnswer(200, media, response), export


def decode_export(request: HttpRequest) -> Any:
    """The ``ExportTraceServiceRequest`` of an OTLP/HTTP request; ``HttpError`` if refused."""
    path = request.target.split("?", 1)[0]
    if path != TRACES_PATH:
        raise HttpError(HTTPStatus.NOT_FOUND, f"no OTLP endpoint at {path!r}: spans go to POST {TRACES_PATH}")
    if request.method != "POST":
        raise HttpError(
            HTTPStatus.METHOD_NOT_ALLOWED, f"{request.method} {TRACES_PATH}: only POST is allowed"
        )
    media = _media_type(request.headers)
    if media not in (PROTOBUF, JSON):
        raise HttpError(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            f"Content-Type {media or '(none)'!r}: OTLP/HTTP takes {PROTOBUF} or {JSON}",
        )
    body = _decompressed(request.headers.get("content-encoding", ""), request.body)
    try:
        if media == PROTOBUF:
            return trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        tree = _hex_ids_to_base64(json.loads(body))
        return json_format.ParseDict(
            tree, trace_service_pb2.ExportTraceServiceRequest(), ignore_unknown_fields=True
        )
    except (DecodeError, json_format.ParseError, ValueError, RecursionError) as exc:  # JSON, hex: ValueError
        raise HttpError(
            HTTPStatus.BAD_REQUEST, f"undecodable ExportTraceServiceRequest ({media}): {exc}"
        ) from None


def _decompressed(encoding: str, body: bytes) -> bytes:
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding != "gzip":
        raise HttpError(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"Content-Encoding {encoding!r}: only gzip is supported"
        )
    out = bytearray()
    data = body
    try:
        while True:  # gzip members may be concatenated
            member = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            out += member.decompress(data, MAX_BODY + 1 - len(out))
            if len(out) > MAX_BODY:
                raise HttpError(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"gzip body over {MAX_BODY} bytes decompressed"
                )
            if not member.eof:
                raise HttpError(HTTPStatus.BAD_REQUEST, "truncated gzip body")
            data = member.unused_data
            if not data:
                return bytes(out)
    except zlib.error as exc:
        raise HttpError(
            HTTPStatus.BAD_REQUEST, f"Content-Encoding gzip but the body is not gzip: {exc}"
        ) from None


# OTLP/JSON writes these ids in hex where the protobuf JSON mapping expects base64. The
# snake_case spellings are not OTLP/JSON but json_format accepts them: convert them too
# rather than decode their hex as base64 into wrong ids.
_ID_KEYS = frozenset({"traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"})


def _hex_ids_to_base64(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            k: _hex_id(k, v) if k in _ID_KEYS and isinstance(v, str) else _hex_ids_to_base64(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_hex_ids_to_base64(x) for x in node]
    return node


def _hex_id(key: str, value: str) -> str:
    try:
        return base64.b64encode(bytes.fromhex(value)).decode()
    except ValueError:
        raise ValueError(f"{key} {value[:40]!r} is not hex") from None


# --- OTLP/HTTP: the connection (I/O) --------------------------------------------------------


async def _read_request(
    conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> HttpRequest | None:
    """The next request on the connection, ``None`` at a clean end; ``HttpError`` if it cannot
    be framed or is too large (the connection must then be closed after answering). ``h11``
    frames it: request line, fields, ``Content-Length`` or chunked, HTTP/1.0; and it answers
    with ``Connection: close`` and ends the connection when the client asked for that."""
    request: h11.Request | None = None
    body = bytearray()
    received = 0  # bytes read in this cycle before its request head was parsed
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:  # 400, 431 for a head over MAX_HEAD, 501 ...
            raise HttpError(exc.error_status_hint, f"malformed request: {exc}") from None
        if event is h11.NEED_DATA:
            if conn.they_are_waiting_for_100_continue:
                writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")
            data = await reader.read(65536)  # b"": the peer closed
            if request is None:
                received += len(data)
            conn.receive_data(data)
        elif isinstance(event, h11.Request):
            request = event
            # h11 bounds a head it is still waiting for; one that arrived whole is bounded here.
            if received - len(conn.trailing_data[0]) > MAX_HEAD:
                raise HttpError(
                    HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"request head over {MAX_HEAD} bytes"
                )
            declared = _header(event.headers, b"content-length")
            if declared is not None and int(declared) > MAX_BODY:
                raise HttpError(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {int(declared)} bytes, over {MAX_BODY}"
                )
        elif isinstance(event, h11.Data):
            if len(body) + len(event.data) > MAX_BODY:
                raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY} bytes")
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            headers: dict[str, str] = {}
            for name, value in request.headers:
                key, text = name.decode("latin-1"), value.decode("latin-1")
                headers[key] = f"{headers[key]}, {text}" if key in headers else text
            return HttpRequest(
                request.method.decode("latin-1"),
                request.target.decode("latin-1"),
                headers,
                bytes(body),
            )
        elif isinstance(event, h11.ConnectionClosed):
            return None  # between requests (inside one, h11 raises RemoteProtocolError)


def _header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    return next((v for n, v in headers if n == name), None)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class OtlpReceiver:
    """Collects spans sent by OTLP/gRPC and OTLP/HTTP exporters. Start it inside a running loop.

    ``port`` is the OTLP/gRPC port, ``http_port`` the OTLP/HTTP one (0: a free port; ``None``:
    do not listen for that transport).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = 0,
        *,
        http_port: int | None = 0,
        max_spans: int = 100_000,
    ) -> None:
        self.host = host
        self._requested_port = port
        self._requested_http_port = http_port
        self._port: int | None = None
        self._http_port: int | None = None
        self._spans: collections.deque[ReceivedSpan] = collections.deque(maxlen=max_spans)
        self.batches: collections.Counter[str] = collections.Counter()  # transport -> batches received
        self._cond: asyncio.Condition | None = None
        self._server: grpc.aio.Server | None = None
        self._http_server: asyncio.Server | None = None
        self._http_writers: set[asyncio.StreamWriter] = set()
        self.on_spans: Callable[[list[ReceivedSpan]], None] | None = None

    @property
    def port(self) -> int:
        """The OTLP/gRPC port."""
        if self._port is None:
            raise RuntimeError("receiver not started, or without OTLP/gRPC")
        return self._port

    @property
    def http_port(self) -> int:
        if self._http_port is None:
            raise RuntimeError("receiver not started, or without OTLP/HTTP")
        return self._http_port

    @property
    def endpoint(self) -> str:
        """What to put in ``Tracing.otlp_grpc_endpoint``."""
        return f"http://{_bracket(self.host)}:{self.port}"

    @property
    def http_endpoint(self) -> str:
        """What to put in ``Tracing.otlp_http_endpoint``: the full traces URL."""
        return f"http://{_bracket(self.host)}:{self.http_port}{TRACES_PATH}"

    async def start(self) -> None:
        self._cond = asyncio.Condition()
        try:
            if self._requested_http_port is not None:
                self._http_server = await asyncio.start_server(
                    self._http_connection, self.host, self._requested_http_port, limit=MAX_HEAD
                )
                self._http_port = self._http_server.sockets[0].getsockname()[1]
            if self._requested_port is not None:
                server = grpc.aio.server()
                trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Servicer(self), server)  # type: ignore[no-untyped-call]
                self._port = server.add_insecure_port(f"{_bracket(self.host)}:{self._requested_port}")
                await server.start()
                self._server = server
        except BaseException:
            await self.stop(0)
            raise

    async def stop(self, grace: float = 1.0) -> None:
        if self._http_server is not None:
            self._http_server.close()
            for writer in list(self._http_writers):
                writer.close()  # idle keep-alive connections would otherwise outlive the server
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._http_server.wait_closed()
            self._http_server = None
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    async def __aenter__(self) -> OtlpReceiver:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _add(self, spans: list[ReceivedSpan], transport: str) -> None:
        assert self._cond is not None
        async with self._cond:
            self._spans.extend(spans)
            self.batches[transport] += 1
            self._cond.notify_all()
        if self.on_spans is not None:
            self.on_spans(spans)

    async def _http_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._http_writers.add(writer)
        peer = writer.get_extra_info("peername")
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        try:
            while True:
                try:
                    request = await _read_request(conn, reader, writer)
                except HttpError as exc:  # the stream cannot be framed any more: answer, close
                    if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                        for event in error_answer(exc, keep_alive=False).events():
                            writer.write(conn.send(event) or b"")
                        await writer.drain()
                    return
                if request is None:
                    return
                reply, export = answer(request)
                if export is not None:
                    await self._add(spans_of(export, HTTP), HTTP)
                for event in reply.events():
                    writer.write(conn.send(event) or b"")
                await writer.drain()
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return  # h11 saw a close on either side
                conn.start_next_cycle()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away, possibly mid-request: nothing to answer
        except Exception:
            log.exception("OTLP/HTTP connection from %s failed", peer)
        finally:
            self._http_writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    @property
    def spans(self) -> list[ReceivedSpan]:
        return list(self._spans)

    def clear(self) -> None:
        self._spans.clear()

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return sorted((s for s in self._spans if s.trace_id == trace_id), key=lambda s: s.start_ns)

    async def wait_for(
        self,
        predicate: Callable[[list[ReceivedSpan]], bool],
        timeout: float = 10.0,  # noqa: ASYNC109 (tests read better with a plain deadline argument)
    ) -> list[ReceivedSpan]:
        """Wait until ``predicate(all spans received so far)`` holds; return those spans.

        Raises ``TimeoutError`` (with what did arrive) if it does not within ``timeout``.
        """
        if self._cond is None:
            raise RuntimeError("receiver not started")
        cond = self._cond
        try:
            async with asyncio.timeout(timeout), cond:
                await cond.wait_for(lambda: predicate(list(self._spans)))
                return list(self._spans)
        except TimeoutError:
            raise TimeoutError(
                f"condition not met within {timeout}s; {len(self._spans)} spans received:\n"
                + "\n".join(f"  {s.trace_id} {s.kind} {s.name} ({s.service})" for s in self._spans)
            ) from None

    def trace_tree(self, trace_id: str) -> str:
        """One trace as an indented tree: ``KIND name [service] attrs``, children under parents."""
        spans = self.trace(trace_id)
        ids = {s.span_id for s in spans}
        children: dict[str, list[ReceivedSpan]] = collections.defaultdict(list)
        for s in spans:
            children[s.parent_span_id if s.parent_span_id in ids else ""].append(s)
        lines = [f"trace {trace_id}"]

        def walk(parent: str, depth: int) -> None:
            for s in children.get(parent, []):
                ms = (s.end_ns - s.start_ns) / 1e6
                a = s.attributes
                extra = " ".join(
                    f"{k}={a[k]}"
                    for k in (
                        "http.response.status_code",
                        "mesh.route",
                        "mesh.response_flag",
                        "rpc.grpc.status_code",
                    )
                    if k in a
                )
                lines.append(
                    f"{'  ' * (depth + 1)}{s.kind} {s.name} [{s.service}] {ms:.2f}ms {extra}".rstrip()
                )
                walk(s.span_id, depth + 1)

        walk("", 0)
        return "\n".join(lines)


async def _serve(host: str, port: int, http_port: int) -> None:
    receiver = OtlpReceiver(host, port, http_port=http_port)
    printed: set[str] = set()

    def show(spans: list[ReceivedSpan]) -> None:
        # A trace is printed when its root span (no parent among what we have) arrives.
        for s in spans:
            if not s.parent_span_id and s.trace_id not in printed:
                printed.add(s.trace_id)
                print(receiver.trace_tree(s.trace_id), flush=True)

    receiver.on_spans = show
    await receiver.start()
    print(f"OTLP/gRPC receiver on {receiver.endpoint}, OTLP/HTTP on {receiver.http_endpoint}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await receiver.stop()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="In-memory OTLP trace receiver (OTLP/gRPC and OTLP/HTTP) that prints trace trees."
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4317, help="OTLP/gRPC port (default 4317)")
    p.add_argument("--http-port", type=int, default=4318, help="OTLP/HTTP port (default 4318)")
    args = p.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.host, args.port, args.http_port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
