"""The lab OTLP receiver: what an exporter sends is what a test reads back."""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind, StatusCode

from meshproxy.lab.otlp_receiver import OtlpReceiver


async def test_spans_round_trip_with_typed_attributes_and_tree() -> None:
    async with OtlpReceiver() as receiver:
        provider = TracerProvider(resource=Resource.create({"service.name": "svc"}), shutdown_on_exit=False)
        # SimpleSpanProcessor exports synchronously on end(): run it off the loop the receiver serves on.
        provider.add_span_processor(
            SimpleSpanProcessor(OTLPSpanExporter(endpoint=receiver.endpoint, insecure=True))
        )
        tracer = provider.get_tracer("test")

        def emit() -> tuple[str, str]:
            with (
                tracer.start_as_current_span("parent", kind=SpanKind.SERVER) as parent,
                tracer.start_as_current_span("child", kind=SpanKind.CLIENT) as child,
            ):
                child.set_attributes({"n": 3, "ok": True, "ratio": 0.5, "tags": ["a", "b"], "s": "x"})
                child.set_status(StatusCode.ERROR)
            return f"{parent.get_span_context().trace_id:032x}", f"{parent.get_span_context().span_id:016x}"

        trace_id, parent_id = await asyncio.to_thread(emit)
        spans = await receiver.wait_for(lambda s: len(s) == 2, timeout=10)
        provider.shutdown()
        child = next(s for s in spans if s.name == "child")
        assert child.trace_id == trace_id and child.parent_span_id == parent_id
        assert child.kind == "CLIENT" and child.service == "svc" and child.status == "ERROR"
        assert dict(child.attributes) == {"n": 3, "ok": True, "ratio": 0.5, "tags": ["a", "b"], "s": "x"}
        tree = receiver.trace_tree(trace_id).splitlines()
        assert tree[0] == f"trace {trace_id}"
        assert tree[1].startswith("  SERVER parent [svc]")
        assert tree[2].startswith("    CLIENT child [svc]")


async def test_wait_for_times_out_with_what_arrived() -> None:
    async with OtlpReceiver() as receiver:
        with pytest.raises(TimeoutError, match="0 spans received"):
            await receiver.wait_for(lambda spans: bool(spans), timeout=0.2)
