"""The lab OTLP receiver over real sockets (loopback): OTLP/gRPC and OTLP/HTTP.

Spans of several sidecars, exported by the sidecar's own exporters over either transport,
form one trace; the receiver's OTLP/HTTP endpoint answers as the OTLP specification says
(200 with an empty ExportTraceServiceResponse, 400/404/405/413/415 with a google.rpc.Status),
takes gzip, JSON and chunked bodies, and keeps connections alive.
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import time
from collections.abc import AsyncIterator, Mapping

import pytest
from google.protobuf import json_format
from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from tel_chain import run_chain

from meshproxy.config import model
from meshproxy.lab.otlp_receiver import (
    GRPC,
    HTTP,
    MAX_BODY,
    MAX_HEAD,
    TRACES_PATH,
    OtlpReceiver,
    ReceivedSpan,
)
from meshproxy.telemetry import exporters
from meshproxy.telemetry.otlp_export import WireOTLPHttpExporter
from meshproxy.telemetry.otlp_http import OtlpHttpClient
from meshproxy.telemetry.otlp_loop import ExportError

PROTOBUF = {"Content-Type": "application/x-protobuf"}


@pytest.fixture
async def receiver() -> AsyncIterator[OtlpReceiver]:
    async with OtlpReceiver("127.0.0.1", 0) as r:  # both transports, each on a free port
        yield r


def export_request(name: str = "op", trace_id: bytes = bytes(range(16))) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    rs = request.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "svc"
    span = rs.scope_spans.add().spans.add()
    span.trace_id, span.span_id, span.name, span.kind = trace_id, bytes(range(8)), name, 2
    return request


class Answer:
    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def status_message(self) -> str:
        """The google.rpc.Status an error answer must carry, decoded as its content type says."""
        if self.headers["content-type"] == "application/json":
            return json_format.Parse(self.body, Status()).message
        assert self.headers["content-type"] == "application/x-protobuf"
        return Status.FromString(self.body).message


async def send(
    receiver: OtlpReceiver,
    body: bytes | list[bytes],
    headers: Mapping[str, str] = PROTOBUF,
    *,
    method: str = "POST",
    path: str = TRACES_PATH,
    conn: http.client.HTTPConnection | None = None,
) -> Answer:
    """One request with http.client (a thread: the receiver serves on this test's loop).
    A list body is sent chunked."""

    def call() -> Answer:
        c = conn or http.client.HTTPConnection("127.0.0.1", receiver.http_port, timeout=10)
        try:
            chunked = isinstance(body, list)
            c.request(
                method,
                path,
                body=iter(body) if chunked else body,
                headers=dict(headers),
                encode_chunked=chunked,
            )
            resp = c.getresponse()
            return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            if conn is None:
                c.close()

    return await asyncio.to_thread(call)


# --- a trace through three sidecars' exporters, over each transport ------------------------


@pytest.mark.parametrize("transport", [GRPC, HTTP], ids=["grpc", "http"])
@pytest.mark.parametrize(
    "propagation",
    [(model.Propagation.W3C,), (model.Propagation.B3_MULTI,), (model.Propagation.B3,)],
    ids=["w3c", "b3multi", "b3"],
)
async def test_a_b_c_chain_is_one_trace(
    receiver: OtlpReceiver, propagation: tuple[model.Propagation, ...], transport: str
) -> None:
    if transport == GRPC:
        chain = await run_chain(propagation, otlp_grpc_endpoint=receiver.endpoint)
    else:
        chain = await run_chain(propagation, otlp_http_endpoint=receiver.http_endpoint)
    trace_id = chain.trace_id
    assert {h.trace_id for h in (chain.b_in, chain.b_out, chain.c_in)} == {trace_id}
    assert chain.b_in.request_id == chain.a_out.request_id == chain.c_in.request_id

    def complete(spans: list[ReceivedSpan]) -> bool:
        return len([s for s in spans if s.trace_id == trace_id]) == 4

    await receiver.wait_for(complete, timeout=15)
    assert {s.transport for s in receiver.spans} == {transport}
    assert set(receiver.batches) == {transport}
    spans = {(s.service, s.kind): s for s in receiver.trace(trace_id)}
    a_client, b_server = spans["a", "CLIENT"], spans["b", "SERVER"]
    b_client, c_server = spans["b", "CLIENT"], spans["c", "SERVER"]
    assert a_client.parent_span_id == ""
    assert b_server.parent_span_id == a_client.span_id
    assert b_client.parent_span_id == b_server.span_id
    assert c_server.parent_span_id == b_client.span_id
    assert a_client.name == "GET b-default"
    assert b_server.attributes["mesh.source.workload"] == "a"
    assert c_server.attributes["mesh.source.workload"] == "b"
    assert c_server.attributes["http.response.status_code"] == 200
    tree = receiver.trace_tree(trace_id).splitlines()
    assert tree[1].strip().startswith("CLIENT GET b-default [a]")
    assert tree[4].strip().startswith("SERVER GET [c]")


# --- the OTLP/HTTP endpoint -----------------------------------------------------------------


async def test_sidecar_http_client_export_is_stored_before_the_200(receiver: OtlpReceiver) -> None:
    client = OtlpHttpClient(receiver.http_endpoint, timeout=5)
    try:
        assert await client.export(export_request("first").SerializeToString())
        # No waiting: the receiver answers 200 only once the spans are in its store.
        assert [(s.name, s.service, s.kind, s.transport) for s in receiver.spans] == [
            ("first", "svc", "SERVER", HTTP)
        ]
        assert await client.export(export_request("second").SerializeToString())  # same connection
    finally:
        await client.aclose()
    assert [s.name for s in receiver.spans] == ["first", "second"]
    assert receiver.batches == {HTTP: 2}


async def test_protobuf_post_answers_200_with_an_empty_response(receiver: OtlpReceiver) -> None:
    answer = await send(receiver, export_request().SerializeToString())
    assert answer.status == 200
    assert answer.headers["content-type"] == "application/x-protobuf"
    assert ExportTraceServiceResponse.FromString(answer.body) == ExportTraceServiceResponse()
    assert [s.trace_id for s in receiver.spans] == [bytes(range(16)).hex()]


async def test_gzip_body_is_decompressed(receiver: OtlpReceiver) -> None:
    body = gzip.compress(export_request("zipped").SerializeToString())
    answer = await send(receiver, body, {**PROTOBUF, "Content-Encoding": "gzip"})
    assert answer.status == 200
    assert [s.name for s in receiver.spans] == ["zipped"]


async def test_sdk_http_exporter_with_gzip_compression(
    receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the sidecar uses when compression is configured: the OpenTelemetry SDK's exporter.
    env = {"OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "gzip"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)  # the SDK reads compression from the environment itself
    exporter = exporters.otlp_http(receiver.http_endpoint, 5.0, env)
    assert isinstance(exporter, WireOTLPHttpExporter)
    payload = export_request("sdk").SerializeToString()
    try:
        assert await asyncio.to_thread(exporter.export_encoded, payload, 1)
    finally:
        exporter.shutdown()
    assert [(s.name, s.transport) for s in receiver.spans] == [("sdk", HTTP)]


async def test_json_body_with_hex_ids_and_a_json_answer(receiver: OtlpReceiver) -> None:
    trace_id, span_id = "5B8EFFF798038103D269B633813FC60C", "EEE19B7EC3C1B174"
    body = {
        "resourceSpans": [
            {
                "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "js"}}]},
                "scopeSpans": [
                    {
                        "spans": [
                            {
                                "traceId": trace_id,
                                "spanId": span_id,
                                "parentSpanId": "",
                                "name": "GET /",
                                "kind": 3,
                                "startTimeUnixNano": "1000",
                                "endTimeUnixNano": "3000",
                                "attributes": [{"key": "n", "value": {"intValue": "7"}}],
                                "links": [{"traceId": trace_id, "spanId": span_id}],
                                "someFutureField": True,  # unknown fields are ignored
                            }
                        ]
                    }
                ],
            }
        ]
    }
    answer = await send(
        receiver, json.dumps(body).encode(), {"Content-Type": "application/json; charset=utf-8"}
    )
    assert answer.status == 200, answer.body
    assert answer.headers["content-type"] == "application/json"
    assert json.loads(answer.body) == {}
    [span] = receiver.spans
    assert (span.trace_id, span.span_id, span.parent_span_id) == (trace_id.lower(), span_id.lower(), "")
    assert (span.name, span.kind, span.service, span.start_ns, span.end_ns) == (
        "GET /",
        "CLIENT",
        "js",
        1000,
        3000,
    )
    assert span.attributes == {"n": 7}


async def test_chunked_requests_on_one_kept_alive_connection(receiver: OtlpReceiver) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", receiver.http_port, timeout=10)
    try:
        payload = export_request("chunked").SerializeToString()
        first = await send(receiver, [payload[:10], payload[10:]], conn=conn)
        sock = conn.sock
        second = await send(receiver, export_request("plain").SerializeToString(), conn=conn)
        assert conn.sock is sock is not None  # the receiver kept the connection open
    finally:
        conn.close()
    assert (first.status, second.status) == (200, 200)
    assert [s.name for s in receiver.spans] == ["chunked", "plain"]


@pytest.mark.parametrize(
    ("headers", "body", "message"),
    [
        (PROTOBUF, b"not a protobuf", "undecodable ExportTraceServiceRequest (application/x-protobuf)"),
        (
            {**PROTOBUF, "Content-Encoding": "gzip"},
            b"not gzip",
            "Content-Encoding gzip but the body is not gzip",
        ),
        (
            {"Content-Type": "application/json"},
            b"{not json",
            "undecodable ExportTraceServiceRequest (application/json)",
        ),
        (
            {"Content-Type": "application/json"},
            b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "xyz"}]}]}]}',
            "traceId 'xyz' is not hex",
        ),
    ],
    ids=["protobuf", "gzip", "json", "json-id"],
)
async def test_undecodable_body_is_400_with_a_status(
    receiver: OtlpReceiver, headers: Mapping[str, str], body: bytes, message: str
) -> None:
    answer = await send(receiver, body, headers)
    assert answer.status == 400
    assert message in answer.status_message()
    assert receiver.spans == [] and not receiver.batches


async def test_sidecar_client_reads_the_400_status_as_final(receiver: OtlpReceiver) -> None:
    client = OtlpHttpClient(receiver.http_endpoint, timeout=5)
    try:
        with pytest.raises(ExportError, match=r"HTTP 400 .*undecodable ExportTraceServiceRequest") as raised:
            await client._call(b"not a protobuf", deadline=time.monotonic() + 5)  # one attempt
        assert not raised.value.retryable
    finally:
        await client.aclose()


async def test_other_path_is_404(receiver: OtlpReceiver) -> None:
    answer = await send(receiver, export_request().SerializeToString(), path="/v1/metrics")
    assert answer.status == 404
    assert "spans go to POST /v1/traces" in answer.status_message()
    assert receiver.spans == []


async def test_other_method_is_405_with_allow(receiver: OtlpReceiver) -> None:
    answer = await send(receiver, b"", {}, method="GET")
    assert answer.status == 405
    assert answer.headers["allow"] == "POST"
    assert "only POST" in answer.status_message()


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"Content-Type": "text/plain"}, "Content-Type 'text/plain'"),
        ({}, "Content-Type '(none)'"),
        ({**PROTOBUF, "Content-Encoding": "br"}, "Content-Encoding 'br': only gzip"),
    ],
    ids=["text", "none", "brotli"],
)
async def test_unsupported_media_is_415(
    receiver: OtlpReceiver, headers: Mapping[str, str], message: str
) -> None:
    answer = await send(receiver, export_request().SerializeToString(), headers)
    assert answer.status == 415
    assert message in answer.status_message()
    assert receiver.spans == []


async def test_json_request_gets_its_error_status_in_json(receiver: OtlpReceiver) -> None:
    answer = await send(receiver, b"{}", {"Content-Type": "application/json"}, path="/")
    assert answer.status == 404
    assert answer.headers["content-type"] == "application/json"
    assert "spans go to POST" in json.loads(answer.body)["message"]


async def test_gzip_bomb_is_413(receiver: OtlpReceiver) -> None:
    body = gzip.compress(b"\0" * (MAX_BODY + 1), compresslevel=1)
    answer = await send(receiver, body, {**PROTOBUF, "Content-Encoding": "gzip"})
    assert answer.status == 413
    assert receiver.spans == []


async def test_declared_length_over_the_limit_is_413_and_closes(receiver: OtlpReceiver) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", receiver.http_port)
    try:
        head = f"POST {TRACES_PATH} HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-protobuf\r\n"
        writer.write(f"{head}content-length: {MAX_BODY + 1}\r\n\r\n".encode())
        answer = await asyncio.wait_for(reader.read(), timeout=10)  # until the receiver closes
    finally:
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 413 ")
    assert b"connection: close" in rest
    assert Status.FromString(rest.split(b"\r\n\r\n", 1)[1]).message.startswith("body of")


async def _raw(receiver: OtlpReceiver, data: bytes) -> bytes:
    """Write ``data`` as it is; everything the receiver sends until it closes (or 10 s)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", receiver.http_port)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()


HEAD = f"POST {TRACES_PATH} HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-protobuf\r\n"


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (f"{HEAD}x-big: {'a' * (MAX_HEAD + 10)}\r\n\r\n".encode(), 431),
        (f"{HEAD}transfer-encoding: gzip\r\n\r\n".encode(), 501),
        (f"{HEAD}transfer-encoding: chunked\r\n\r\nzz\r\n".encode(), 400),
        (f"{HEAD}content-length: twelve\r\n\r\n".encode(), 400),
    ],
    ids=["request-line", "head-too-large", "transfer-coding", "chunk-size", "content-length"],
)
async def test_a_request_that_cannot_be_framed_is_answered_with_its_status_and_closed(
    receiver: OtlpReceiver, request_bytes: bytes, status: int
) -> None:
    answer = await _raw(receiver, request_bytes)  # read() returns once the receiver closes
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(f"HTTP/1.1 {status} ".encode()), answer[:200]
    assert b"connection: close" in rest.lower()
    assert Status.FromString(rest.split(b"\r\n\r\n", 1)[1]).message.startswith(
        ("malformed request", "request head over")
    )
    assert receiver.spans == []


async def test_expect_100_continue_gets_its_interim_answer_before_the_body(receiver: OtlpReceiver) -> None:
    body = export_request("after-100").SerializeToString()
    reader, writer = await asyncio.open_connection("127.0.0.1", receiver.http_port)
    try:
        writer.write(f"{HEAD}content-length: {len(body)}\r\nexpect: 100-continue\r\n\r\n".encode())
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
        assert interim.startswith(b"HTTP/1.1 100 ")
        writer.write(body)
        final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
        assert final.startswith(b"HTTP/1.1 200 ")
    finally:
        writer.close()
    assert [s.name for s in receiver.spans] == ["after-100"]


async def test_pipelined_requests_are_answered_in_order_and_http10_closes(receiver: OtlpReceiver) -> None:
    one, two = (export_request(n).SerializeToString() for n in ("one", "two"))
    head10 = HEAD.replace("HTTP/1.1", "HTTP/1.0")
    data = (
        f"{HEAD}content-length: {len(one)}\r\n\r\n".encode() + one
        + f"{head10}content-length: {len(two)}\r\n\r\n".encode() + two
    )  # fmt: skip
    answer = await _raw(receiver, data)  # the HTTP/1.0 request without keep-alive ends it
    assert answer.count(b"HTTP/1.1 200 OK\r\n") == 2
    assert [s.name for s in receiver.spans] == ["one", "two"]


async def test_grpc_and_http_share_one_store(receiver: OtlpReceiver) -> None:
    assert (await send(receiver, export_request("over-http").SerializeToString())).status == 200
    chain = await run_chain(otlp_grpc_endpoint=receiver.endpoint)
    await receiver.wait_for(lambda spans: len([s for s in spans if s.trace_id == chain.trace_id]) == 4)
    by_transport = {(s.name, s.transport) for s in receiver.spans}
    assert ("over-http", HTTP) in by_transport
    assert {t for n, t in by_transport if n != "over-http"} == {GRPC}
    assert receiver.batches[HTTP] == 1 and receiver.batches[GRPC] >= 1


async def test_stop_closes_idle_kept_alive_connections(receiver: OtlpReceiver) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", receiver.http_port)
    try:
        body = export_request().SerializeToString()
        head = f"POST {TRACES_PATH} HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-protobuf\r\n"
        writer.write(f"{head}content-length: {len(body)}\r\n\r\n".encode() + body)
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 OK\r\n")
        await asyncio.wait_for(receiver.stop(grace=5), timeout=10)
        assert await asyncio.wait_for(reader.read(), timeout=5) == b""  # closed by the receiver
    finally:
        writer.close()
