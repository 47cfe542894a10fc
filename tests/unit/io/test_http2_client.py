"""Http2Client on loopback, against our own HTTP/2 server and against misbehaving peers."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import h2.config
import h2.connection
import pytest
import uvloop
from hyperframe.frame import Frame

from meshproxy.config.model import CircuitBreaker, Endpoint
from meshproxy.core.breaker import Breaker, Limit
from meshproxy.core.clock import FakeClock
from meshproxy.core.errors import UpstreamConnectError, UpstreamOverflowError, UpstreamResetError
from meshproxy.core.http import Headers, RequestHead, ResponseHead
from meshproxy.io.body import BytesBody, known_length
from meshproxy.io.exchange import BodyStream, DownstreamContext, ResponseSink
from meshproxy.io.http2_client import Http2Client, Http2ClientSettings, Http2ResponseBody
from meshproxy.io.http2_common import InboundBody
from meshproxy.io.http2_server import Http2ServerConnection, Http2ServerSettings

Handler = Callable[[DownstreamContext, RequestHead, BodyStream, ResponseSink], Awaitable[None]]


class Body:
    """A request ``BodyStream`` fed by the test."""

    def __init__(self, chunks: list[bytes] | None = None, trailers: Headers | None = None) -> None:
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        for chunk in chunks or []:
            self._queue.put_nowait(chunk)
        if chunks is not None:
            self._queue.put_nowait(b"")
        self._trailers = trailers

    def feed(self, chunk: bytes) -> None:
        self._queue.put_nowait(chunk)

    async def read(self) -> bytes:
        return await self._queue.get()

    @property
    def trailers(self) -> Headers | None:
        return self._trailers


def empty() -> Body:
    return Body([])


@dataclass
class Upstream:
    endpoint: Endpoint
    connections: list[Http2ServerConnection] = field(default_factory=list)


@asynccontextmanager
async def upstream(handler: Handler, settings: Http2ServerSettings | None = None) -> AsyncIterator[Upstream]:
    up = Upstream(Endpoint("127.0.0.1", 0))

    def factory() -> Http2ServerConnection:
        ctx = DownstreamContext("inbound", "127.0.0.1", 0, "127.0.0.1", 0, len(up.connections) + 1)
        conn = Http2ServerConnection(handler, ctx, settings)
        up.connections.append(conn)
        return conn

    listener = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    up.endpoint = Endpoint("127.0.0.1", listener.sockets[0].getsockname()[1])
    try:
        yield up
    finally:
        listener.close()
        for conn in up.connections:
            conn.close_transport(linger=0)
            await conn.wait_closed()


@asynccontextmanager
async def client(settings: Http2ClientSettings | None = None) -> AsyncIterator[Http2Client]:
    c = Http2Client(settings)
    try:
        yield c
    finally:
        await c.aclose()


def get(path: str = "/", headers: Headers = ()) -> RequestHead:
    return RequestHead("GET", path, "svc.demo:80", headers)


async def read_all(body: BodyStream) -> bytes:
    chunks = []
    while chunk := await body.read():
        chunks.append(chunk)
    return b"".join(chunks)


async def eventually(predicate: Callable[[], bool], within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 - state of sockets/pools, nothing to await
            await asyncio.sleep(0.01)


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    """Run every test on both event loops the sidecar supports."""
    if request.param == "uvloop":
        policy: asyncio.AbstractEventLoopPolicy = uvloop.EventLoopPolicy()
        return policy
    return asyncio.DefaultEventLoopPolicy()


# --- tests ----------------------------------------------------------------------------------


async def test_streams_request_body_and_trailers_and_returns_head_before_body() -> None:
    release = asyncio.Event()
    seen: list[object] = []

    async def handler(
        ctx: DownstreamContext, head: RequestHead, body: BodyStream, sink: ResponseSink
    ) -> None:
        seen.append((head.method, head.path, head.authority, head.header("x-a"), head.header("connection")))
        data = await read_all(body)
        seen.append((data, body.trailers))
        await sink.send_head(ResponseHead(200, (("x-len", str(len(data))),)))
        await sink.send_data(b"part1")
        await release.wait()
        await sink.send_data(b"part2")
        await sink.send_end((("grpc-status", "0"),))

    async with upstream(handler) as up, client() as c:
        body = Body()
        head = RequestHead("POST", "/p?q", "svc.demo:80", (("x-a", "1"), ("connection", "close")))
        pending = asyncio.get_running_loop().create_task(
            c.request(up.endpoint, head, body, connect_timeout=1), name="req"
        )
        body.feed(b"a" * 100_000)
        body.feed(b"b")
        body._trailers = (("x-sum", "ok"),)
        body.feed(b"")
        response = await pending  # head arrives while the upstream still holds the rest of the body
        assert response.head.status == 200
        assert response.head.header("x-len") == "100001"
        assert await response.body.read() == b"part1"
        release.set()
        assert await read_all(response.body) == b"part2"
        assert response.body.trailers == (("grpc-status", "0"),)
    assert seen == [("POST", "/p?q", "svc.demo:80", "1", None), (b"a" * 100_000 + b"b", (("x-sum", "ok"),))]


async def test_honours_max_concurrent_streams_by_waiting() -> None:
    gate = asyncio.Event()
    active = 0
    peak = 0

    async def handler(
        ctx: DownstreamContext, head: RequestHead, body: BodyStream, sink: ResponseSink
    ) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await gate.wait()
        active -= 1
        await sink.send_head(ResponseHead(200, ()), end_stream=True)

    settings = Http2ClientSettings(max_connections_per_endpoint=1)
    async with upstream(handler, Http2ServerSettings(max_concurrent_streams=1)) as up, client(settings) as c:
        loop = asyncio.get_running_loop()
        tasks = [
            loop.create_task(c.request(up.endpoint, get(f"/{i}"), empty(), connect_timeout=1), name=f"r{i}")
            for i in range(3)
        ]
        await eventually(lambda: active == 1)
        gate.set()
        responses = await asyncio.gather(*tasks)
        assert [r.head.status for r in responses] == [200, 200, 200]
        assert peak == 1
        assert len(up.connections) == 1


async def test_opens_more_connections_when_streams_are_exhausted() -> None:
    gate = asyncio.Event()
    active = 0

    async def handler(
        ctx: DownstreamContext, head: RequestHead, body: BodyStream, sink: ResponseSink
    ) -> None:
        nonlocal active
        active += 1
        await gate.wait()
        await sink.send_head(ResponseHead(200, ()), end_stream=True)

    settings = Http2ClientSettings(max_connections_per_endpoint=2)
    async with upstream(handler, Http2ServerSettings(max_concurrent_streams=1)) as up, client(settings) as c:
        loop = asyncio.get_running_loop()
        tasks = [
            loop.create_task(c.request(up.endpoint, get(f"/{i}"), empty(), connect_timeout=1), name=f"r{i}")
            for i in range(2)
        ]
        await eventually(lambda: active == 2)  # both ran at once: on two connections
        gate.set()
        await asyncio.gather(*tasks)
        assert len(up.connections) == 2
        assert c.connection_count(up.endpoint) == 2


async def test_connection_refused_is_a_connect_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        async with client() as c:
            with pytest.raises(UpstreamConnectError):
                await c.request(Endpoint("127.0.0.1", port), get(), empty(), connect_timeout=1)


async def test_peer_that_never_speaks_http2_times_out_as_connect_error() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts, reads, never answers (no SETTINGS)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, client() as c:
        with pytest.raises(UpstreamConnectError, match="timeout"):
            await c.request(Endpoint("127.0.0.1", port), get(), empty(), connect_timeout=0.2)


async def test_reset_before_head_and_after_head() -> None:
    async def handler(
        ctx: DownstreamContext, head: RequestHead, body: BodyStream, sink: ResponseSink
    ) -> None:
        if head.path == "/early":
            await sink.reset()
            return
        await sink.send_head(ResponseHead(200, ()))
        await sink.send_data(b"some")
        await sink.reset()

    async with upstream(handler) as up, client() as c:
        with pytest.raises(UpstreamResetError):
            await c.request(up.endpoint, get("/early"), empty(), connect_timeout=1)
        response = await c.request(up.endpoint, get("/late"), empty(), connect_timeout=1)
        assert response.head.status == 200
        with pytest.raises(UpstreamResetError):
            await read_all(response.body)
        # The connection survives stream resets.
        assert c.connection_count(up.endpoint) == 1


async def test_connection_lost_before_head_is_a_reset() -> None:
    async def handler(
        ctx: DownstreamContext, head: RequestHead, body: BodyStream, sink: ResponseSink
    ) -> None:
        for conn in up.connections:
            conn.close_transport(linger=0)  # the upstream process dies mid-request
        await asyncio.Event().wait()

    async with upstream(handler) as up, client() as c:
        with pytest.raises(UpstreamResetError):
            await c.request(up.endpoint, get(), empty(), connect_timeout=1)


async def test_server_goaway_lets_inflight_finish_and_moves_new_requests() -> None:
    started = asyncio.Event()
    release = asyncio.Event()

    async def handler(
        ctx: DownstreamContext, head: RequestHead, body: BodyStream, sink: ResponseSink
    ) -> None:
        if head.path == "/slow":
            started.set()
            await release.wait()
        await sink.send_head(ResponseHead(200, ()))
        await sink.send_data(head.path.encode())
        await sink.send_end()

    async with upstream(handler) as up, client() as c:
        loop = asyncio.get_running_loop()
        slow = loop.create_task(c.request(up.endpoint, get("/slow"), empty(), connect_timeout=1), name="slow")
        async with asyncio.timeout(5):
            await started.wait()
        up.connections[0].start_drain()  # GOAWAY, graceful
        await eventually(lambda: c.connection_count(up.endpoint) == 0)
        fresh = await c.request(up.endpoint, get("/fresh"), empty(), connect_timeout=1)
        assert await read_all(fresh.body) == b"/fresh"
        assert len(up.connections) == 2
        release.set()
        response = await slow
        assert await read_all(response.body) == b"/slow"
        await up.connections[0].wait_closed()  # closed once its last stream was done


async def test_idle_connection_is_closed() -> None:
    async def handler(
        ctx: DownstreamContext, head: RequestHead, body: BodyStream, sink: ResponseSink
    ) -> None:
        await sink.send_head(ResponseHead(200, ()), end_stream=True)

    async with upstream(handler) as up, client(Http2ClientSettings(idle_timeout=0.2)) as c:
        response = await c.request(up.endpoint, get(), empty(), connect_timeout=1)
        assert await read_all(response.body) == b""
        assert c.connection_count(up.endpoint) == 1
        await eventually(lambda: c.connection_count(up.endpoint) == 0)
        await up.connections[0].wait_closed()


async def test_the_destinations_idle_timeout_overrides_the_client_default() -> None:
    async def handler(
        ctx: DownstreamContext, head: RequestHead, body: BodyStream, sink: ResponseSink
    ) -> None:
        await sink.send_head(ResponseHead(200, ()), end_stream=True)

    # The client default (60 s) would keep the connection for the whole test; the service's
    # TrafficPolicy.idle_timeout passed with the request closes it.
    async with upstream(handler) as up, client(Http2ClientSettings(idle_timeout=60.0)) as c:
        response = await c.request(up.endpoint, get(), empty(), connect_timeout=1, idle_timeout=0.2)
        assert await read_all(response.body) == b""
        assert c.connection_count(up.endpoint) == 1
        await eventually(lambda: c.connection_count(up.endpoint) == 0)


async def test_the_services_connection_budget_limits_new_connections() -> None:
    async def handler(
        ctx: DownstreamContext, head: RequestHead, body: BodyStream, sink: ResponseSink
    ) -> None:
        await sink.send_head(ResponseHead(200, ()), end_stream=True)

    limits = Breaker("svc.demo:80", CircuitBreaker(max_connections=1, max_pending_requests=0), FakeClock())
    async with upstream(handler) as a, upstream(handler) as b, client() as c:
        r = await c.request(a.endpoint, get(), empty(), connect_timeout=1, limits=limits)
        assert await read_all(r.body) == b""
        assert limits.count(Limit.CONNECTIONS) == 1
        # A second endpoint would need a second connection: no slot, no pending slot -> UO.
        with pytest.raises(UpstreamOverflowError):
            await c.request(b.endpoint, get(), empty(), connect_timeout=1, limits=limits)
        # The existing connection still multiplexes new streams.
        r = await c.request(a.endpoint, get(), empty(), connect_timeout=1, limits=limits)
        assert await read_all(r.body) == b""
        assert c.connection_count(a.endpoint) == 1 and c.connection_count(b.endpoint) == 0
    await eventually(lambda: limits.count(Limit.CONNECTIONS) == 0)


async def test_abandoned_response_resets_upstream_stream() -> None:
    cancelled = asyncio.Event()

    async def handler(
        ctx: DownstreamContext, head: RequestHead, body: BodyStream, sink: ResponseSink
    ) -> None:
        await sink.send_head(ResponseHead(200, ()))
        try:
            while True:
                await sink.send_data(b"x" * 16384)  # blocks once our window is full
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with upstream(handler) as up, client() as c:
        response = await c.request(up.endpoint, get(), empty(), connect_timeout=1)
        assert await response.body.read()
        del response  # the pipeline dropped it without aclose(): the finalizer resets the stream
        async with asyncio.timeout(5):
            await cancelled.wait()


async def test_keepalive_closes_connection_to_a_peer_that_stops_answering() -> None:
    async def zombie(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Says hello (SETTINGS) and then never answers anything, PINGs included.
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        await reader.read()
        writer.close()

    server = await asyncio.start_server(zombie, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = Http2ClientSettings(keepalive_interval=0.1, keepalive_timeout=0.2)
    async with server, client(settings) as c:
        with pytest.raises(UpstreamResetError):
            async with asyncio.timeout(5):  # without keepalive this would wait forever
                await c.request(Endpoint("127.0.0.1", port), get(), empty(), connect_timeout=1)


async def test_known_empty_body_is_sent_as_end_stream_on_headers() -> None:
    seen: list[object] = []

    async def handler(
        ctx: DownstreamContext, head: RequestHead, body: BodyStream, sink: ResponseSink
    ) -> None:
        # END_STREAM on HEADERS is visible to the server as a body already known to be empty.
        seen.append(known_length(body))
        seen.append(await body.read())
        await sink.send_head(ResponseHead(204, ()), end_stream=True)

    async with upstream(handler) as up, client() as c:
        response = await c.request(up.endpoint, get(), BytesBody(b""), connect_timeout=1)
        assert response.head.status == 204
        assert known_length(response.body) == 0  # lets the pipeline forward a single HEADERS frame
        assert await response.body.read() == b""
    assert seen == [0, b""]  # None would mean "unknown"


class _RecordingTransport(asyncio.Transport):
    """Forwards to the real transport and keeps every ``write`` apart."""

    def __init__(self, inner: asyncio.Transport) -> None:
        super().__init__()
        self._inner = inner
        self.writes: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))
        self._inner.write(data)

    def is_closing(self) -> bool:
        return self._inner.is_closing()

    def close(self) -> None:
        self._inner.close()

    def can_write_eof(self) -> bool:
        return self._inner.can_write_eof()

    def write_eof(self) -> None:
        self._inner.write_eof()


def _frames_in(data: bytes) -> list[tuple[str, int, set[str]]]:
    out = []
    while data:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        out.append((frame.__class__.__name__, frame.stream_id, set(frame.flags)))
        data = data[9 + length :]
    return out


async def test_a_request_whose_body_is_already_here_leaves_in_one_write() -> None:
    # A gRPC unary call: HEADERS, DATA and END_STREAM in one write wakes the server once.
    async def handler(
        ctx: DownstreamContext, head: RequestHead, body: BodyStream, sink: ResponseSink
    ) -> None:
        data = await read_all(body)
        await sink.send_head(ResponseHead(200, ()))
        await sink.send_data(data)
        await sink.send_end((("grpc-status", "0"),))

    async with upstream(handler) as up, client() as c:
        first = await c.request(up.endpoint, get(), empty(), connect_timeout=1)  # connects
        await read_all(first.body)
        conn = c._pools[(up.endpoint.address, up.endpoint.port)].conns[0]
        assert conn._transport is not None
        recording = _RecordingTransport(conn._transport)
        conn._transport = recording
        message = b"\0\0\0\0\x05hello"
        head = RequestHead("POST", "/pkg.Svc/Call", "svc.demo:80", (("content-type", "application/grpc"),))
        response = await c.request(up.endpoint, head, Body([message]), connect_timeout=1)
        assert await read_all(response.body) == message
        assert response.body.trailers == (("grpc-status", "0"),)
    request_frames = _frames_in(recording.writes[0])
    assert request_frames[0][0] == "HeadersFrame"
    assert "DataFrame" in {name for name, _, _ in request_frames}
    assert "END_STREAM" in request_frames[-1][2]  # the whole request, END_STREAM included


async def test_a_connection_used_again_within_its_idle_timeout_stays_open() -> None:
    async def handler(
        ctx: DownstreamContext, head: RequestHead, body: BodyStream, sink: ResponseSink
    ) -> None:
        await sink.send_head(ResponseHead(200, ()), end_stream=True)

    async with upstream(handler) as up, client(Http2ClientSettings(idle_timeout=0.5)) as c:
        for _ in range(2):  # idle from t=0, busy again at t=0.3, idle again after that
            response = await c.request(up.endpoint, get(), empty(), connect_timeout=1)
            assert await read_all(response.body) == b""
            await asyncio.sleep(0.3)  # the passing of time under test, not synchronisation
        # t=0.6: past 0.5 s since the connection first went idle, 0.3 s since it last did.
        assert c.connection_count(up.endpoint) == 1
        assert len(up.connections) == 1
        await eventually(lambda: c.connection_count(up.endpoint) == 0)  # then it does close


def _arrived(data: bytes, trailers: Headers | None = None) -> InboundBody:
    """A request body that has all arrived, as the HTTP/2 server hands a unary gRPC call on."""
    body = InboundBody(lambda n: None)
    body.push(data, len(data))
    body.finish(trailers)
    return body


@pytest.mark.parametrize("trailers", [None, (("x-checksum", "abc"),)])
async def test_a_request_body_that_has_all_arrived_is_sent_without_a_pump(trailers: Headers | None) -> None:
    got: list[object] = []

    async def handler(
        ctx: DownstreamContext, head: RequestHead, body: BodyStream, sink: ResponseSink
    ) -> None:
        got.append(await read_all(body))
        got.append(body.trailers)
        await sink.send_head(ResponseHead(200, ()), end_stream=True)

    async with upstream(handler) as up, client() as c:
        first = await c.request(up.endpoint, get(), empty(), connect_timeout=1)  # connects
        await read_all(first.body)
        got.clear()
        conn = c._pools[(up.endpoint.address, up.endpoint.port)].conns[0]
        assert conn._transport is not None
        recording = _RecordingTransport(conn._transport)
        conn._transport = recording
        head = RequestHead("POST", "/pkg.Svc/Call", "svc.demo:80", (("content-type", "application/grpc"),))
        response = await c.request(
            up.endpoint, head, _arrived(b"\0\0\0\0\x02hi", trailers), connect_timeout=1
        )
        assert await read_all(response.body) == b""
    assert got == [b"\0\0\0\0\x02hi", trailers]
    frames = [(name, flags) for name, _, flags in _frames_in(recording.writes[0])]
    if trailers is None:  # END_STREAM rides on the one DATA frame
        assert frames == [("HeadersFrame", {"END_HEADERS"}), ("DataFrame", {"END_STREAM"})]
    else:
        assert frames == [
            ("HeadersFrame", {"END_HEADERS"}),
            ("DataFrame", set()),
            ("HeadersFrame", {"END_HEADERS", "END_STREAM"}),
        ]


async def test_an_arrived_request_body_larger_than_the_servers_window_still_goes_in_full() -> None:
    big = bytes(range(256)) * 64  # 16 KiB against a 4 KiB stream window

    async def handler(
        ctx: DownstreamContext, head: RequestHead, body: BodyStream, sink: ResponseSink
    ) -> None:
        data = await read_all(body)
        await sink.send_head(
            ResponseHead(200, (("x-len", str(len(data))), ("x-same", str(data == big)))), end_stream=True
        )

    async with upstream(handler, Http2ServerSettings(initial_window_size=4096)) as up, client() as c:
        response = await c.request(up.endpoint, get(), _arrived(big, (("x-t", "1"),)), connect_timeout=1)
        assert response.head.header("x-len") == str(len(big))
        assert response.head.header("x-same") == "True"


async def test_a_response_that_has_all_arrived_can_be_taken_whole() -> None:
    release = asyncio.Event()

    async def handler(
        ctx: DownstreamContext, head: RequestHead, body: BodyStream, sink: ResponseSink
    ) -> None:
        await sink.send_head(ResponseHead(200, (("content-type", "application/grpc"),)))
        await sink.send_data(b"\0\0\0\0\x01a")
        await release.wait()
        await sink.send_data(b"\0\0\0\0\x01b")
        await sink.send_end((("grpc-status", "0"),))

    async with upstream(handler) as up, client() as c:
        response = await c.request(up.endpoint, get(), empty(), connect_timeout=1)
        body = response.body
        assert isinstance(body, Http2ResponseBody)
        assert not body.complete
        assert body.take_complete() is None  # more may come: read chunk by chunk
        release.set()
        await eventually(lambda: body.complete)
        assert body.take_complete() == b"\0\0\0\0\x01a\0\0\0\0\x01b"
        assert body.trailers == (("grpc-status", "0"),)
        assert await body.read() == b""
