"""gRPC end to end through the HTTP/2 codecs, on loopback (no root needed).

    grpcio client --h2c--> [Http2ServerConnection -> pass-through handler -> Http2Client] --h2c--> grpcio server

The pass-through handler stands in for the request pipeline (meshproxy.io.proxy): it
forwards head, body and trailers unchanged, and maps upstream resets to RST_STREAM, so
what the gRPC client sees is what our two codecs did to the exchange.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import cast

import grpc
import grpc.aio
import pytest
import uvloop

from meshproxy.config.model import Endpoint
from meshproxy.core.errors import UpstreamConnectError, UpstreamResetError
from meshproxy.core.h2util import PREFACE
from meshproxy.core.http import RequestHead, ResponseHead, end_to_end
from meshproxy.io.exchange import BodyStream, DownstreamContext, ResponseSink
from meshproxy.io.http2_client import Http2Client, Http2ResponseBody
from meshproxy.io.http2_server import Http2ServerConnection, serve_http2

MAX_MESSAGE = 32 * 1024 * 1024
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
]


async def eventually(predicate: Callable[[], bool], within: float = 5.0) -> None:
    """Poll ``predicate`` until true, failing after ``within`` seconds.

    Polling, not an Event: the conditions are state of grpcio's server and of the
    connections, which offer nothing to await.
    """
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


# --- the upstream gRPC service ------------------------------------------------------------


@dataclass
class ServiceState:
    cancelled: list[str] = field(default_factory=list)  # handlers that saw their RPC cancelled
    metadata: list[tuple[tuple[str, str | bytes], ...]] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)  # releases "Gate" calls
    gated: int = 0  # "Gate" calls waiting


def make_service(state: ServiceState) -> grpc.GenericRpcHandler:
    async def unary(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        state.metadata.append(tuple((k, v) for k, v in context.invocation_metadata() or ()))
        return b"echo:" + request

    async def big(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        # Reply with a message as large as asked for, derived from the request bytes.
        size = int(request.split(b":", 1)[0])
        pattern = request.split(b":", 1)[1]
        return (pattern * (size // len(pattern) + 1))[:size]

    async def count(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncIterator[bytes]:
        for i in range(int(request)):
            yield f"message {i}".encode()

    async def forever(
        request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        try:
            for i in itertools.count():
                yield f"tick {i}".encode()
        finally:  # infinite: only a cancelled RPC gets here (CancelledError or GeneratorExit)
            state.cancelled.append("forever")

    async def hang(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            state.cancelled.append("hang")
            raise
        return b""

    async def gate(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        state.gated += 1
        await state.gate.wait()
        return b"through:" + request

    async def fail(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        await context.abort(grpc.StatusCode.NOT_FOUND, "no widget named " + request.decode())
        return b""

    async def fail_late(
        request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        yield b"first"
        context.set_trailing_metadata((("x-detail", "late-failure"),))
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "stopped after one message")

    async def bidi(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        async for message in requests:
            yield message.upper()

    async def sum_sizes(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> bytes:
        total = 0
        async for message in requests:
            total += len(message)
        return str(total).encode()

    return grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Big": grpc.unary_unary_rpc_method_handler(big),
            "Count": grpc.unary_stream_rpc_method_handler(count),
            "Forever": grpc.unary_stream_rpc_method_handler(forever),
            "Hang": grpc.unary_unary_rpc_method_handler(hang),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
            "Gate": grpc.unary_unary_rpc_method_handler(gate),
            "FailLate": grpc.unary_stream_rpc_method_handler(fail_late),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
            "SumSizes": grpc.stream_unary_rpc_method_handler(sum_sizes),
        },
    )


# --- the proxy under test -----------------------------------------------------------------


def passthrough(
    client: Http2Client, endpoint: Endpoint
) -> Callable[[DownstreamContext, RequestHead, BodyStream, ResponseSink], Awaitable[None]]:
    """Stand-in for the request pipeline: forward everything, map upstream failures."""

    async def handler(
        ctx: DownstreamContext, head: RequestHead, body: BodyStream, sink: ResponseSink
    ) -> None:
        upstream_head = head.with_headers(end_to_end(head.headers, keep_te_trailers=True))
        try:
            response = await client.request(endpoint, upstream_head, body, connect_timeout=2.0)
        except UpstreamConnectError:
            await sink.send_head(ResponseHead(503, (("content-type", "text/plain"),), version="2"))
            await sink.send_data(b"upstream connect error")
            await sink.send_end()
            return
        except UpstreamResetError:
            await sink.reset()
            return
        assert isinstance(response.body, Http2ResponseBody)
        try:
            await sink.send_head(response.head)
            while chunk := await response.body.read():
                await sink.send_data(chunk)
            await sink.send_end(response.body.trailers)
        except UpstreamResetError:
            await sink.reset()
        finally:
            await response.body.aclose()

    return handler


class _Sniffer(asyncio.Protocol):
    """What the listener does: read the preface, then hand the transport to HTTP/2."""

    def __init__(self, proxy: Proxy) -> None:
        self._proxy = proxy
        self._buf = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) < len(PREFACE):
            return
        assert self._buf.startswith(PREFACE), self._buf
        assert self._transport is not None
        peer = self._transport.get_extra_info("peername")
        ctx = DownstreamContext("inbound", peer[0], peer[1], "127.0.0.1", 0, len(self._proxy.connections) + 1)
        conn = serve_http2(self._transport, self._buf, self._proxy.handler, ctx)
        self._proxy.connections.append(conn)


@dataclass
class Proxy:
    port: int
    handler: Callable[[DownstreamContext, RequestHead, BodyStream, ResponseSink], Awaitable[None]]
    client: Http2Client
    upstream: Endpoint
    connections: list[Http2ServerConnection] = field(default_factory=list)


@asynccontextmanager
async def mesh() -> AsyncIterator[tuple[Proxy, ServiceState]]:
    state = ServiceState()
    server = grpc.aio.server(options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((make_service(state),))
    upstream_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = Http2Client()
    upstream = Endpoint("127.0.0.1", upstream_port)
    proxy = Proxy(0, passthrough(client, upstream), client, upstream)
    listener = await asyncio.get_running_loop().create_server(lambda: _Sniffer(proxy), "127.0.0.1", 0)
    proxy.port = listener.sockets[0].getsockname()[1]
    try:
        yield proxy, state
    finally:
        listener.close()
        for conn in proxy.connections:
            await conn.shutdown(1.0)
        await client.aclose()
        await server.stop(None)


@asynccontextmanager
async def channel(proxy: Proxy) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.port}", options=GRPC_OPTIONS) as ch:
        yield ch


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    """Run every test on both event loops the sidecar supports."""
    if request.param == "uvloop":
        return uvloop.EventLoopPolicy()
    return asyncio.DefaultEventLoopPolicy()


# --- tests ----------------------------------------------------------------------------------


async def test_unary_call_and_metadata_pass_through() -> None:
    async with mesh() as (proxy, state), channel(proxy) as ch:
        call = ch.unary_unary("/test.Echo/Unary")(b"hello", metadata=(("x-tenant", "blue"),), timeout=5)
        assert await call == b"echo:hello"
        assert await call.code() == grpc.StatusCode.OK
        assert ("x-tenant", "blue") in state.metadata[0]


async def test_many_concurrent_unary_calls_share_one_upstream_connection() -> None:
    async with mesh() as (proxy, _state), channel(proxy) as ch:
        method = ch.unary_unary("/test.Echo/Unary")
        replies = await asyncio.gather(*(method(str(i).encode(), timeout=10) for i in range(50)))
        assert replies == [f"echo:{i}".encode() for i in range(50)]
        assert proxy.client.connection_count(proxy.upstream) == 1
        # Nothing is left behind: every stream was finished and forgotten on both sides.
        await eventually(lambda: proxy.client.active_streams(proxy.upstream) == 0)
        await eventually(lambda: all(c.active_streams == 0 for c in proxy.connections))


async def test_server_streaming_many_messages() -> None:
    async with mesh() as (proxy, _state), channel(proxy) as ch:
        call = ch.unary_stream("/test.Echo/Count")(b"2000", timeout=20)
        received = [m async for m in call]
        assert received == [f"message {i}".encode() for i in range(2000)]
        assert await call.code() == grpc.StatusCode.OK


async def test_large_messages_both_ways_respect_flow_control() -> None:
    # 6 MB up and 7 MB down: far beyond every HTTP/2 window on both hops.
    async with mesh() as (proxy, _state), channel(proxy) as ch:
        upload = bytes(range(256)) * (6 * 1024 * 1024 // 256)
        total = await ch.stream_unary("/test.Echo/SumSizes")(iter([upload, b"x"]), timeout=30)
        assert total == str(len(upload) + 1).encode()
        reply = await ch.unary_unary("/test.Echo/Big")(b"7340032:abcdefg", timeout=30)
        assert len(reply) == 7340032
        assert reply[:14] == b"abcdefgabcdefg"


async def test_bidi_streaming_echoes_in_order() -> None:
    async with mesh() as (proxy, _state), channel(proxy) as ch:
        call = ch.stream_stream("/test.Echo/Bidi")(timeout=10)
        for word in (b"alpha", b"beta", b"gamma"):
            await call.write(word)
            assert await call.read() == word.upper()  # one at a time: proves streaming, not batching
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK


async def test_error_status_and_message_preserved() -> None:
    async with mesh() as (proxy, _state), channel(proxy) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary("/test.Echo/Fail")(b"sprocket", timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert err.value.details() == "no widget named sprocket"


async def test_error_after_messages_keeps_trailers() -> None:
    async with mesh() as (proxy, _state), channel(proxy) as ch:
        call = ch.unary_stream("/test.Echo/FailLate")(b"", timeout=5)
        received = []
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for message in call:
                received.append(message)
        assert received == [b"first"]
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert err.value.details() == "stopped after one message"
        assert ("x-detail", "late-failure") in tuple(err.value.trailing_metadata() or ())


async def test_deadline_exceeded_cancels_upstream() -> None:
    async with mesh() as (proxy, state), channel(proxy) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary("/test.Echo/Hang")(b"", timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The deadline travels as grpc-timeout, and the client's RST_STREAM travels up:
        # either way the upstream handler must end up cancelled.
        await eventually(lambda: "hang" in state.cancelled)
        await eventually(lambda: proxy.client.active_streams(proxy.upstream) == 0)


async def test_client_cancellation_propagates_upstream_as_reset() -> None:
    async with mesh() as (proxy, state), channel(proxy) as ch:
        call = ch.unary_stream("/test.Echo/Forever")(b"")  # no deadline: only the reset can stop it
        seen = 0
        async for _message in call:
            seen += 1
            if seen == 3:
                break
        call.cancel()
        await eventually(lambda: "forever" in state.cancelled)
        await eventually(lambda: all(c.active_streams == 0 for c in proxy.connections))
        await eventually(lambda: proxy.client.active_streams(proxy.upstream) == 0)
        # The upstream connection survives the reset and serves the next call.
        assert await ch.unary_unary("/test.Echo/Unary")(b"again", timeout=5) == b"echo:again"


async def test_unreachable_upstream_is_reported_not_hung() -> None:
    async with mesh() as (proxy, _state):
        # Point the handler at a port nobody listens on.
        with_dead = passthrough(proxy.client, Endpoint("127.0.0.1", _free_port()))
        proxy.handler = with_dead
        async with channel(proxy) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await ch.unary_unary("/test.Echo/Unary")(b"x", timeout=5)
            # HTTP 503 without grpc-status maps to UNAVAILABLE in every gRPC client.
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_graceful_shutdown_finishes_inflight_call_and_client_reconnects() -> None:
    async with mesh() as (proxy, state), channel(proxy) as ch:
        loop = asyncio.get_running_loop()
        inflight = ch.unary_unary("/test.Echo/Gate")(b"a", timeout=10)  # runs from here on
        await eventually(lambda: state.gated == 1)
        (conn,) = proxy.connections
        shutdown = loop.create_task(conn.shutdown(10.0), name="proxy-conn-shutdown")
        await eventually(lambda: conn.draining)  # GOAWAY sent while the call is in flight
        # The in-flight call is not cut off by the GOAWAY ...
        state.gate.set()
        assert await inflight == b"through:a"
        async with asyncio.timeout(5):
            await shutdown
        assert conn.is_closed
        # ... and the client moves to a new connection for the next call.
        assert await ch.unary_unary("/test.Echo/Unary")(b"b", timeout=10) == b"echo:b"
        assert len(proxy.connections) == 2
