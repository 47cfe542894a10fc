"""``python -m bench.spancount --port 4317 --out FILE``: the benchmark's OTLP/gRPC span sink.

Owns: a ``grpc.aio`` server for ``TraceService/Export`` that counts the spans it receives
and writes the running total to ``FILE`` (replaced atomically after every request).

Why not ``meshproxy.lab.spanlog`` (the demo's receiver, which turns every span into a JSON
line): at 2000 spans/s that costs the receiver's core a few milliseconds per batch, and the
receiver shares a core with the load generator and the backend, so it showed up as latency
of the traced scenario only. Counting parses each request once with the C protobuf runtime
and touches no span in Python. A real mesh exports to a collector on another node.

Concurrency: one asyncio loop; one request at a time updates the count.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


async def serve(host: str, port: int, out: Path) -> None:
    total = 0
    tmp = out.with_suffix(".tmp")

    async def export(request: ExportTraceServiceRequest, context: grpc.aio.ServicerContext) -> object:
        nonlocal total
        total += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        tmp.write_text(f"{total}\n")
        os.replace(tmp, out)
        return ExportTraceServiceResponse()

    handler = grpc.method_handlers_generic_handler(
        "opentelemetry.proto.collector.trace.v1.TraceService",
        {
            "Export": grpc.unary_unary_rpc_method_handler(
                export,
                request_deserializer=ExportTraceServiceRequest.FromString,
                response_serializer=ExportTraceServiceResponse.SerializeToString,
            )
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"{host}:{port}")
    out.write_text("0\n")
    await server.start()
    print(f"OTLP/gRPC span counter on {host}:{port}, total in {out}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4317)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, args.out))


if __name__ == "__main__":
    main()
