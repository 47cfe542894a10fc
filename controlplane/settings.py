"""The control plane's settings: what it compiles and how it runs.

Owns: two frozen dataclasses, built once at start-up (``controlplane.cli``)
and passed explicitly to whoever needs them; nothing reads the environment
or flags anywhere else.

    MeshSettings          inputs of the pure compile step (cluster domain, telemetry)
    ControlPlaneSettings  the running process (ports, debounce, stream limits)

Every default says why it is what it is. Concurrency: none; plain data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshproxy.config.model import AccessLogMode, Propagation


@dataclass(frozen=True, slots=True)
class MeshSettings:
    """Mesh-wide inputs of ``compile_snapshot``; part of what makes a snapshot."""

    # The kubelet's --cluster-domain; "cluster.local" is the Kubernetes default and what
    # almost every cluster keeps.
    cluster_domain: str = "cluster.local"
    # Trace everything by default: the mesh is usually first installed to see traffic, and
    # a parent-based sampler keeps the cost under control of whoever starts the trace.
    sampling_ratio: float = 1.0
    # W3C is the standard; B3 multi-header is what Zipkin-era apps and Istio's samples send.
    propagation: tuple[Propagation, ...] = (Propagation.W3C, Propagation.B3_MULTI)
    otlp_grpc_endpoint: str | None = None
    otlp_http_endpoint: str | None = None
    zipkin_endpoint: str | None = None
    # Access logs are off by default: at mesh scale they cost more than metrics and spans.
    access_log: AccessLogMode = AccessLogMode.OFF
    metrics: bool = True


@dataclass(frozen=True, slots=True)
class ControlPlaneSettings:
    """How the control plane process runs."""

    mesh: MeshSettings = field(default_factory=MeshSettings)
    listen_address: str = "0.0.0.0"  # in a pod: every interface; tests pass 127.0.0.1
    grpc_port: int = 15010  # the mesh convention for plaintext discovery
    metrics_port: int = 15014  # Prometheus /metrics, /healthz, /ready
    webhook_port: int = 15017  # the injection webhook (HTTPS), served by controlplane.webhook
    # Debounce: a burst of watch events (a rollout touches many EndpointSlices and Pods) is
    # compiled once after this much quiet, but never later than max_delay after its first
    # event, so a continuous trickle of events cannot starve proxies of updates.
    debounce_quiet: float = 0.1
    debounce_max_delay: float = 1.0
    # The first event after debounce_quiet without one is compiled at once (leading edge):
    # most endpoint changes come alone (a pod turning ready or going away), and waiting
    # out the quiet period was 100 ms of every such change's convergence; events that
    # follow within the quiet period are debounced as above (one extra compile per burst).
    debounce_leading: bool = True
    # Responses waiting to be written to one proxy. Snapshots are coalesced (a writer always
    # sends the newest), so the queue only fills while a write is stuck on a proxy that does
    # not read; 16 distinct versions in that time means the proxy is far behind: close it.
    send_queue_size: int = 16
    # A single write blocked this long (HTTP/2 flow control: the proxy does not read) closes
    # the stream with RESOURCE_EXHAUSTED; the proxy reconnects and gets a fresh full snapshot.
    send_timeout: float = 30.0
    # HTTP/2 keepalive: ping every 10 s, give up 10 s after an unanswered ping, so a dead
    # proxy is noticed in about 20-30 s (the stream contract promises about 30 s).
    keepalive_time: float = 10.0
    keepalive_timeout: float = 10.0
    # Full snapshots in flight at once. A full snapshot of a big mesh is hundreds of KiB held
    # in memory (gRPC's transport queue) until the proxy has read it, so when every proxy
    # connects at once (a control plane restart, the first rollout) memory would peak at
    # proxies x snapshot: 1000 x 500 KiB in make bench-controlplane. Endpoint updates are
    # small and not limited. A response holds its slot until the proxy answers it (ACK or
    # NACK) or for full_push_slot_time at most, so a proxy that does not read delays the
    # others by that much, never blocks them.
    max_full_pushes: int = 32
    full_push_slot_time: float = 1.0
    # A 10,000-endpoint snapshot is a few MB; gRPC's 4 MB default would refuse it.
    max_message_bytes: int = 64 * 1024 * 1024
    # Grace period for in-flight streams when the process is asked to stop.
    shutdown_grace: float = 5.0
