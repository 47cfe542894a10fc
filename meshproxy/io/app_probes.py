"""The app's health probes, performed by the sidecar on kubelet's behalf.

Owns: the sidecar side of the injector's probe-rewriting contract
(``controlplane/inject.py``): kubelet's httpGet/tcpSocket/grpc probes of the app
are rewritten to ``GET /app-health/<container>/<livez|readyz|startupz>`` on the
admin port, and the originals arrive in ``MESHPROXY_APP_PROBES`` (a JSON object
keyed by that path). ``AppProbes.check(path)`` performs the original probe
against ``127.0.0.1:<port>`` and answers the status the admin server returns:

    200  the probe passed (HTTP 2xx/3xx, TCP connect, gRPC SERVING)
    503  it failed (other status, refused, timeout, NOT_SERVING)
    None the path is not a known probe (the admin server answers 404)

Invariants: each probe is bounded by its ``timeoutSeconds``; HTTPS probes skip
certificate checks (as kubelet does); a malformed entry in the env var is
skipped with a log line and never stops the sidecar. Probes go to loopback,
which the pod's interception rules leave alone.

Concurrency: ``check`` is a coroutine on the sidecar's loop; probes share no
state, so concurrent checks are independent.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

log = logging.getLogger(__name__)

ENV = "MESHPROXY_APP_PROBES"
_GRPC_HEALTH = "/grpc.health.v1.Health/Check"
_SERVING = b"\x08\x01"  # HealthCheckResponse{status: SERVING}


@dataclass(frozen=True, slots=True)
class Probe:
    kind: str  # "http", "tcp" or "grpc"
    port: int
    path: str = "/"
    scheme: str = "HTTP"
    headers: tuple[tuple[str, str], ...] = ()
    service: str = ""  # gRPC health service name
    timeout: float = 1.0


def _probe(raw: Mapping[str, Any]) -> Probe:
    kind = str(raw["kind"])
    if kind not in ("http", "tcp", "grpc"):
        raise ValueError(f"unknown probe kind {kind!r}")
    port = int(raw["port"])
    if not 0 < port < 65536:
        raise ValueError(f"bad port {port}")
    timeout = float(raw.get("timeoutSeconds", 1) or 1)
    headers = tuple((str(h[0]), str(h[1])) for h in raw.get("headers") or ())
    return Probe(
        kind=kind,
        port=port,
        path=str(raw.get("path") or "/"),
        scheme=str(raw.get("scheme") or "HTTP").upper(),
        headers=headers,
        service=str(raw.get("service") or ""),
        timeout=timeout,
    )


def parse(text: str | None) -> dict[str, Probe]:
    """The probes of ``MESHPROXY_APP_PROBES``; bad entries are logged and skipped."""
    if not text:
        return {}
    try:
        data = json.loads(text)
    except ValueError as exc:
        log.error("ignoring %s: not JSON", ENV, extra={"error": str(exc)})
        return {}
    if not isinstance(data, dict):
        log.error("ignoring %s: not a JSON object", ENV)
        return {}
    probes: dict[str, Probe] = {}
    for path, raw in data.items():
        try:
            probes[str(path)] = _probe(raw)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            log.error("ignoring an app probe", extra={"path": path, "error": str(exc)})
    return probes


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class AppProbes:
    """Performs the app's original probes (see module doc)."""

    def __init__(self, probes: Mapping[str, Probe], host: str = "127.0.0.1") -> None:
        self.probes = MappingProxyType(dict(probes))
        self.host = host

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> AppProbes:
        return cls(parse(env.get(ENV)))

    async def check(self, path: str) -> int | None:
        probe = self.probes.get(path)
        if probe is None:
            return None
        try:
            async with asyncio.timeout(probe.timeout):
                ok = await self._run(probe)
        except (TimeoutError, OSError) as exc:
            log.info("app probe failed", extra={"probe": path, "error": str(exc) or type(exc).__name__})
            ok = False
        return 200 if ok else 503

    async def _run(self, probe: Probe) -> bool:
        if probe.kind == "tcp":
            _, writer = await asyncio.open_connection(self.host, probe.port)
            writer.close()
            return True
        if probe.kind == "http":
            scheme = "https" if probe.scheme == "HTTPS" else "http"
            url = f"{scheme}://{self.host}:{probe.port}{probe.path}"
            headers = {"user-agent": "kube-probe/meshproxy", **dict(probe.headers)}
            # Imported here: httpx costs ~7 MB of RSS per sidecar, and most pods have no HTTP probe.
            import httpx

            try:
                async with httpx.AsyncClient(verify=False, timeout=probe.timeout, trust_env=False) as client:
                    r = await client.get(url, headers=headers)
            except httpx.HTTPError as exc:
                raise OSError(str(exc) or type(exc).__name__) from exc
            return 200 <= r.status_code < 400
        return await self._grpc(probe)

    async def _grpc(self, probe: Probe) -> bool:
        import grpc
        import grpc.aio

        name = probe.service.encode()
        request = b"\x0a" + _varint(len(name)) + name if name else b""
        async with grpc.aio.insecure_channel(f"{self.host}:{probe.port}") as channel:
            # Raw bytes both ways: the two messages are tiny and hand-encoded above.
            call = channel.unary_unary(_GRPC_HEALTH, request_serializer=None, response_deserializer=None)
            try:
                reply: bytes = await call(request, timeout=probe.timeout)
            except grpc.aio.AioRpcError:
                return False
        return reply == _SERVING
