"""Span exporters: which backends get our spans, and counting what never arrives.

Owns: turning ``model.Tracing`` (and the standard ``OTEL_*`` environment
variables) into exporters of the kinds below.

Selection (first that applies):
  1. Endpoints in the config snapshot: ``otlp_grpc_endpoint``,
     ``otlp_http_endpoint``, ``zipkin_endpoint`` (any combination).
  2. Otherwise the sidecar's injected environment (``controlplane.inject``):
     ``MESHPROXY_OTLP_GRPC_ENDPOINT``, ``MESHPROXY_OTLP_HTTP_ENDPOINT``,
     ``MESHPROXY_ZIPKIN_ENDPOINT`` (any combination).
  3. Otherwise the standard environment, as every OpenTelemetry SDK reads it:
     ``OTEL_TRACES_EXPORTER`` (``otlp``, ``zipkin``, ``none``; comma list),
     ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``, ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL``
     (``grpc`` or ``http/protobuf``), ``OTEL_EXPORTER_ZIPKIN_ENDPOINT``,
     ``OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT``. With no exporter named, ``otlp`` is
     chosen only if an OTLP endpoint is set: a proxy without a backend exports nothing.
  TLS files and compression are read from the environment by the OpenTelemetry
  exporters themselves.

Kinds: OTLP/gRPC and OTLP/HTTP to a plaintext endpoint (the in-cluster case) are
``otlp_grpc.OtlpGrpcClient`` and ``otlp_http.OtlpHttpClient``, sending from the event loop;
with TLS (``https://``), compression (``OTEL_EXPORTER_OTLP_[TRACES_]COMPRESSION``) or
``MESHPROXY_OTLP_GRPC_CLIENT=sdk`` / ``MESHPROXY_OTLP_HTTP_CLIENT=sdk`` they are the
OpenTelemetry SDK's exporters instead: ``WireExporter``s, taking a request already encoded
by ``otlp_wire`` (``export_encoded``). Zipkin is the SDK's ``ZipkinExporter``, a
``SpanExporter`` taking SDK spans. Headers (``OTEL_EXPORTER_OTLP_[TRACES_]HEADERS``) apply
to every OTLP exporter.

Invariants:
  * The SDK exporters run on the export queues' worker threads, never on the event
    loop; the loop clients run on the loop and never block it.
  * A failed or raising export never propagates: the queue counts the batch as dropped
    (``meshproxy_spans_dropped_total{reason="export_failed"}``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol, Union, runtime_checkable

from opentelemetry.sdk.trace.export import SpanExporter

from meshproxy.config.model import Tracing

if TYPE_CHECKING:
    from meshproxy.telemetry.otlp_loop import LoopClient

log = logging.getLogger(__name__)

DEFAULT_EXPORT_TIMEOUT = 10.0  # seconds; the OpenTelemetry default, bounded by the batch worker


@runtime_checkable
class WireExporter(Protocol):
    """Sends one serialized ``ExportTraceServiceRequest`` of ``count`` spans; True if accepted."""

    def export_encoded(self, payload: bytes, count: int) -> bool: ...

    def shutdown(self) -> None: ...


AnyExporter = Union[WireExporter, SpanExporter, "LoopClient"]


def _timeout(env: Mapping[str, str]) -> float:
    raw = env.get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT") or env.get("OTEL_EXPORTER_OTLP_TIMEOUT")
    if not raw:
        return DEFAULT_EXPORT_TIMEOUT
    try:
        # The spec says milliseconds; the Python exporters' argument is seconds.
        return max(0.001, float(raw) / 1000.0)
    except ValueError:
        log.warning("ignoring invalid OTLP timeout %r", raw)
        return DEFAULT_EXPORT_TIMEOUT


def otlp_grpc(endpoint: str, timeout: float, env: Mapping[str, str]) -> AnyExporter:
    # "http://" means plaintext (in-cluster collectors usually are); "https://" means TLS.
    insecure = not endpoint.startswith("https://")
    compression = _env(env, "COMPRESSION")
    if insecure and not compression and env.get("MESHPROXY_OTLP_GRPC_CLIENT", "loop") != "sdk":
        # The common case: plaintext to an in-cluster collector, sent from the event loop.
        from meshproxy.telemetry.otlp_grpc import OtlpGrpcClient
        from meshproxy.telemetry.otlp_loop import parse_headers

        return OtlpGrpcClient(endpoint, timeout=timeout, headers=parse_headers(_env(env, "HEADERS")))
    # TLS, compression, credential plug-ins: the OpenTelemetry SDK's exporter (grpcio).
    from meshproxy.telemetry.otlp_export import WireOTLPGrpcExporter

    return WireOTLPGrpcExporter(endpoint=endpoint, insecure=insecure, timeout=timeout)


def _env(env: Mapping[str, str], name: str) -> str | None:
    """``OTEL_EXPORTER_OTLP_TRACES_<name>``, else ``OTEL_EXPORTER_OTLP_<name>``."""
    return env.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}") or env.get(f"OTEL_EXPORTER_OTLP_{name}")


def otlp_http(endpoint: str, timeout: float, env: Mapping[str, str]) -> AnyExporter:
    compression = _env(env, "COMPRESSION")
    if (
        endpoint.startswith("http://")
        and not compression
        and env.get("MESHPROXY_OTLP_HTTP_CLIENT", "loop") != "sdk"
    ):
        # The common case: plaintext to an in-cluster collector, sent from the event loop.
        from meshproxy.telemetry.otlp_http import OtlpHttpClient
        from meshproxy.telemetry.otlp_loop import parse_headers

        return OtlpHttpClient(endpoint, timeout=timeout, headers=parse_headers(_env(env, "HEADERS")))
    # TLS, compression: the OpenTelemetry SDK's exporter (requests, on a worker thread).
    from meshproxy.telemetry.otlp_export import WireOTLPHttpExporter

    return WireOTLPHttpExporter(endpoint=endpoint, timeout=timeout)


def zipkin(endpoint: str, timeout: float, env: Mapping[str, str]) -> AnyExporter:
    from opentelemetry.exporter.zipkin.json import ZipkinExporter

    return ZipkinExporter(endpoint=endpoint, timeout=max(1, round(timeout)))


_MESH_ENV = (
    ("otlp_grpc", "MESHPROXY_OTLP_GRPC_ENDPOINT"),
    ("otlp_http", "MESHPROXY_OTLP_HTTP_ENDPOINT"),
    ("zipkin", "MESHPROXY_ZIPKIN_ENDPOINT"),
)


def describe(settings: Tracing, env: Mapping[str, str]) -> list[tuple[str, str]]:
    """``(kind, endpoint)`` pairs to export to; kinds: ``otlp_grpc``, ``otlp_http``, ``zipkin``."""
    out: list[tuple[str, str]] = []
    if settings.otlp_grpc_endpoint:
        out.append(("otlp_grpc", settings.otlp_grpc_endpoint))
    if settings.otlp_http_endpoint:
        out.append(("otlp_http", settings.otlp_http_endpoint))
    if settings.zipkin_endpoint:
        out.append(("zipkin", settings.zipkin_endpoint))
    if out:
        return out
    for kind, var in _MESH_ENV:
        if env.get(var):
            out.append((kind, env[var]))
    if out:
        return out

    traces_ep = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    base_ep = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if not names:
        names = ["otlp"] if (traces_ep or base_ep) else []
    for name in names:
        if name == "none":
            return []
        if name == "otlp":
            protocol = (
                env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "grpc"
            )
            if protocol == "grpc":
                out.append(("otlp_grpc", traces_ep or base_ep or "http://localhost:4317"))
            elif protocol.startswith("http"):
                # The signal-specific endpoint is used as is; the base one gets the signal path.
                ep = traces_ep or (base_ep.rstrip("/") + "/v1/traces" if base_ep else None)
                out.append(("otlp_http", ep or "http://localhost:4318/v1/traces"))
            else:
                log.warning("unsupported OTLP protocol %r; ignoring", protocol)
        elif name == "zipkin":
            out.append(
                ("zipkin", env.get("OTEL_EXPORTER_ZIPKIN_ENDPOINT", "http://localhost:9411/api/v2/spans"))
            )
        else:
            log.warning("unsupported OTEL_TRACES_EXPORTER entry %r; ignoring", name)
    return out


_FACTORIES: dict[str, Callable[[str, float, Mapping[str, str]], AnyExporter]] = {
    "otlp_grpc": otlp_grpc,
    "otlp_http": otlp_http,
    "zipkin": zipkin,
}


def build(settings: Tracing, env: Mapping[str, str]) -> list[tuple[str, AnyExporter]]:
    """Named exporters for ``settings`` (see the module docstring for the selection)."""
    timeout = _timeout(env)
    return [(f"{kind}:{ep}", _FACTORIES[kind](ep, timeout, env)) for kind, ep in describe(settings, env)]
