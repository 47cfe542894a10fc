"""gRPC through the real sidecar data path, two hops, on loopback (no root needed).

    grpcio client -> outbound sidecar (Listener :0 -> detect h2 -> Proxy -> Http2Client)
                  -> inbound sidecar  (Listener :0 -> detect h2 -> Proxy -> Http2Client)
                  -> grpcio server on 127.0.0.1

The outbound listener's original destination is a service VIP (the seam standing in
for SO_ORIGINAL_DST); the service's endpoint is the inbound sidecar, whose app is the
gRPC server. What is checked is what users of gRPC rely on: the status, message and
trailers of every call kind survive both hops, deadlines and cancellation propagate.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import grpc
import grpc.aio
import pytest
import uvloop

from meshproxy.config.model import Endpoint, Inbound, Service, Snapshot
from meshproxy.core.clock import MonotonicClock
from meshproxy.io.http1_client import Http1Client
from meshproxy.io.http2_client import Http2Client
from meshproxy.io.proxy import Proxy
from meshproxy.io.runtime import Runtime
from meshproxy.io.server import Listener, ListenerSettings

VIP = "198.18.0.20"  # a ClusterIP: only a routing key here, never dialled
APP_PORT_ALIAS = 50051  # the port the inbound listener believes it intercepted
GRPC_OPTIONS = [("grpc.max_send_message_length", 16 << 20), ("grpc.max_receive_message_length", 16 << 20)]


async def eventually(predicate: Callable[[], bool], within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 - grpcio server state: nothing to await
            await asyncio.sleep(0.01)


@dataclass
class Events:
    cancelled: list[str] = field(default_factory=list)
    hops: list[tuple[Http2Client, Endpoint]] = field(default_factory=list)  # each sidecar's upstream

    def upstream_connections(self) -> list[int]:
        return [client.connection_count(endpoint) for client, endpoint in self.hops]


def service_handlers(events: Events) -> grpc.GenericRpcHandler:
    async def unary(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return b"pong:" + request

    async def big(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return request * 3

    async def fail(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "tenant blue may not")
        return b""

    async def count(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncIterator[bytes]:
        for i in range(int(request)):
            yield str(i).encode()

    async def forever(
        request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        try:
            for i in itertools.count():
                yield str(i).encode()
        finally:  # infinite: only a cancelled RPC ends up here
            events.cancelled.append("forever")

    async def chat(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        async for message in requests:
            yield message[::-1]

    return grpc.method_handlers_generic_handler(
        "mesh.Test",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Big": grpc.unary_unary_rpc_method_handler(big),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
            "Count": grpc.unary_stream_rpc_method_handler(count),
            "Forever": grpc.unary_stream_rpc_method_handler(forever),
            "Chat": grpc.stream_stream_rpc_method_handler(chat),
        },
    )


@asynccontextmanager
async def sidecar(
    direction: str, snapshot: Snapshot, destination: tuple[str, int]
) -> AsyncIterator[Listener]:
    runtime = Runtime(clock=MonotonicClock(), rng=random.Random(3))
    runtime.apply(snapshot)
    h1, h2 = Http1Client(), Http2Client()
    proxy = Proxy(runtime, {"1.1": h1, "2": h2}, rng=random.Random(5))
    listener = Listener(
        ListenerSettings(direction=direction, port=0, host="127.0.0.1", destination_override=destination),
        proxy,
    )
    await listener.start()
    try:
        yield listener, h2
    finally:
        await listener.drain(1.0)
        await h2.aclose()
        await h1.close()


@asynccontextmanager
async def mesh() -> AsyncIterator[tuple[grpc.aio.Channel, Events]]:
    events = Events()
    server = grpc.aio.server(options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((service_handlers(events),))
    app_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with AsyncExitStack() as stack:
        stack.push_async_callback(server.stop, None)
        # Inbound: the app listens on 127.0.0.1:app_port (inbound forwards to the original port).
        inbound, inbound_h2 = await stack.enter_async_context(
            sidecar(
                "inbound",
                Snapshot(inbound=Inbound(app_address="127.0.0.1")).with_version(),
                ("127.0.0.1", app_port),
            )
        )
        svc = Service(
            name="grpc-app",
            namespace="demo",
            port=80,
            vips=(VIP,),
            endpoints=(Endpoint(address="127.0.0.1", port=inbound.port),),
        )
        outbound, outbound_h2 = await stack.enter_async_context(
            sidecar("outbound", Snapshot(services=(svc,)).with_version(), (VIP, 80))
        )
        events.hops = [(outbound_h2, svc.endpoints[0]), (inbound_h2, Endpoint("127.0.0.1", app_port))]
        ch = await stack.enter_async_context(
            grpc.aio.insecure_channel(f"127.0.0.1:{outbound.port}", options=GRPC_OPTIONS)
        )
        yield ch, events


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    """Run every test on both event loops the sidecar supports."""
    if request.param == "uvloop":
        return uvloop.EventLoopPolicy()
    return asyncio.DefaultEventLoopPolicy()


async def test_unary_server_streaming_and_bidi_through_two_sidecars() -> None:
    async with mesh() as (ch, events):
        assert await ch.unary_unary("/mesh.Test/Unary")(b"ping", timeout=10) == b"pong:ping"
        assert events.upstream_connections() == [1, 1]  # both hops went upstream over HTTP/2
        received = [m async for m in ch.unary_stream("/mesh.Test/Count")(b"500", timeout=10)]
        assert received == [str(i).encode() for i in range(500)]
        chat = ch.stream_stream("/mesh.Test/Chat")(timeout=10)
        for word in (b"abc", b"hello"):
            await chat.write(word)
            assert await chat.read() == word[::-1]
        await chat.done_writing()
        assert await chat.code() == grpc.StatusCode.OK


async def test_large_message_through_two_sidecars() -> None:
    async with mesh() as (ch, _events):
        payload = bytes(range(256)) * 8192  # 2 MiB up, 6 MiB down
        reply = await ch.unary_unary("/mesh.Test/Big")(payload, timeout=30)
        assert reply == payload * 3


async def test_error_status_survives_two_hops() -> None:
    async with mesh() as (ch, _events):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary("/mesh.Test/Fail")(b"", timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert err.value.details() == "tenant blue may not"


async def test_cancellation_reaches_the_app_through_two_hops() -> None:
    async with mesh() as (ch, events):
        call = ch.unary_stream("/mesh.Test/Forever")(b"")
        async for message in call:
            if message == b"2":
                break
        call.cancel()
        await eventually(lambda: "forever" in events.cancelled)
        assert await ch.unary_unary("/mesh.Test/Unary")(b"after", timeout=10) == b"pong:after"
