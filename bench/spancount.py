"""``python -m bench.spancount --port 4317 --http-port 4318 --out FILE``: the benchmark's OTLP span sink.

Owns: a ``grpc.aio`` server for ``TraceService/Export`` (OTLP/gRPC) and, with ``--http-port``,
an HTTP/1.1 server for ``POST /v1/traces`` (OTLP/HTTP, binary protobuf; the standard
library's, kept alive, on a thread), both counting the spans they receive into one running
total written to ``FILE`` (replaced atomically after every request).

Why not ``meshproxy.lab.spanlog`` (the demo's receiver, which turns every span into a JSON
line): at 2000 spans/s that costs the receiver's core a few milliseconds per batch, and the
receiver shares a core with the load generator and the backend, so it showed up as latency
of the traced scenario only. Counting parses each request once with the C protobuf runtime
and touches no span in Python. A real mesh exports to a collector on another node.

Concurrency: one asyncio loop for gRPC, one thread per HTTP connection; a lock around the
count and its file.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


class Counter:
    """The running span total, in memory and in ``out``."""

    def __init__(self, out: Path) -> None:
        self.total = 0
        self.out = out
        self.tmp = out.with_suffix(".tmp")
        self.lock = threading.Lock()
        out.write_text("0\n")

    def add(self, request: ExportTraceServiceRequest) -> None:
        with self.lock:
            self.total += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
            self.tmp.write_text(f"{self.total}\n")
            os.replace(self.tmp, self.out)


def http_server(host: str, port: int, counter: Counter) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        _ok = ExportTraceServiceResponse().SerializeToString()

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            if self.path != "/v1/traces":
                self.send_error(404)
                return
            counter.add(ExportTraceServiceRequest.FromString(body))
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(self._ok)))
            self.end_headers()
            self.wfile.write(self._ok)

        def log_message(self, *args: object) -> None:
            pass

    return ThreadingHTTPServer((host, port), Handler)


async def serve(host: str, port: int, out: Path, http_port: int | None = None) -> None:
    counter = Counter(out)

    async def export(request: ExportTraceServiceRequest, context: grpc.aio.ServicerContext) -> object:
        counter.add(request)
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
    if http_port is not None:
        httpd = http_server(host, http_port, counter)
        threading.Thread(target=httpd.serve_forever, name="otlp-http", daemon=True).start()
        print(f"OTLP/HTTP span counter on {host}:{http_port}", flush=True)
    await server.start()
    print(f"OTLP/gRPC span counter on {host}:{port}, total in {out}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4317)
    parser.add_argument("--http-port", type=int, help="also take OTLP/HTTP (POST /v1/traces) here")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, args.out, args.http_port))


if __name__ == "__main__":
    main()
