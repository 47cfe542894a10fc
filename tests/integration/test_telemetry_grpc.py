"""gRPC telemetry through the real sidecar data path, two hops on loopback (no root needed).

    grpcio client -> outbound sidecar (Listener -> Proxy + Telemetry "client-app")
                  -> inbound sidecar  (Listener -> Proxy + Telemetry "grpc-app")
                  -> grpcio server on 127.0.0.1

Both sidecars export to one OtlpReceiver. Checked: one trace per RPC with the server span
the child of the client span, gRPC attributes and status on both, the gRPC status in the
metrics of both reporters, and the caller identity carried across the hop.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import grpc
import grpc.aio
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from meshproxy.config import model
from meshproxy.config.model import Endpoint, Inbound, InboundPort, Service, Snapshot, Workload
from meshproxy.core.clock import MonotonicClock
from meshproxy.io.http1_client import Http1Client
from meshproxy.io.http2_client import Http2Client
from meshproxy.io.proxy import Proxy
from meshproxy.io.runtime import Runtime
from meshproxy.io.server import Listener, ListenerSettings
from meshproxy.lab.otlp_receiver import OtlpReceiver, ReceivedSpan
from meshproxy.telemetry import Telemetry

VIP = "198.18.0.20"  # a ClusterIP: only a routing key here, never dialled


def handlers() -> grpc.GenericRpcHandler:
    async def unary(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return b"pong:" + request

    async def fail(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")
        return b""

    return grpc.method_handlers_generic_handler(
        "mesh.Test",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
        },
    )


@dataclass
class Mesh:
    channel: grpc.aio.Channel
    receiver: OtlpReceiver
    client_tel: Telemetry
    server_tel: Telemetry


@asynccontextmanager
async def sidecar(
    direction: str, snapshot: Snapshot, destination: tuple[str, int], telemetry: Telemetry
) -> AsyncIterator[Listener]:
    runtime = Runtime(clock=MonotonicClock(), rng=random.Random(3))
    runtime.apply(snapshot)
    h1, h2 = Http1Client(), Http2Client()
    proxy = Proxy(runtime, {"1.1": h1, "2": h2}, telemetry=telemetry, rng=random.Random(5))
    listener = Listener(
        ListenerSettings(direction=direction, port=0, host="127.0.0.1", destination_override=destination),
        proxy,
    )
    await listener.start()
    try:
        yield listener
    finally:
        await listener.drain(1.0)
        await h2.aclose()
        await h1.close()


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    async with AsyncExitStack() as stack:
        receiver = await stack.enter_async_context(OtlpReceiver("127.0.0.1", 0))
        tracing = model.Telemetry(tracing=model.Tracing(otlp_grpc_endpoint=receiver.endpoint))
        client_tel = Telemetry.build(tracing, Workload(name="client-app", namespace="demo"), env={})
        server_tel = Telemetry.build(tracing, Workload(name="grpc-app", namespace="demo"), env={})
        stack.push_async_callback(client_tel.shutdown)
        stack.push_async_callback(server_tel.shutdown)

        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handlers(),))
        app_port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        stack.push_async_callback(server.stop, None)
        inbound = await stack.enter_async_context(
            sidecar(
                "inbound",
                Snapshot(
                    workload=Workload(name="grpc-app", namespace="demo"),
                    inbound=Inbound(
                        ports=(InboundPort(app_port, model.Protocol.HTTP2, service="grpc-app"),),
                        app_address="127.0.0.1",
                    ),
                ).with_version(),
                ("127.0.0.1", app_port),
                server_tel,
            )
        )
        svc = Service(
            name="grpc-app",
            namespace="demo",
            port=80,
            protocol=model.Protocol.HTTP2,
            vips=(VIP,),
            endpoints=(Endpoint(address="127.0.0.1", port=inbound.port, workload="grpc-app"),),
        )
        outbound = await stack.enter_async_context(
            sidecar("outbound", Snapshot(services=(svc,)).with_version(), (VIP, 80), client_tel)
        )
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(f"127.0.0.1:{outbound.port}"))
        yield Mesh(channel, receiver, client_tel, server_tel)


def requests(tel: Telemetry) -> list[dict[str, str]]:
    text = generate_latest(tel.metrics.registry).decode()
    return [
        {**s.labels, "value": str(int(s.value))}
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "meshproxy_requests_total"
    ]


async def test_grpc_calls_are_traced_and_counted_on_both_sides(mesh: Mesh) -> None:
    assert await mesh.channel.unary_unary("/mesh.Test/Unary")(b"ping", timeout=10) == b"pong:ping"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.channel.unary_unary("/mesh.Test/Fail")(b"", timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

    def both_rpcs(spans: list[ReceivedSpan]) -> bool:
        return len(spans) >= 4

    spans = await mesh.receiver.wait_for(both_rpcs, timeout=15)
    by = {(s.service, s.kind, s.name): s for s in spans}
    ok_client = by["client-app", "CLIENT", "mesh.Test/Unary"]
    ok_server = by["grpc-app", "SERVER", "mesh.Test/Unary"]
    assert ok_server.trace_id == ok_client.trace_id
    assert ok_server.parent_span_id == ok_client.span_id
    for s in (ok_client, ok_server):
        assert s.attributes["rpc.system"] == "grpc"
        assert (s.attributes["rpc.service"], s.attributes["rpc.method"]) == ("mesh.Test", "Unary")
        assert s.attributes["rpc.grpc.status_code"] == 0
        assert s.attributes["network.protocol.version"] == "2"
        assert s.status != "ERROR"
    assert ok_server.attributes["mesh.source.workload"] == "client-app"
    assert ok_client.attributes["mesh.destination.workload"] == "grpc-app"

    fail_client = by["client-app", "CLIENT", "mesh.Test/Fail"]
    fail_server = by["grpc-app", "SERVER", "mesh.Test/Fail"]
    assert (
        fail_client.attributes["rpc.grpc.status_code"] == fail_server.attributes["rpc.grpc.status_code"] == 7
    )
    # PERMISSION_DENIED is the caller's problem: an error for the client span only.
    assert fail_client.status == "ERROR"
    assert fail_server.status != "ERROR"

    client_side = {(r["grpc_status"], r["reporter"]) for r in requests(mesh.client_tel)}
    server_side = {(r["grpc_status"], r["reporter"], r["source_workload"]) for r in requests(mesh.server_tel)}
    assert client_side == {("0", "source"), ("7", "source")}
    assert server_side == {("0", "destination", "client-app"), ("7", "destination", "client-app")}
