"""Shared rig of the ``test_mesh_*`` suite: lab set-up on the test side, unmodified apps on the pod side.

Owns two things:

* Test-side helpers: a module-scoped lab (``mesh_lab``), meshing pods with the real init step
  and real ``meshproxy run`` sidecars (``mesh_pods``), reading a sidecar's Prometheus series
  (``metric``), its RSS from ``/proc``, and running this file's apps and clients in a pod.
* Pod-side programs (``python mesh_rig.py COMMAND ...``), stdlib (and grpcio) only, that know
  nothing about the mesh: they listen on ordinary ports and call service VIPs. Each client
  prints exactly one JSON line on stdout, which the test parses.

The HTTP app (``http-app``) serves paths ``/<area>/<action>``; an area is a test's own
namespace of state, so tests sharing one app never disturb each other's counters or modes.
Tests steer it through ``/control/...`` from inside its pod over loopback (never intercepted),
which is how a test makes an endpoint fail, recover, hold requests or release them: every
test synchronises on such state, never on a sleep.

Invariants: pods talk only to 198.18.0.0/15 addresses of this lab and to loopback; every
process started here belongs to the lab and dies with it.

Concurrency: the test side is synchronous. The apps are threaded stdlib servers (one thread
per connection); their shared state is guarded by one condition variable per app.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import http.client
import json
import os
import socket
import struct
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

RIG = str(Path(__file__).resolve())
PY = sys.executable
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
BLOCK = bytes(range(256)) * 256  # 64 KiB: the repeating pattern of large bodies


# =============================================================================================
# Test side
# =============================================================================================


@contextlib.contextmanager
def mesh_lab() -> Iterator[Any]:
    """A lab for one test module; skipped (failed under CI) where namespaces or iptables are missing.

    The workdir is made by ``Lab`` itself under /tmp (mode 0755), because the sidecars run as
    the proxy UID and must read their configs there (pytest's tmp_path parents are 0700).
    """
    from meshproxy.lab.netns import Lab
    from tests.support.require import require_lab

    require_lab(iptables=True)
    with Lab() as lab:
        yield lab


def spawn_app(lab: Any, pod: Any, command: str, *args: str, port: int, name: str | None = None) -> Any:
    """Start one of this file's servers in ``pod`` and wait until it listens on ``port``."""
    proc = lab.spawn(pod, [PY, RIG, command, *args], name=name or f"{command}-{port}")
    lab.wait_listening(pod, port, timeout=20, proc=proc)
    return proc


def mesh_pods(lab: Any, snapshots: Mapping[Any, Any]) -> dict[str, Any]:
    """Intercept each pod (``meshproxy iptables install``) and start its sidecar; in parallel."""
    from meshproxy.lab.mesh import intercept, start_sidecar, wait_sidecar

    started = {}
    for pod, snapshot in snapshots.items():
        intercept(lab, pod)
        started[pod.name] = start_sidecar(lab, pod, snapshot.with_version(), wait=False)
    for sidecar in started.values():
        wait_sidecar(lab, sidecar, timeout=30)
    return started


def start_sidecar(
    lab: Any,
    pod: Any,
    snapshot: Any | None,
    *,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    wait: bool = True,
) -> Any:
    """``meshproxy run`` in ``pod`` as the proxy UID, from ``snapshot`` (static) or ``args``.

    Like ``meshproxy.lab.mesh.start_sidecar``, plus an environment (``OTEL_*``) and no config
    file at all when the sidecar gets its config from the control plane (``--control-plane``).
    """
    from meshproxy.lab.mesh import PROXY_UID, config_yaml, wait_sidecar

    argv = [PY, "-m", "meshproxy", "run", "--pod-ip", pod.ip, "--pod-name", f"{pod.name}-0"]
    if snapshot is not None:
        config = lab.logdir / f"{pod.name}.sidecar.yaml"
        config.write_text(config_yaml(snapshot.with_version()))
        argv += ["--config", str(config)]
    proc = lab.spawn(pod, [*argv, *args], name="sidecar", uid=PROXY_UID, env=env)
    if wait:
        wait_sidecar(lab, proc, timeout=30)
    return proc


def client(lab: Any, pod: Any, command: str, *args: str, timeout: float = 120.0) -> Any:
    """Run one of this file's clients in ``pod``; its one JSON line, parsed."""
    done = lab.exec(pod, [PY, RIG, command, *args], timeout=timeout, check=False)
    if done.returncode != 0 or not done.stdout.strip():
        raise AssertionError(f"{command} {args} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def control(lab: Any, pod: Any, action: str, port: int = 8080, **params: str) -> Any:
    """``/control/<action>`` of the HTTP app in ``pod``, over the pod's loopback (no sidecar)."""
    query = urllib.parse.urlencode(params)
    return client(lab, pod, "get", f"http://127.0.0.1:{port}/control/{action}?{query}", timeout=30)["json"]


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels`` (0 when none)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def status_kib(pid: int, field_name: str) -> int:
    """A ``/proc/<pid>/status`` memory field (``VmRSS``, ``VmHWM``) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise KeyError(field_name)


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns a truthy value (returned); ``TimeoutError`` naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# =============================================================================================
# Pod side: the HTTP app
# =============================================================================================


@dataclass
class AppState:
    name: str
    cond: threading.Condition = field(default_factory=threading.Condition)
    modes: dict[str, str] = field(default_factory=dict)  # area -> ok | fail | alternate
    tries: Counter[str] = field(default_factory=Counter)  # area -> requests (for alternate)
    hits: dict[str, Counter[str]] = field(default_factory=dict)  # area -> status -> count
    held: int = 0
    release_generation: int = 0
    upload_chunks: Counter[str] = field(default_factory=Counter)  # upload id -> chunks received
    released_streams: set[str] = field(default_factory=set)


def _json_body(payload: Any) -> bytes:
    return json.dumps(payload).encode()


class AppHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, chunked
    # Buffered writes (flushed after each request by the base class, and explicitly while
    # streaming) send head and body together: separate small writes meet delayed ACKs.
    wbufsize = 1 << 16
    state: AppState  # set on the subclass made by serve_http
    requests_on_connection = 0

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the lab log stays readable; tests read state, not logs

    # --- plumbing -----------------------------------------------------------------------------

    def send_json(self, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        body = _json_body(payload)
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def body_chunks(self) -> Iterator[bytes]:
        """The request body as it arrives: chunked transfer coding or content-length."""
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                data = self.rfile.read(size)
                self.rfile.readline()
                yield data
        remaining = int(self.headers.get("content-length", "0"))
        while remaining:
            data = self.rfile.read(min(remaining, 1 << 16))
            if not data:
                raise ConnectionError("body ended early")
            remaining -= len(data)
            yield data

    def write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def count(self, area: str, status: int) -> None:
        with self.state.cond:
            self.state.hits.setdefault(area, Counter())[str(status)] += 1

    # --- routes -------------------------------------------------------------------------------

    def do_POST(self) -> None:
        self.requests_on_connection += 1
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        area, _, action = url.path.strip("/").partition("/")
        if action != "upload":
            self.send_json(404, {"error": "POST only to /<area>/upload"})
            return
        digest, size = hashlib.sha256(), 0
        upload_id = query.get("id", "")
        for data in self.body_chunks():
            digest.update(data)
            size += len(data)
            with self.state.cond:
                self.state.upload_chunks[upload_id] += 1
                self.state.cond.notify_all()
        self.count(area, 200)
        self.send_json(200, {"name": self.state.name, "bytes": size, "sha256": digest.hexdigest()})

    def do_GET(self) -> None:
        self.requests_on_connection += 1
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        area, _, action = url.path.strip("/").partition("/")
        st = self.state
        if self.headers.get("upgrade", "").lower() == "websocket":
            self.websocket_echo()
            return
        if area == "control":
            self.control(action, query)
            return
        if action == "conn":
            peer = list(self.client_address[:2])
            self.count(area, 200)
            self.send_json(200, {"name": st.name, "peer": peer, "n": self.requests_on_connection})
        elif action == "hold":
            with st.cond:
                generation = st.release_generation
                st.held += 1
                st.cond.notify_all()
                st.cond.wait_for(lambda: st.release_generation != generation, timeout=60)
                st.held -= 1
            self.count(area, 200)
            self.send_json(200, {"name": st.name})
        elif action == "stream":
            # First chunk now, the rest only once the client (through the mesh) said it got the
            # first: a proxy that buffered the response would deadlock this exchange.
            stream_id = query["id"]
            self.send_response(200)
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            self.write_chunk(b"first\n")
            with st.cond:
                released = st.cond.wait_for(lambda: stream_id in st.released_streams, timeout=30)
            self.write_chunk(b"rest\n" if released else b"never released\n")
            self.wfile.write(b"0\r\n\r\n")
        elif action == "release-stream":
            with st.cond:
                st.released_streams.add(query["id"])
                st.cond.notify_all()
            self.send_json(200, {"released": query["id"]})
        elif action == "seen":
            with st.cond:
                seen = st.upload_chunks[query["id"]]
            self.send_json(200, {"chunks": seen})
        elif action == "download":
            remaining = int(query["size"])
            self.send_response(200)
            self.send_header("content-length", str(remaining))
            self.end_headers()
            while remaining:
                piece = BLOCK[: min(remaining, len(BLOCK))]
                self.wfile.write(piece)
                remaining -= len(piece)
        else:
            with st.cond:
                mode = st.modes.get(area, "ok")
                st.tries[area] += 1
                fail = mode == "fail" or (mode == "alternate" and st.tries[area] % 2 == 0)
            status = 503 if fail else 200
            self.count(area, status)
            headers = {k.lower(): v for k, v in self.headers.items()}
            self.send_json(status, {"name": st.name, "area": area, "headers": headers})

    def control(self, action: str, query: Mapping[str, str]) -> None:
        st = self.state
        with st.cond:
            if action == "mode":
                st.modes[query["area"]] = query["mode"]
                st.tries[query["area"]] = 0
            elif action == "release":
                st.release_generation += 1
                st.cond.notify_all()
            payload = {
                "name": st.name,
                "held": st.held,
                "hits": {area: dict(c) for area, c in st.hits.items()},
            }
        self.send_json(200, payload)

    def websocket_echo(self) -> None:
        """RFC 6455 server side, just enough: text/binary frames echoed, close answered."""
        accept = base64.b64encode(
            hashlib.sha1((self.headers["sec-websocket-key"] + WS_GUID).encode()).digest()
        ).decode()
        self.send_response(101)
        self.send_header("upgrade", "websocket")
        self.send_header("connection", "Upgrade")
        self.send_header("sec-websocket-accept", accept)
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        while True:
            opcode, payload = ws_read_frame(self.rfile)
            if opcode == 8:  # close
                self.wfile.write(ws_frame(8, payload, mask=False))
                self.wfile.flush()
                return
            self.wfile.write(ws_frame(opcode, payload, mask=False))
            self.wfile.flush()


def ws_frame(opcode: int, payload: bytes, *, mask: bool) -> bytes:
    head = bytes([0x80 | opcode])
    bit = 0x80 if mask else 0
    n = len(payload)
    if n < 126:
        head += bytes([bit | n])
    elif n < 1 << 16:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def ws_read_frame(stream: Any) -> tuple[int, bytes]:
    def exactly(n: int) -> bytes:
        data = stream.read(n)
        if len(data) != n:
            raise ConnectionError("websocket stream ended")
        return bytes(data)

    b0, b1 = exactly(2)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", exactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", exactly(8))
    key = exactly(4) if b1 & 0x80 else b""
    payload = exactly(n)
    if key:
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return b0 & 0x0F, payload


def serve_http(name: str, port: int, host: str = "0.0.0.0") -> None:
    handler = type("Handler", (AppHandler,), {"state": AppState(name)})
    server_class = ThreadingHTTPServer
    if ":" in host:  # an IPv6 listener (IPv6-only, so it never hides an IPv4 one)
        server_class = type("Http6Server", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6})
    server = server_class((host, port), handler)
    server.daemon_threads = True
    server.request_queue_size = 128
    server.serve_forever()


# =============================================================================================
# Pod side: TCP, server-first and gRPC apps
# =============================================================================================


def _serve_tcp(port: int, handle: Any) -> None:
    listener = socket.create_server(("0.0.0.0", port), backlog=64)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def tcp_echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(1 << 16):
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)  # half-close answered: the client sees our EOF after its own


def smtp_like(conn: socket.socket) -> None:
    """Server speaks first (like SMTP or MySQL): a client that waits for the greeting must get it."""
    with conn, conn.makefile("rwb") as f:
        f.write(b"220 mesh-smtp ready\r\n")
        f.flush()
        for line in f:
            if line.upper().startswith(b"QUIT"):
                f.write(b"221 bye\r\n")
                f.flush()
                return
            f.write(b"250 " + line.strip() + b"\r\n")
            f.flush()


def serve_grpc(port: int) -> None:
    from concurrent import futures

    import grpc

    def unary(request: bytes, context: Any) -> bytes:
        context.set_trailing_metadata((("x-app-trailer", "kept"),))
        return b"pong:" + request

    def count(request: bytes, context: Any) -> Iterator[bytes]:
        for i in range(int(request)):
            yield str(i).encode()

    gates: dict[bytes, threading.Event] = {}
    gates_lock = threading.Lock()

    def gate_for(key: bytes) -> threading.Event:
        with gates_lock:
            return gates.setdefault(key, threading.Event())

    def gate(request: bytes, context: Any) -> Iterator[bytes]:
        # One message now, the next only after the client (through the mesh) released it:
        # a proxy holding server-stream messages back would deadlock this call.
        yield b"first"
        yield b"rest" if gate_for(request).wait(30) else b"never released"

    def release(request: bytes, context: Any) -> bytes:
        gate_for(request).set()
        return b"released"

    def fail(request: bytes, context: Any) -> bytes:
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "not for you")
        return b""  # not reached: abort raises

    handlers = grpc.method_handlers_generic_handler(
        "mesh.Test",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Count": grpc.unary_stream_rpc_method_handler(count),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
            "Gate": grpc.unary_stream_rpc_method_handler(gate),
            "Release": grpc.unary_unary_rpc_method_handler(release),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handlers,))
    server.add_insecure_port(f"0.0.0.0:{port}")
    server.start()
    server.wait_for_termination()


# =============================================================================================
# Pod side: clients (each prints one JSON line)
# =============================================================================================


def _split(url: str) -> tuple[str, int, str]:
    u = urllib.parse.urlsplit(url)
    return u.hostname or "", u.port or 80, u.path + (f"?{u.query}" if u.query else "")


def cmd_get(url: str, headers: Sequence[str]) -> dict[str, Any]:
    host, port, path = _split(url)
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", path, headers=dict(h.split(":", 1) for h in headers))
    resp = conn.getresponse()
    body = resp.read()
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    return {
        "status": resp.status,
        "headers": {k.lower(): v for k, v in resp.getheaders()},
        "json": parsed,
        "text": body.decode(errors="replace")[:2000],
    }


def cmd_keepalive(url: str, n: int) -> dict[str, Any]:
    """``n`` GETs on one client connection; reports the local port of each (same = reused)."""
    host, port, path = _split(url)
    conn = http.client.HTTPConnection(host, port, timeout=30)
    replies, local_ports = [], []
    for _ in range(n):
        conn.request("GET", path)
        resp = conn.getresponse()
        replies.append(json.loads(resp.read()))
        assert conn.sock is not None
        local_ports.append(conn.sock.getsockname()[1])
    return {"replies": replies, "local_ports": local_ports}


def cmd_stream_down(base: str, stream_id: str) -> dict[str, Any]:
    """Read a chunked response's first chunk, then release the rest via a second request."""
    host, port, _ = _split(base)
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", f"/stream/stream?id={stream_id}")
    resp = conn.getresponse()
    first = resp.read1(64)  # returns what has arrived: the response is not over yet
    released = cmd_get(f"{base}/stream/release-stream?id={stream_id}", ())
    rest = resp.read()
    return {
        "status": resp.status,
        "chunked": resp.getheader("transfer-encoding"),
        "first": first.decode(),
        "rest": rest.decode(),
        "release_status": released["status"],
    }


def cmd_stream_up(base: str, upload_id: str) -> dict[str, Any]:
    """Send a chunked request body; the second chunk goes only once the app saw the first."""
    host, port, _ = _split(base)
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.putrequest("POST", f"/stream/upload?id={upload_id}")
    conn.putheader("transfer-encoding", "chunked")
    conn.endheaders()
    assert conn.sock is not None
    conn.sock.sendall(b"6\r\nfirst\n\r\n")
    deadline = time.monotonic() + 20
    seen = 0
    while time.monotonic() < deadline:
        seen = cmd_get(f"{base}/stream/seen?id={upload_id}", ())["json"]["chunks"]
        if seen >= 1:
            break
        time.sleep(0.05)  # polling the app's state with a deadline
    seen_before_rest = seen
    conn.sock.sendall(b"5\r\nrest\n\r\n0\r\n\r\n")
    resp = conn.getresponse()
    return {"status": resp.status, "seen_before_rest": seen_before_rest, "json": json.loads(resp.read())}


def _pattern(size: int) -> Iterator[bytes]:
    while size:
        piece = BLOCK[: min(size, len(BLOCK))]
        size -= len(piece)
        yield piece


def cmd_upload(url: str, size: int) -> dict[str, Any]:
    host, port, path = _split(url)
    digest = hashlib.sha256()
    conn = http.client.HTTPConnection(host, port, timeout=120)
    conn.putrequest("POST", path)
    conn.putheader("content-length", str(size))
    conn.endheaders()
    for piece in _pattern(size):
        digest.update(piece)
        conn.send(piece)
    resp = conn.getresponse()
    return {"status": resp.status, "sha256": digest.hexdigest(), "json": json.loads(resp.read())}


def cmd_download(url: str) -> dict[str, Any]:
    host, port, path = _split(url)
    conn = http.client.HTTPConnection(host, port, timeout=120)
    conn.request("GET", path)
    resp = conn.getresponse()
    digest, size = hashlib.sha256(), 0
    while data := resp.read(1 << 16):
        digest.update(data)
        size += len(data)
    expected = hashlib.sha256()
    for piece in _pattern(size):
        expected.update(piece)
    return {"status": resp.status, "bytes": size, "intact": digest.digest() == expected.digest()}


def cmd_websocket(url: str, messages: Sequence[str]) -> dict[str, Any]:
    host, port, path = _split(url)
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection((host, port), timeout=20) as sock, sock.makefile("rb") as f:
        sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        status_line = f.readline().decode()
        headers = {}
        while (line := f.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode().partition(":")
            headers[k.strip().lower()] = v.strip()
        expected = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        echoes = []
        for m in messages:
            sock.sendall(ws_frame(1, m.encode(), mask=True))
            echoes.append(ws_read_frame(f)[1].decode())
        big = os.urandom(200_000)
        sock.sendall(ws_frame(2, big, mask=True))
        big_ok = ws_read_frame(f)[1] == big
        sock.sendall(ws_frame(8, b"\x03\xe8", mask=True))
        close_opcode = ws_read_frame(f)[0]
    return {
        "status_line": status_line.strip(),
        "accept_ok": headers.get("sec-websocket-accept") == expected,
        "echoes": echoes,
        "big_ok": big_ok,
        "close_opcode": close_opcode,
    }


def cmd_tcp_echo(host: str, port: int, size: int) -> dict[str, Any]:
    payload = os.urandom(size)
    received = bytearray()
    with socket.create_connection((host, port), timeout=20) as sock:

        def send() -> None:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)  # our EOF must reach the app, and its EOF come back

        sender = threading.Thread(target=send)
        sender.start()
        while data := sock.recv(1 << 16):
            received += data
        sender.join()
    return {"sent": size, "received": len(received), "equal": bytes(received) == payload}


def cmd_server_first(host: str, port: int) -> dict[str, Any]:
    """Connect and *wait* for the server's greeting before sending anything."""
    with socket.create_connection((host, port), timeout=10) as sock, sock.makefile("rwb") as f:
        greeting = f.readline().decode().strip()
        f.write(b"HELO client\r\n")
        f.flush()
        reply = f.readline().decode().strip()
        f.write(b"QUIT\r\n")
        f.flush()
        bye = f.readline().decode().strip()
    return {"greeting": greeting, "reply": reply, "bye": bye}


def cmd_grpc(target: str) -> dict[str, Any]:
    import grpc

    with grpc.insecure_channel(target) as channel:
        unary = channel.unary_unary("/mesh.Test/Unary", None, None)
        reply, call = unary.with_call(b"ping", timeout=20)
        trailers = dict(call.trailing_metadata() or ())
        count = channel.unary_stream("/mesh.Test/Count", None, None)
        stream = [m.decode() for m in count(b"300", timeout=20)]
        gated = iter(channel.unary_stream("/mesh.Test/Gate", None, None)(b"g1", timeout=40))
        first = next(gated).decode()
        channel.unary_unary("/mesh.Test/Release", None, None)(b"g1", timeout=20)
        gate = [first, *(m.decode() for m in gated)]
        try:
            channel.unary_unary("/mesh.Test/Fail", None, None)(b"", timeout=20)
            fail: list[str] = ["no error"]
        except grpc.RpcError as err:
            fail = [err.code().name, err.details() or ""]
    return {
        "unary": reply.decode(),
        "trailer": trailers.get("x-app-trailer"),
        "stream": stream,
        "gate": gate,
        "fail": fail,
    }


def cmd_load(url: str, n: int, concurrency: int, until: str | None, headers: Sequence[str]) -> dict[str, Any]:
    """``n`` GETs (or until file ``until`` exists) over ``concurrency`` keep-alive connections.

    Counts statuses, answering app names, proxy flags and connection errors (by type).
    """
    host, port, path = _split(url)
    hdrs = dict(h.split(":", 1) for h in headers)
    lock = threading.Lock()
    status: Counter[str] = Counter()
    names: Counter[str] = Counter()
    flags: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    issued = 0

    def next_ticket() -> bool:
        nonlocal issued
        with lock:
            if until is not None:
                if Path(until).exists():
                    return False
            elif issued >= n:
                return False
            issued += 1
            return True

    def worker() -> None:
        conn = http.client.HTTPConnection(host, port, timeout=30)
        while next_ticket():
            try:
                conn.request("GET", path, headers=hdrs)
                resp = conn.getresponse()
                body = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                with lock:
                    errors[type(exc).__name__] += 1
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=30)
                continue
            name = ""
            if resp.status == 200:
                with contextlib.suppress(ValueError):
                    name = json.loads(body).get("name", "")
            with lock:
                status[str(resp.status)] += 1
                names[name] += 1
                if flag := resp.getheader("x-meshproxy-flag"):
                    flags[flag] += 1
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "requests": issued,
        "status": dict(status),
        "names": dict(names),
        "flags": dict(flags),
        "errors": dict(errors),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mesh_rig")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("http-app")
    s.add_argument("--name", required=True)
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--host", default="0.0.0.0")
    for name in ("tcp-echo", "smtp-like", "grpc-app"):
        sub.add_parser(name).add_argument("--port", type=int, required=True)
    s = sub.add_parser("get")
    s.add_argument("url")
    s.add_argument("-H", "--header", action="append", default=[])
    s = sub.add_parser("keepalive")
    s.add_argument("url")
    s.add_argument("-n", type=int, default=5)
    for name in ("stream-down", "stream-up"):
        s = sub.add_parser(name)
        s.add_argument("base")
        s.add_argument("id")
    s = sub.add_parser("upload")
    s.add_argument("url")
    s.add_argument("size", type=int)
    sub.add_parser("download").add_argument("url")
    s = sub.add_parser("websocket")
    s.add_argument("url")
    s.add_argument("messages", nargs="*")
    s = sub.add_parser("tcp-echo-client")
    s.add_argument("host")
    s.add_argument("port", type=int)
    s.add_argument("size", type=int)
    s = sub.add_parser("server-first")
    s.add_argument("host")
    s.add_argument("port", type=int)
    sub.add_parser("grpc").add_argument("target")
    s = sub.add_parser("load")
    s.add_argument("url")
    s.add_argument("-n", type=int, default=100)
    s.add_argument("-c", "--concurrency", type=int, default=4)
    s.add_argument("--until", default=None, help="run until this file exists (instead of -n)")
    s.add_argument("-H", "--header", action="append", default=[])
    a = p.parse_args(argv)

    servers = {
        "http-app": lambda: serve_http(a.name, a.port, a.host),
        "tcp-echo": lambda: _serve_tcp(a.port, tcp_echo),
        "smtp-like": lambda: _serve_tcp(a.port, smtp_like),
        "grpc-app": lambda: serve_grpc(a.port),
    }
    if a.cmd in servers:
        servers[a.cmd]()
        return 0
    clients = {
        "get": lambda: cmd_get(a.url, a.header),
        "keepalive": lambda: cmd_keepalive(a.url, a.n),
        "stream-down": lambda: cmd_stream_down(a.base, a.id),
        "stream-up": lambda: cmd_stream_up(a.base, a.id),
        "upload": lambda: cmd_upload(a.url, a.size),
        "download": lambda: cmd_download(a.url),
        "websocket": lambda: cmd_websocket(a.url, a.messages),
        "tcp-echo-client": lambda: cmd_tcp_echo(a.host, a.port, a.size),
        "server-first": lambda: cmd_server_first(a.host, a.port),
        "grpc": lambda: cmd_grpc(a.target),
        "load": lambda: cmd_load(a.url, a.n, a.concurrency, a.until, a.header),
    }
    print(json.dumps(clients[a.cmd]()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
