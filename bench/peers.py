"""Sidecar configurations for ``make bench-peers``: meshproxy and its peers, side by side.

Owns: the text of every proxy's config in the peer benchmark (HAProxy, nginx, Traefik and
meshproxy's static snapshot), generated from one small description of a workload, so that
each proxy is configured the same way (two hops, keep-alive upstream, no access log).

Each "pod" of the lab runs one sidecar with the mesh's two listeners, both reached only
through ``meshproxy iptables install``'s REDIRECT rules:

    15001 outbound: the app's connection to <server>:<port> -> upstream <server>:<port>
    15006 inbound:  a peer's connection to this pod          -> the app on 127.0.0.1:<port>

A peer proxy (unlike meshproxy) cannot read the original destination of a redirected
connection, so its upstream is written into its config per workload; the benchmark restarts
the peers between workloads (HTTP, gRPC, opaque TCP) and starts meshproxy once, configured
for all three ports (the TCP port declared opaque).

Invariants: pure functions of their arguments (no I/O, no clock); the output is deterministic,
which the unit tests rely on. Concurrency: none.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from meshproxy.config.model import (
    AccessLogMode,
    Endpoint,
    Inbound,
    InboundPort,
    Protocol,
    Service,
    Snapshot,
    Telemetry,
    Tracing,
)
from meshproxy.config.model import Workload as MeshWorkload
from meshproxy.lab.mesh import config_yaml

OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
OTLP_HTTP_PORT = 4318  # the span sink's OTLP/HTTP port (bench.spancount --http-port)


class Kind(enum.Enum):
    """What a workload's connections carry; decides each proxy's mode."""

    HTTP = "http"  # HTTP/1.1 keep-alive (fortio load)
    GRPC = "grpc"  # gRPC unary over h2c (fortio load -grpc -ping)
    TCP = "tcp"  # opaque bulk transfer (iperf3), relayed byte for byte


@dataclass(frozen=True, slots=True)
class Workload:
    """One backend port of the server pod and how its traffic looks."""

    kind: Kind
    port: int


HTTP = Workload(Kind.HTTP, 8080)
GRPC = Workload(Kind.GRPC, 8079)
TCP = Workload(Kind.TCP, 5201)
WORKLOADS = (HTTP, GRPC, TCP)

_MESH_PROTOCOL = {Kind.HTTP: Protocol.HTTP1, Kind.GRPC: Protocol.HTTP2, Kind.TCP: Protocol.TCP}


# --- meshproxy ---------------------------------------------------------------------------------


def meshproxy_telemetry(enabled: bool, collector_ip: str) -> Telemetry:
    """Telemetry on: metrics + spans for every request (100%) exported over OTLP/HTTP to the
    sink at ``collector_ip`` (the chart's default transport, as in ``make bench``). Off: nothing."""
    if not enabled:
        return Telemetry(tracing=Tracing(sampling_ratio=0.0), access_log=AccessLogMode.OFF, metrics=False)
    endpoint = f"http://{collector_ip}:{OTLP_HTTP_PORT}/v1/traces"
    return Telemetry(tracing=Tracing(sampling_ratio=1.0, otlp_http_endpoint=endpoint), metrics=True)


def meshproxy_configs(
    server_ip: str,
    telemetry: Telemetry,
    workloads: tuple[Workload, ...] = WORKLOADS,
    *,
    opaque: bool = False,
) -> tuple[str, str]:
    """Static YAML for the client-side and the server-side sidecar, one service per workload.

    ``opaque``: every port declared opaque TCP, so both sidecars relay bytes without reading
    HTTP (the ``meshproxy-l4`` floor scenario: what the same two Python processes on uvloop cost
    before any layer-7 work).
    """

    def protocol(w: Workload) -> Protocol:
        return Protocol.TCP if opaque else _MESH_PROTOCOL[w.kind]

    services = tuple(
        Service(
            name=f"server-{w.kind.value}",
            namespace="bench",
            port=w.port,
            protocol=protocol(w),
            vips=(server_ip,),
            hostnames=("server", "server.bench"),
            endpoints=(Endpoint(address=server_ip, port=w.port, pod="server", workload="server"),),
        )
        for w in workloads
    )
    client = Snapshot(
        workload=MeshWorkload(name="client", namespace="bench", pod="client"),
        services=services,
        telemetry=telemetry,
    )
    server = Snapshot(
        workload=MeshWorkload(name="server", namespace="bench", pod="server"),
        services=services,
        inbound=Inbound(
            ports=tuple(
                InboundPort(port=w.port, protocol=protocol(w), service=f"server-{w.kind.value}")
                for w in workloads
            ),
            # Declared opaque so the sidecar never waits to sniff a protocol on it.
            opaque_ports=frozenset(w.port for w in workloads if protocol(w) is Protocol.TCP),
        ),
        telemetry=telemetry,
    )
    return config_yaml(client.with_version()), config_yaml(server.with_version())


# --- HAProxy -----------------------------------------------------------------------------------


def haproxy_conf(workload: Workload, server_ip: str) -> str:
    """One HAProxy process, one thread, both listeners; HTTP mode with upstream reuse, or TCP mode.

    ``http-reuse always`` keeps upstream connections shared across client connections, the
    closest HAProxy gets to a sidecar's connection pool; gRPC is h2c on both sides (``proto h2``).
    """
    mode = "tcp" if workload.kind is Kind.TCP else "http"
    h2 = " proto h2" if workload.kind is Kind.GRPC else ""
    lines = [
        "global",
        "  nbthread 1",
        "  maxconn 4096",
        "defaults",
        f"  mode {mode}",
        "  timeout connect 5s",
        "  timeout client 60s",
        "  timeout server 60s",
    ]
    if mode == "http":
        lines += ["  http-reuse always", "  option http-keep-alive"]
    for name, port, upstream in (
        ("outbound", OUTBOUND_PORT, f"{server_ip}:{workload.port}"),
        ("inbound", INBOUND_PORT, f"127.0.0.1:{workload.port}"),
    ):
        lines += [
            f"frontend {name}",
            f"  bind :{port}{h2}",
            f"  default_backend {name}_up",
            f"backend {name}_up",
            f"  server up {upstream}{h2}",
        ]
    return "\n".join(lines) + "\n"


# --- nginx -------------------------------------------------------------------------------------


def nginx_conf(workload: Workload, server_ip: str, workdir: str) -> str:
    """One nginx worker, both listeners; proxy_pass / grpc_pass with upstream keep-alive, or stream.

    The TCP workload needs Debian's ``libnginx-mod-stream`` (nginx-light has no stream module
    built in).
    """
    listeners = (
        (OUTBOUND_PORT, f"{server_ip}:{workload.port}", "outbound"),
        (INBOUND_PORT, f"127.0.0.1:{workload.port}", "inbound"),
    )
    head = [
        "load_module modules/ngx_stream_module.so;" if workload.kind is Kind.TCP else "",
        "daemon off;",
        "master_process on;",
        "worker_processes 1;",
        f"pid {workdir}/nginx.pid;",
        f"error_log {workdir}/error.log warn;",
        "events { worker_connections 4096; }",
    ]
    if workload.kind is Kind.TCP:
        body = ["stream {"]
        for port, upstream, name in listeners:
            body += [
                f"  upstream {name} {{ server {upstream}; }}",
                f"  server {{ listen {port} reuseport; proxy_pass {name}; }}",
            ]
        body.append("}")
        return "\n".join(line for line in head if line) + "\n" + "\n".join(body) + "\n"
    body = [
        "http {",
        "  access_log off;",
        f"  client_body_temp_path {workdir}/body; proxy_temp_path {workdir}/proxy;",
        f"  fastcgi_temp_path {workdir}/fcgi; uwsgi_temp_path {workdir}/uwsgi; scgi_temp_path {workdir}/scgi;",
    ]
    for port, upstream, name in listeners:
        body.append(f"  upstream {name} {{ server {upstream}; keepalive 64; }}")
        if workload.kind is Kind.GRPC:
            body += [
                f"  server {{ listen {port} reuseport http2;",
                f"    location / {{ grpc_pass grpc://{name}; }} }}",
            ]
        else:
            body += [
                f"  server {{ listen {port} reuseport;",
                f"    location / {{ proxy_pass http://{name}; proxy_http_version 1.1;",
                '      proxy_set_header Connection ""; proxy_set_header Host $host; proxy_buffering off; } }',
            ]
    body.append("}")
    return "\n".join(line for line in head if line) + "\n" + "\n".join(body) + "\n"


# --- Traefik -----------------------------------------------------------------------------------


def traefik_static(dynamic_path: str) -> str:
    """Traefik's static config: the two mesh entrypoints, the file provider, nothing else."""
    return (
        "global:\n"
        "  checkNewVersion: false\n"
        "  sendAnonymousUsage: false\n"
        "entryPoints:\n"
        "  outbound:\n"
        f'    address: ":{OUTBOUND_PORT}"\n'
        "  inbound:\n"
        f'    address: ":{INBOUND_PORT}"\n'
        "providers:\n"
        "  file:\n"
        f"    filename: {dynamic_path}\n"
        "    watch: false\n"
        "log:\n"
        "  level: ERROR\n"
    )


def traefik_dynamic(workload: Workload, server_ip: str) -> str:
    """Routers for both entrypoints; HTTP (h2c upstream for gRPC) or a TCP catch-all (HostSNI *)."""
    hops = (("outbound", server_ip), ("inbound", "127.0.0.1"))
    if workload.kind is Kind.TCP:
        out = ["tcp:", "  routers:"]
        for name, _ in hops:
            out += [
                f"    {name}:",
                f"      entryPoints: [{name}]",
                '      rule: "HostSNI(`*`)"',
                f"      service: {name}",
            ]
        out.append("  services:")
        for name, host in hops:
            out += [
                f"    {name}:",
                "      loadBalancer:",
                "        servers:",
                f'          - address: "{host}:{workload.port}"',
            ]
        return "\n".join(out) + "\n"
    scheme = "h2c" if workload.kind is Kind.GRPC else "http"
    out = ["http:", "  routers:"]
    for name, _ in hops:
        out += [
            f"    {name}:",
            f"      entryPoints: [{name}]",
            '      rule: "PathPrefix(`/`)"',
            f"      service: {name}",
        ]
    out.append("  services:")
    for name, host in hops:
        out += [
            f"    {name}:",
            "      loadBalancer:",
            "        passHostHeader: true",
            "        servers:",
            f'          - url: "{scheme}://{host}:{workload.port}"',
        ]
    return "\n".join(out) + "\n"
