"""Spans of several sidecars, exported over real OTLP/gRPC (loopback) to the lab receiver, form one trace."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from tel_chain import run_chain

from meshproxy.config import model
from meshproxy.lab.otlp_receiver import OtlpReceiver, ReceivedSpan


@pytest.fixture
async def receiver() -> AsyncIterator[OtlpReceiver]:
    async with OtlpReceiver("127.0.0.1", 0) as r:
        yield r


@pytest.mark.parametrize(
    "propagation",
    [(model.Propagation.W3C,), (model.Propagation.B3_MULTI,), (model.Propagation.B3,)],
    ids=["w3c", "b3multi", "b3"],
)
async def test_a_b_c_chain_is_one_trace(
    receiver: OtlpReceiver, propagation: tuple[model.Propagation, ...]
) -> None:
    chain = await run_chain(propagation, otlp_grpc_endpoint=receiver.endpoint)
    trace_id = chain.trace_id
    assert {h.trace_id for h in (chain.b_in, chain.b_out, chain.c_in)} == {trace_id}
    assert chain.b_in.request_id == chain.a_out.request_id == chain.c_in.request_id

    def complete(spans: list[ReceivedSpan]) -> bool:
        return len([s for s in spans if s.trace_id == trace_id]) == 4

    await receiver.wait_for(complete, timeout=15)
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
