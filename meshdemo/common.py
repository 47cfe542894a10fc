"""What the demo services share: trace-header forwarding, an upstream GET, a tiny HTTP server.

Invariants: no mesh imports (these are "unmodified" apps); every response carries
Content-Length so HTTP/1.1 keep-alive works through the proxies.

Concurrency: ``ThreadingHTTPServer``, one thread per connection; nothing shared but
read-only settings.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# The one thing an app in the mesh must do: copy these from the request it is serving
# onto every request it makes, so the proxies can stitch the hops into one trace.
TRACE_HEADERS = (
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "x-request-id",
)


def trace_headers(incoming: Mapping[str, str]) -> dict[str, str]:
    return {name: incoming[name] for name in TRACE_HEADERS if name in incoming}


def get_json(url: str, headers: Mapping[str, str], timeout: float = 5.0) -> tuple[int, Any]:
    """GET ``url``; returns (status, parsed JSON or an error text). Never raises for HTTP errors."""
    request = urllib.request.Request(url, headers=dict(headers))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (OSError, ValueError) as exc:
        return 502, f"{type(exc).__name__}: {exc}"


Handler = Callable[[str, Mapping[str, str]], tuple[int, Any]]


def serve(name: str, handle: Handler) -> None:
    """Serve ``handle(path, headers) -> (status, json_body)`` on ``$PORT`` (default 8080)."""

    class RequestHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive
        # Headers and body are two writes; with Nagle on, the body waits for the peer's
        # delayed ACK (about 40 ms on Linux) on every keep-alive response.
        disable_nagle_algorithm = True
        server_version = name

        def do_GET(self) -> None:
            if self.path == "/healthz":
                status, body = 200, {"service": name, "ok": True}
            else:
                headers = {k.lower(): v for k, v in self.headers.items()}
                status, body = handle(self.path, headers)
            payload = json.dumps(body).encode() + b"\n"
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            sys.stderr.write(f"{name}: {self.address_string()} {format % args}\n")

    port = int(os.environ.get("PORT", "8080"))
    server = ThreadingHTTPServer(("0.0.0.0", port), RequestHandler)
    server.daemon_threads = True
    print(f"{name} listening on :{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
