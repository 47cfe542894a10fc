"""The data path's hot-path mechanics: write coalescing, lazy keep-alive and pool idle timers.

These behaviours exist for speed, but a user relies on their semantics: a small response
leaves in one segment, a streamed response's head is never held back waiting for its body,
a busy keep-alive connection is not cut by a stale timer, an idle one is still closed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import cast

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
from dp_rig import VIP, Sidecar, Upstream, event_loop_policy, service, snapshot, wait_for

from meshproxy.config.model import Endpoint, Protocol, RetryPolicy, TrafficPolicy
from meshproxy.core.http import RequestHead, ResponseHead
from meshproxy.io.body import EMPTY, BodyQueue
from meshproxy.io.exchange import BodyStream, DownstreamContext, ResponseSink
from meshproxy.io.http1_client import Http1Client
from meshproxy.io.http1_server import Http1ServerProtocol, Http1Settings
from meshproxy.io.proxy import local_reply_for

__all__ = ["event_loop_policy"]

CTX = DownstreamContext(
    direction="outbound",
    peer_address="127.0.0.1",
    peer_port=40000,
    original_dst_address="127.0.0.1",
    original_dst_port=8080,
    connection_id=1,
)


class RecordingTransport:
    """Enough of ``asyncio.Transport`` for the HTTP/1 server codec; records every write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream() as u:
        yield u


async def test_small_response_head_and_body_leave_in_one_write() -> None:
    async def handler(
        ctx: DownstreamContext, head: RequestHead, body: BodyStream, sink: ResponseSink
    ) -> None:
        await sink.send_head(ResponseHead(status=200, headers=(("content-length", "5"),)))
        await sink.send_data(b"hello")
        await sink.send_end()

    t = RecordingTransport()
    proto = Http1ServerProtocol(handler, CTX, local_reply_for)
    proto.connection_made(t)  # type: ignore[arg-type]
    proto.data_received(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    await wait_for(lambda: len(t.writes) > 0)
    assert len(t.writes) == 1
    assert t.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert t.writes[0].endswith(b"\r\n\r\nhello")
    proto.connection_lost(None)


CASES = [
    # (request, response head, body, trailers, body known empty)
    (
        b"GET / HTTP/1.1\r\nhost: x\r\n\r\n",
        ResponseHead(200, (("content-length", "5"),)),
        b"hello",
        None,
        False,
    ),
    (
        b"GET / HTTP/1.1\r\nhost: x\r\n\r\n",
        ResponseHead(200, (("content-type", "text/plain"),)),
        b"chunk",
        (("x-checksum", "1"),),
        False,
    ),
    (b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", ResponseHead(200, (("x-a", "1"),)), b"", None, True),
    (b"HEAD / HTTP/1.1\r\nhost: x\r\n\r\n", ResponseHead(200, (("content-length", "5"),)), b"", None, False),
    (b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", ResponseHead(204, (), reason="Nothing"), b"", None, True),
    (b"GET / HTTP/1.0\r\nhost: x\r\n\r\n", ResponseHead(200, (("connection", "x"),)), b"old", None, False),
    (
        b"GET / HTTP/1.0\r\nhost: x\r\nconnection: keep-alive\r\n\r\n",
        ResponseHead(200, (("content-length", "3"),)),
        b"old",
        None,
        False,
    ),
    (
        b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        ResponseHead(503, (("connection", "keep-alive"), ("transfer-encoding", "chunked"))),
        b"no",
        None,
        False,
    ),
]


@pytest.mark.parametrize("case", range(len(CASES)))
async def test_a_response_sent_whole_is_the_same_bytes_as_sent_step_by_step(case: int) -> None:
    request, head, data, trailers, empty = CASES[case]

    async def stepwise(ctx: DownstreamContext, h: RequestHead, body: BodyStream, sink: ResponseSink) -> None:
        await sink.send_head(head, end_stream=empty)
        if not empty:
            await sink.send_data(data)
            await sink.send_end(trailers)

    async def whole(ctx: DownstreamContext, h: RequestHead, body: BodyStream, sink: ResponseSink) -> None:
        await sink.send_whole(head, data, trailers, end_stream=empty)  # type: ignore[attr-defined]

    async def wire(handler: object) -> tuple[bytes, bool]:
        t = RecordingTransport()
        proto = Http1ServerProtocol(handler, CTX, local_reply_for)  # type: ignore[arg-type]
        proto.connection_made(t)  # type: ignore[arg-type]
        proto.data_received(request)
        # The handler has returned (and the codec decided keep-alive or close).
        await wait_for(lambda: bool(t.writes) and not proto.in_flight)
        proto.connection_lost(None)
        return b"".join(t.writes), t.closed

    assert await wire(whole) == await wire(stepwise)


async def test_a_streamed_response_head_is_not_held_back_by_a_slow_body() -> None:
    release = asyncio.Event()

    async def handler(
        ctx: DownstreamContext, head: RequestHead, body: BodyStream, sink: ResponseSink
    ) -> None:
        await sink.send_head(ResponseHead(status=200, headers=()))
        await release.wait()  # the first body chunk comes much later (server-sent events, ...)
        await sink.send_data(b"late")
        await sink.send_end()

    t = RecordingTransport()
    proto = Http1ServerProtocol(handler, CTX, local_reply_for)
    proto.connection_made(t)  # type: ignore[arg-type]
    proto.data_received(b"GET /events HTTP/1.1\r\nhost: x\r\n\r\n")
    await wait_for(lambda: len(t.writes) > 0)
    assert t.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"transfer-encoding: chunked" in t.writes[0]
    assert t.writes[0].endswith(b"\r\n\r\n")  # the head alone, before any body byte
    release.set()
    await wait_for(lambda: b"".join(t.writes).endswith(b"0\r\n\r\n"))
    assert b"4\r\nlate\r\n" in b"".join(t.writes)
    proto.connection_lost(None)


async def test_busy_keepalive_connection_outlives_the_idle_timeout_and_an_idle_one_is_closed(
    upstream: Upstream,
) -> None:
    timeout = 0.3
    async with Sidecar(
        snapshot(service(upstream.port)), (VIP, 80), http1=Http1Settings(keepalive_timeout=timeout)
    ) as sc:
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.listener.port)
        start = time.monotonic()
        # Requests spaced below the timeout, for well over one timeout period: one connection.
        while time.monotonic() - start < 3 * timeout:
            writer.write(b"GET /hello HTTP/1.1\r\nhost: web\r\n\r\n")
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 ")
            assert await asyncio.wait_for(reader.readexactly(6), 5) == b"hello\n"
            idle_from = time.monotonic()
            await asyncio.sleep(timeout / 3)  # the client's think time: the thing under test
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the proxy
        idle_for = time.monotonic() - idle_from
        assert timeout * 0.8 <= idle_for < timeout + 2.0
        writer.close()


async def test_pooled_upstream_connection_is_reused_while_busy_and_closed_once_idle(
    upstream: Upstream,
) -> None:
    svc = service(upstream.port, policy=TrafficPolicy(idle_timeout=0.3))
    async with (
        Sidecar(snapshot(svc), (VIP, 80)) as sc,
        httpx.AsyncClient(base_url=sc.url) as http,
    ):
        start = time.monotonic()
        while time.monotonic() - start < 0.9:
            assert (await http.get("/hello")).status_code == 200
            await asyncio.sleep(0.1)  # think time below the service's idle_timeout
        assert sc.client.connects == 1
        key = ("127.0.0.1", upstream.port)
        assert sc.client.idle_count(key) == 1
        await wait_for(lambda: sc.client.idle_count(key) == 0, within=5.0)


class _H2Recorder(asyncio.Protocol):
    """An HTTP/2 upstream (the h2 library, not our codec) that keeps the events each request
    arrived as, and answers every request 200 with its body echoed."""

    def __init__(self, events: list[h2.events.Event]) -> None:
        self.events = events
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        self.bodies: dict[int, bytes] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.conn.initiate_connection()
        self.transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        for event in self.conn.receive_data(data):
            self.events.append(event)
            if isinstance(event, h2.events.DataReceived):
                self.bodies[event.stream_id] = self.bodies.get(event.stream_id, b"") + event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if isinstance(event, h2.events.StreamEnded):
                self.conn.send_headers(event.stream_id, [(":status", "200")])
                self.conn.send_data(event.stream_id, self.bodies.pop(event.stream_id, b""), end_stream=True)
        self.transport.write(self.conn.data_to_send())


@pytest.mark.parametrize("retried", [False, True], ids=["plain", "with-a-retry-policy"])
async def test_a_request_body_that_arrived_whole_goes_upstream_as_one_data_frame_with_end_stream(
    retried: bool,
) -> None:
    # A unary gRPC call's message arrives with its HEADERS; the upstream gets HEADERS and one
    # DATA frame carrying END_STREAM (no empty DATA frame after it, no pump task), also when
    # a retry policy keeps the body for a second try.
    events: list[h2.events.Event] = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _H2Recorder(events), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    retry = RetryPolicy(attempts=2, backoff_base=0.001, backoff_max=0.002) if retried else None
    policy = TrafficPolicy(retry=retry, outlier_detection=None)
    snap = snapshot(service(port, protocol=Protocol.HTTP2, policy=policy))
    try:
        async with (
            Sidecar(snap, (VIP, 80), http2_upstreams=True) as sc,
            httpx.AsyncClient(base_url=sc.url, http1=False, http2=True) as client,
        ):
            message = b"\0\0\0\0\x05hello"
            r = await client.post(
                "/pkg.Svc/Call", content=message, headers={"content-type": "application/grpc"}
            )
            assert r.status_code == 200
            assert r.content == message
    finally:
        server.close()
    data = [e for e in events if isinstance(e, h2.events.DataReceived)]
    assert len(data) == 1, data
    assert data[0].data == message
    assert data[0].stream_ended is not None  # END_STREAM on that DATA frame


class _WriteRecorder:
    """Wraps a transport: keeps every ``write`` apart, forwards everything."""

    def __init__(self, inner: asyncio.Transport) -> None:
        self._inner = inner
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self._inner.write(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)


async def test_a_post_body_that_arrived_whole_leaves_with_its_head_in_one_write(upstream: Upstream) -> None:
    # A small POST usually arrives with its head; the HTTP/1.1 client writes both at once
    # (no upload task, one segment), and the upstream gets the body.
    client = Http1Client()
    ep = Endpoint(address="127.0.0.1", port=upstream.port)
    try:
        first = await client.request(ep, RequestHead("GET", "/hello", "up", ()), EMPTY, connect_timeout=1)
        while await first.body.read():
            pass
        (conn,) = client._idle[(ep.address, ep.port)]
        assert conn.transport is not None
        recorder = _WriteRecorder(conn.transport)
        conn.transport = cast(asyncio.Transport, recorder)
        body = BodyQueue(high_water=1 << 16, pause=lambda: None, resume=lambda: None, content_length=7)
        body.feed(b"payload")
        body.feed_end(None)
        head = RequestHead("POST", "/echo", "up", (("content-length", "7"),))
        resp = await client.request(ep, head, body, connect_timeout=1)
        echoed = b""
        while chunk := await resp.body.read():
            echoed += chunk
    finally:
        await client.close()
    assert echoed == b"payload"
    assert len(recorder.writes) == 1
    assert recorder.writes[0].startswith(b"POST /echo HTTP/1.1\r\n")
    assert recorder.writes[0].endswith(b"\r\n\r\npayload")
