"""An in-process OTLP/gRPC trace receiver for tests and the demo.

Owns: a ``grpc.aio`` server implementing OpenTelemetry's ``TraceService`` (the
generated servicer from opentelemetry-proto) that keeps received spans in
memory, an awaitable ``wait_for`` to synchronise tests on what arrived, and
``trace_tree`` to print one trace as an indented tree of hops.

    receiver = OtlpReceiver()                 # 127.0.0.1, a free port
    await receiver.start()
    tracing = Tracing(otlp_grpc_endpoint=receiver.endpoint)
    ...
    spans = await receiver.wait_for(lambda spans: len(spans) >= 4, timeout=10)
    print(receiver.trace_tree(spans[0].trace_id))
    await receiver.stop()

``python -m meshproxy.lab.otlp_receiver --port 4317`` runs it stand-alone and
prints each trace's tree as it completes (the demo uses that).

Invariants:
  * At most ``max_spans`` spans are kept (oldest dropped first): memory is bounded.
  * It listens where it is told (loopback by default), nothing else.

Concurrency: one asyncio loop; the servicer's ``Export`` runs on it, appends
spans and wakes waiters through an ``asyncio.Condition``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

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


class _Servicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    async def Export(self, request: Any, context: Any) -> Any:
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
                        )
                    )
        await self._receiver._add(spans)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """Collects spans sent by OTLP/gRPC exporters. Start it inside a running loop."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, max_spans: int = 100_000) -> None:
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self._spans: collections.deque[ReceivedSpan] = collections.deque(maxlen=max_spans)
        self._cond: asyncio.Condition | None = None
        self._server: grpc.aio.Server | None = None
        self.on_spans: Callable[[list[ReceivedSpan]], None] | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("receiver not started")
        return self._port

    @property
    def endpoint(self) -> str:
        """What to put in ``Tracing.otlp_grpc_endpoint``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        self._cond = asyncio.Condition()
        server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Servicer(self), server)  # type: ignore[no-untyped-call]
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._port = server.add_insecure_port(f"{host}:{self._requested_port}")
        await server.start()
        self._server = server

    async def stop(self, grace: float = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    async def __aenter__(self) -> OtlpReceiver:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _add(self, spans: list[ReceivedSpan]) -> None:
        assert self._cond is not None
        async with self._cond:
            self._spans.extend(spans)
            self._cond.notify_all()
        if self.on_spans is not None:
            self.on_spans(spans)

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


async def _serve(host: str, port: int) -> None:
    receiver = OtlpReceiver(host, port)
    printed: set[str] = set()

    def show(spans: list[ReceivedSpan]) -> None:
        # A trace is printed when its root span (no parent among what we have) arrives.
        for s in spans:
            if not s.parent_span_id and s.trace_id not in printed:
                printed.add(s.trace_id)
                print(receiver.trace_tree(s.trace_id), flush=True)

    receiver.on_spans = show
    await receiver.start()
    print(f"OTLP/gRPC receiver on {receiver.endpoint}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await receiver.stop()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="In-memory OTLP/gRPC trace receiver that prints trace trees.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4317)
    args = p.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
