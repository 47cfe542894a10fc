"""Http2ServerConnection on loopback: httpx (h2c prior knowledge) and a raw ``h2`` client."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.settings
import httpx
import pytest
import uvloop

from meshproxy.core.h2util import GoAway, GoAwaySplitter
from meshproxy.core.http import RequestHead, ResponseHead
from meshproxy.io.exchange import BodyStream, DownstreamContext, ResponseSink
from meshproxy.io.http2_server import Http2ServerConnection, Http2ServerSettings

Handler = Callable[[DownstreamContext, RequestHead, BodyStream, ResponseSink], Awaitable[None]]


@dataclass
class Server:
    port: int
    connections: list[Http2ServerConnection] = field(default_factory=list)


@asynccontextmanager
async def serve(handler: Handler, settings: Http2ServerSettings | None = None) -> AsyncIterator[Server]:
    server = Server(0)
    ids = itertools.count(1)

    def factory() -> Http2ServerConnection:
        ctx = DownstreamContext("inbound", "127.0.0.1", 0, "127.0.0.1", 0, next(ids))
        conn = Http2ServerConnection(handler, ctx, settings)
        server.connections.append(conn)
        return conn

    listener = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()
        for conn in server.connections:
            conn.close_transport(linger=0)
            await conn.wait_closed()


class RawClient:
    """A minimal HTTP/2 client on ``h2``; records every event (GOAWAY split off like ours)."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, strict: bool = True
    ) -> None:
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=strict,
            normalize_outbound_headers=strict,
        )
        self.conn = h2.connection.H2Connection(config)
        self.reader = reader
        self.writer = writer
        self.events: list[h2.events.Event | GoAway] = []
        self.eof = False
        self._changed = asyncio.Condition()
        self._splitter = GoAwaySplitter(expect_preface=False)
        self._task = asyncio.get_running_loop().create_task(self._read(), name="raw-h2-reader")

    @classmethod
    async def connect(cls, port: int, *, strict: bool = True) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer, strict=strict)
        client.conn.initiate_connection()
        client.flush()
        return client

    def flush(self) -> None:
        self.writer.write(self.conn.data_to_send())

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionResetError):
            await self._read_frames()
        async with self._changed:
            self.eof = True
            self._changed.notify_all()

    async def _read_frames(self) -> None:
        while data := await self.reader.read(65536):
            new: list[h2.events.Event | GoAway] = []
            for item in self._splitter.feed(data):
                if isinstance(item, GoAway):
                    new.append(item)
                else:
                    new.extend(self.conn.receive_data(item))
            self.flush()
            async with self._changed:
                self.events.extend(new)
                self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[RawClient], bool], within: float = 5.0) -> None:
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: predicate(self))

    def of_type(self, kind: type, stream_id: int | None = None) -> list[object]:
        return [
            e
            for e in self.events
            if isinstance(e, kind) and (stream_id is None or getattr(e, "stream_id", None) == stream_id)
        ]

    def body(self, stream_id: int) -> bytes:
        return b"".join(
            e.data for e in self.events if isinstance(e, h2.events.DataReceived) and e.stream_id == stream_id
        )

    async def close(self) -> None:
        self.writer.close()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def request(path: str = "/", method: str = "GET") -> list[tuple[bytes, bytes]]:
    return [
        (b":method", method.encode()),
        (b":scheme", b"http"),
        (b":authority", b"svc:80"),
        (b":path", path.encode()),
    ]


async def read_all(body: BodyStream) -> bytes:
    chunks = []
    while chunk := await body.read():
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    """Run every test on both event loops the sidecar supports."""
    if request.param == "uvloop":
        policy: asyncio.AbstractEventLoopPolicy = uvloop.EventLoopPolicy()
        return policy
    return asyncio.DefaultEventLoopPolicy()


# --- tests ----------------------------------------------------------------------------------


async def test_httpx_prior_knowledge_post_with_body() -> None:
    seen: list[RequestHead] = []

    async def echo(ctx: DownstreamContext, head: RequestHead, body: BodyStream, sink: ResponseSink) -> None:
        seen.append(head)
        data = await read_all(body)
        await sink.send_head(ResponseHead(201, (("x-length", str(len(data))),), version="2"))
        await sink.send_data(data[::-1])
        await sink.send_end()

    async with serve(echo) as server, httpx.AsyncClient(http1=False, http2=True) as client:
        payload = bytes(range(256)) * 1000
        response = await client.post(f"http://127.0.0.1:{server.port}/upload?a=1", content=payload)
        assert response.http_version == "HTTP/2"
        assert response.status_code == 201
        assert response.headers["x-length"] == str(len(payload))
        assert response.content == payload[::-1]
    assert seen[0].method == "POST"
    assert seen[0].path == "/upload?a=1"
    assert seen[0].authority == f"127.0.0.1:{server.port}"
    assert seen[0].version == "2"


async def test_unread_body_holds_back_flow_control_credit() -> None:
    release = asyncio.Event()
    received: list[int] = []

    async def slow(ctx: DownstreamContext, head: RequestHead, body: BodyStream, sink: ResponseSink) -> None:
        await release.wait()
        received.append(len(await read_all(body)))
        await sink.send_head(ResponseHead(200, ()), end_stream=True)

    settings = Http2ServerSettings(initial_window_size=65535)
    async with serve(slow, settings) as server:
        client = await RawClient.connect(server.port)
        await client.wait_for(lambda c: bool(c.of_type(h2.events.RemoteSettingsChanged)))
        client.conn.send_headers(1, request("/up", "POST"))
        payload = b"z" * 200_000
        sent = client.conn.local_flow_control_window(1)
        assert sent == 65535
        for i in range(0, sent, 16384):
            client.conn.send_data(1, payload[i : min(i + 16384, sent)])
        client.conn.ping(b"syncsync")
        client.flush()
        # The PING answer comes after the server processed all the DATA before it.
        await client.wait_for(lambda c: bool(c.of_type(h2.events.PingAckReceived)))
        assert client.conn.local_flow_control_window(1) == 0  # nothing was read: no credit back
        release.set()
        offset = sent
        while offset < len(payload):
            await client.wait_for(lambda c: c.conn.local_flow_control_window(1) > 0)
            n = min(
                client.conn.local_flow_control_window(1),
                client.conn.max_outbound_frame_size,
                len(payload) - offset,
            )
            client.conn.send_data(1, payload[offset : offset + n], end_stream=offset + n == len(payload))
            client.flush()
            offset += n
        await client.wait_for(lambda c: bool(c.of_type(h2.events.StreamEnded, 1)))
        assert received == [len(payload)]
        await client.close()


async def test_client_reset_cancels_the_stream_task_only() -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def handler(
        ctx: DownstreamContext, head: RequestHead, body: BodyStream, sink: ResponseSink
    ) -> None:
        if head.path == "/hang":
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise
        await sink.send_head(ResponseHead(200, ()))
        await sink.send_data(b"ok")
        await sink.send_end()

    async with serve(handler) as server:
        client = await RawClient.connect(server.port)
        client.conn.send_headers(1, request("/hang"), end_stream=True)
        client.flush()
        async with asyncio.timeout(5):
            await started.wait()
        client.conn.reset_stream(1, error_code=8)
        client.conn.send_headers(3, request("/fine"), end_stream=True)
        client.flush()
        async with asyncio.timeout(5):
            await cancelled.wait()
        await client.wait_for(lambda c: bool(c.of_type(h2.events.StreamEnded, 3)))
        assert client.body(3) == b"ok"
        await client.close()


async def test_streams_reset_before_their_task_ran_are_forgotten() -> None:
    async def handler(
        ctx: DownstreamContext, head: RequestHead, body: BodyStream, sink: ResponseSink
    ) -> None:
        await sink.send_head(ResponseHead(204, ()), end_stream=True)

    async with serve(handler) as server:
        client = await RawClient.connect(server.port)
        for sid in (1, 3, 5):  # HEADERS and RST_STREAM in one write: the tasks never get to run
            client.conn.send_headers(sid, request("/"), end_stream=True)
            client.conn.reset_stream(sid, error_code=8)
        client.conn.send_headers(7, request("/"), end_stream=True)
        client.flush()
        await client.wait_for(lambda c: bool(c.of_type(h2.events.StreamEnded, 7)))
        assert server.connections[0].active_streams == 0
        await client.close()


async def test_failing_handler_resets_its_stream_and_the_connection_lives_on() -> None:
    async def handler(
        ctx: DownstreamContext, head: RequestHead, body: BodyStream, sink: ResponseSink
    ) -> None:
        if head.path == "/boom":
            raise RuntimeError("handler bug")
        if head.path == "/forgot":
            await sink.send_head(ResponseHead(200, ()))
            return  # never ends the response
        await sink.send_head(ResponseHead(204, ()), end_stream=True)

    async with serve(handler) as server:
        client = await RawClient.connect(server.port)
        client.conn.send_headers(1, request("/boom"), end_stream=True)
        client.conn.send_headers(3, request("/forgot"), end_stream=True)
        client.conn.send_headers(5, request("/fine"), end_stream=True)
        client.flush()
        await client.wait_for(
            lambda c: len(c.of_type(h2.events.StreamReset)) == 2 and bool(c.of_type(h2.events.StreamEnded, 5))
        )
        resets = {e.stream_id: e.error_code for e in client.of_type(h2.events.StreamReset)}  # type: ignore[attr-defined]
        assert resets == {1: 2, 3: 2}  # INTERNAL_ERROR
        ok = client.of_type(h2.events.ResponseReceived, 5)
        assert ok[0].headers == [(b":status", b"204")]  # type: ignore[attr-defined]
        await client.close()


async def test_grpc_trailers_only_response_is_one_headers_frame_and_trailers_are_kept() -> None:
    async def handler(
        ctx: DownstreamContext, head: RequestHead, body: BodyStream, sink: ResponseSink
    ) -> None:
        await read_all(body)
        grpc = (("content-type", "application/grpc"),)
        if head.path == "/only":
            # What the pipeline does with a trailers-only upstream response: head, then an empty end.
            await sink.send_head(ResponseHead(200, (*grpc, ("grpc-status", "5"), ("grpc-message", "gone"))))
            await sink.send_end(None)
            return
        await sink.send_head(ResponseHead(200, grpc))
        await sink.send_data(b"\x00\x00\x00\x00\x02hi")
        await sink.send_end((("grpc-status", "0"), ("x-cost", "3")))

    async with serve(handler) as server:
        client = await RawClient.connect(server.port)
        client.conn.send_headers(1, request("/only", "POST"), end_stream=True)
        client.conn.send_headers(3, request("/full", "POST"), end_stream=True)
        client.flush()
        await client.wait_for(lambda c: len(c.of_type(h2.events.StreamEnded)) == 2)
        only = client.of_type(h2.events.ResponseReceived, 1)[0]
        assert only.stream_ended is not None  # type: ignore[attr-defined]
        assert (b"grpc-status", b"5") in only.headers  # type: ignore[attr-defined]
        assert not client.of_type(h2.events.DataReceived, 1)
        trailers = client.of_type(h2.events.TrailersReceived, 3)[0]
        assert trailers.headers == [(b"grpc-status", b"0"), (b"x-cost", b"3")]  # type: ignore[attr-defined]
        assert client.body(3) == b"\x00\x00\x00\x00\x02hi"
        await client.close()


async def test_request_trailers_reach_the_handler() -> None:
    got: list[object] = []

    async def handler(
        ctx: DownstreamContext, head: RequestHead, body: BodyStream, sink: ResponseSink
    ) -> None:
        got.append(await read_all(body))
        got.append(body.trailers)
        await sink.send_head(ResponseHead(200, ()), end_stream=True)

    async with serve(handler) as server:
        client = await RawClient.connect(server.port)
        client.conn.send_headers(1, request("/t", "POST"))
        client.conn.send_data(1, b"payload")
        client.conn.send_headers(1, [(b"x-checksum", b"abc")], end_stream=True)
        client.flush()
        await client.wait_for(lambda c: bool(c.of_type(h2.events.StreamEnded, 1)))
        assert got == [b"payload", (("x-checksum", "abc"),)]
        await client.close()


async def test_graceful_shutdown_finishes_inflight_and_refuses_new_streams() -> None:
    started = asyncio.Event()
    release = asyncio.Event()

    async def handler(
        ctx: DownstreamContext, head: RequestHead, body: BodyStream, sink: ResponseSink
    ) -> None:
        started.set()
        await release.wait()
        await sink.send_head(ResponseHead(200, ()))
        await sink.send_data(b"finished")
        await sink.send_end()

    async with serve(handler) as server:
        client = await RawClient.connect(server.port)
        client.conn.send_headers(1, request("/slow"), end_stream=True)
        client.flush()
        async with asyncio.timeout(5):
            await started.wait()
        shutdown = asyncio.get_running_loop().create_task(
            server.connections[0].shutdown(5.0), name="shutdown"
        )
        await client.wait_for(lambda c: bool(c.of_type(GoAway)))
        goaway = client.of_type(GoAway)[0]
        assert goaway == GoAway(1, 0, b"")
        # A stream the client opened before it saw the GOAWAY is refused, not processed.
        client.conn.send_headers(3, request("/late"), end_stream=True)
        client.flush()
        await client.wait_for(lambda c: bool(c.of_type(h2.events.StreamReset, 3)))
        assert client.of_type(h2.events.StreamReset, 3)[0].error_code == 7  # type: ignore[attr-defined]
        release.set()
        await client.wait_for(lambda c: c.eof)
        assert client.body(1) == b"finished"
        assert client.of_type(h2.events.StreamEnded, 1)
        await client.close()  # answers the server's FIN, which ends its lingering close
        async with asyncio.timeout(1):
            await shutdown


async def test_shutdown_grace_expiry_cancels_streams() -> None:
    cancelled = asyncio.Event()

    async def handler(
        ctx: DownstreamContext, head: RequestHead, body: BodyStream, sink: ResponseSink
    ) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with serve(handler) as server:
        client = await RawClient.connect(server.port)
        client.conn.send_headers(1, request("/stuck"), end_stream=True)
        client.flush()
        await client.wait_for(lambda c: server.connections[0].active_streams == 1 or c.eof)
        await server.connections[0].shutdown(0.1)
        assert cancelled.is_set()
        await client.wait_for(lambda c: c.eof)
        await client.close()


async def test_connection_protocol_error_sends_goaway_and_closes() -> None:
    async def handler(
        ctx: DownstreamContext, head: RequestHead, body: BodyStream, sink: ResponseSink
    ) -> None:
        raise AssertionError("not reached")

    async with serve(handler) as server:
        client = await RawClient.connect(server.port)
        # DATA on stream 0 is a connection error (RFC 9113 6.1).
        client.writer.write(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")
        await client.wait_for(lambda c: c.eof)
        goaways = client.of_type(GoAway)
        assert goaways
        assert goaways[0].error_code == 1  # type: ignore[attr-defined]
        await client.close()


async def test_idle_connection_is_closed_with_goaway() -> None:
    async def handler(
        ctx: DownstreamContext, head: RequestHead, body: BodyStream, sink: ResponseSink
    ) -> None:
        await sink.send_head(ResponseHead(200, ()), end_stream=True)

    async with serve(handler, Http2ServerSettings(idle_timeout=0.2, max_concurrent_streams=7)) as server:
        client = await RawClient.connect(server.port)
        client.conn.send_headers(1, request("/"), end_stream=True)
        client.flush()
        await client.wait_for(lambda c: c.eof)
        assert client.of_type(h2.events.StreamEnded, 1)  # served first, then closed when idle
        assert client.of_type(GoAway)
        assert client.conn.remote_settings.max_concurrent_streams == 7
        await client.close()


async def test_malformed_request_is_a_stream_error_not_a_connection_error() -> None:
    served: list[str] = []

    async def handler(
        ctx: DownstreamContext, head: RequestHead, body: BodyStream, sink: ResponseSink
    ) -> None:
        served.append(head.path)
        await sink.send_head(ResponseHead(204, ()), end_stream=True)

    async with serve(handler) as server:
        client = await RawClient.connect(server.port, strict=False)
        client.conn.send_headers(1, [*request("/bad"), (b"x-smuggle", b"a\r\nx-evil: 1")], end_stream=True)
        client.conn.send_headers(3, [*request("/bad2"), (b"connection", b"close")], end_stream=True)
        client.conn.send_headers(5, request("/good"), end_stream=True)
        client.flush()
        await client.wait_for(lambda c: bool(c.of_type(h2.events.StreamEnded, 5)))
        await client.wait_for(lambda c: len(c.of_type(h2.events.StreamReset)) == 2)
        resets = {e.stream_id: e.error_code for e in client.of_type(h2.events.StreamReset)}  # type: ignore[attr-defined]
        assert resets == {1: 1, 3: 1}  # PROTOCOL_ERROR on those streams only
        assert served == ["/good"]
        assert not client.eof
        await client.close()


async def test_rapid_reset_flood_closes_the_connection() -> None:
    async def handler(
        ctx: DownstreamContext, head: RequestHead, body: BodyStream, sink: ResponseSink
    ) -> None:
        await asyncio.Event().wait()

    settings = Http2ServerSettings(max_client_resets=20, reset_window=60.0)
    async with serve(handler, settings) as server:
        client = await RawClient.connect(server.port)
        for sid in range(1, 2 * 50, 2):  # 50 streams, each reset right after it was opened
            client.conn.send_headers(sid, request("/"), end_stream=True)
            client.conn.reset_stream(sid, error_code=8)
        client.flush()
        await client.wait_for(lambda c: c.eof)
        goaway = client.of_type(GoAway)[0]
        assert goaway.error_code == 0xB  # type: ignore[attr-defined]  # ENHANCE_YOUR_CALM
        await client.close()
        await server.connections[0].wait_closed()
        assert server.connections[0].active_streams == 0  # every task was cancelled and forgotten


async def test_send_whole_sends_head_body_and_end_in_one_go() -> None:
    grpc = (("content-type", "application/grpc"),)

    async def handler(
        ctx: DownstreamContext, head: RequestHead, body: BodyStream, sink: ResponseSink
    ) -> None:
        await read_all(body)
        send_whole = sink.send_whole  # type: ignore[attr-defined]
        if head.path == "/trailers":
            await send_whole(
                ResponseHead(200, grpc), b"\x00\x00\x00\x00\x02hi", (("grpc-status", "0"),), end_stream=False
            )
        elif head.path == "/plain":
            await send_whole(ResponseHead(200, ()), b"hello", None, end_stream=False)
        else:  # a trailers-only gRPC answer: the body is known to be empty
            await send_whole(ResponseHead(200, (*grpc, ("grpc-status", "5"))), b"", None, end_stream=True)

    async with serve(handler) as server:
        client = await RawClient.connect(server.port)
        for sid, path in ((1, "/trailers"), (3, "/plain"), (5, "/only")):
            client.conn.send_headers(sid, request(path, "POST"), end_stream=True)
        client.flush()
        await client.wait_for(lambda c: len(c.of_type(h2.events.StreamEnded)) == 3)
        assert client.body(1) == b"\x00\x00\x00\x00\x02hi"
        trailers = client.of_type(h2.events.TrailersReceived, 1)[0]
        assert trailers.headers == [(b"grpc-status", b"0")]  # type: ignore[attr-defined]
        (data,) = client.of_type(h2.events.DataReceived, 3)
        assert data.data == b"hello"  # type: ignore[attr-defined]
        assert data.stream_ended is not None  # type: ignore[attr-defined] # END_STREAM on the DATA frame
        only = client.of_type(h2.events.ResponseReceived, 5)[0]
        assert only.stream_ended is not None  # type: ignore[attr-defined] # one HEADERS frame
        assert (b"grpc-status", b"5") in only.headers  # type: ignore[attr-defined]
        assert not client.of_type(h2.events.DataReceived, 5)
        await client.close()


async def test_send_whole_waits_for_the_clients_window_when_the_body_does_not_fit() -> None:
    big = bytes(range(256)) * 400  # 100 KiB, beyond the client's 64 KiB initial window

    async def handler(
        ctx: DownstreamContext, head: RequestHead, body: BodyStream, sink: ResponseSink
    ) -> None:
        await read_all(body)
        await sink.send_whole(ResponseHead(200, ()), big, (("x-done", "1"),), end_stream=False)  # type: ignore[attr-defined]

    async with serve(handler) as server:
        client = await RawClient.connect(server.port)
        client.conn.send_headers(1, request("/big"), end_stream=True)
        client.flush()
        acked = 0

        def progress(c: RawClient, seen: int) -> bool:
            return len(c.of_type(h2.events.DataReceived, 1)) > seen or bool(
                c.of_type(h2.events.StreamEnded, 1)
            )

        while not client.of_type(h2.events.StreamEnded, 1):
            await client.wait_for(functools.partial(progress, seen=acked))
            for event in client.of_type(h2.events.DataReceived, 1)[acked:]:
                client.conn.acknowledge_received_data(event.flow_controlled_length, 1)  # type: ignore[attr-defined]
                acked += 1
            client.flush()
        assert client.body(1) == big
        assert client.of_type(h2.events.TrailersReceived, 1)[0].headers == [(b"x-done", b"1")]  # type: ignore[attr-defined]
        await client.close()
