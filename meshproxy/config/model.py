"""The proxy's configuration model: one immutable snapshot.

Owns: the frozen, slotted dataclasses every part of the proxy reads, and the
content-hash version of a snapshot.

Invariants:
  * Everything is immutable (frozen dataclasses, tuples, frozensets). A new
    config is a new ``Snapshot`` object swapped in with one assignment; a request
    captures the snapshot once at its start and keeps it to its end.
  * ``Snapshot.version`` is a hash of the canonical content, so two snapshots
    with equal content have equal versions whoever built them (the control
    plane's compile step, the static YAML loader, or the gRPC convert step).
  * Durations are float seconds; ``None`` means "not set / unlimited".

Concurrency: none; plain data.

The same schema is (a) compiled by the control plane, (b) streamed over gRPC
(``protos/meshapi/discovery/v1/discovery.proto`` mirrors it field for field)
and (c) written by hand as YAML for ``meshproxy run --config FILE``
(see ``meshproxy.config.load``).
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, NewType

ServiceKey = NewType("ServiceKey", str)
"""``<name>.<namespace>:<port>``, e.g. ``inventory-v1.demo:8080``. Unique per snapshot."""


class Protocol(enum.Enum):
    AUTO = "auto"  # sniff: HTTP/1.x, HTTP/2 prior knowledge, else opaque TCP
    HTTP1 = "http1"
    HTTP2 = "http2"  # h2c prior knowledge (gRPC inside the cluster)
    TCP = "tcp"  # opaque: never sniffed (server-first protocols, TLS passthrough)


class LbPolicy(enum.Enum):
    ROUND_ROBIN = "round_robin"
    LEAST_REQUEST = "least_request"  # power of two choices on in-flight requests
    RANDOM = "random"


class PathMatchKind(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"  # Gateway API PathPrefix semantics: segment-wise prefix
    REGEX = "regex"  # full match


class HeaderMatchKind(enum.Enum):
    EXACT = "exact"
    REGEX = "regex"


class Propagation(enum.Enum):
    W3C = "w3c"  # traceparent / tracestate
    B3 = "b3"  # single b3 header
    B3_MULTI = "b3multi"  # x-b3-traceid, x-b3-spanid, x-b3-sampled, ...


class AccessLogMode(enum.Enum):
    OFF = "off"
    ON = "on"
    SAMPLED = "sampled"  # only requests whose trace is sampled


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: str  # IPv4 or IPv6 literal
    port: int
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    weight: int = 1
    pod: str = ""  # pod name, for /clusters and logs (never a metric label)
    workload: str = ""  # e.g. the Deployment name
    zone: str = ""


@dataclass(frozen=True, slots=True)
class PathMatch:
    kind: PathMatchKind
    value: str


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    name: str  # lower-case
    value: str
    kind: HeaderMatchKind = HeaderMatchKind.EXACT


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """All set conditions must hold (AND). An empty match matches everything."""

    path: PathMatch | None = None
    method: str | None = None
    headers: tuple[HeaderMatch, ...] = ()


@dataclass(frozen=True, slots=True)
class WeightedBackend:
    service: ServiceKey
    weight: int = 1


@dataclass(frozen=True, slots=True)
class HeaderModifier:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RetryBudget:
    """At most ``ratio`` extra retries per request, never fewer than ``min_per_second``."""

    ratio: float = 0.2
    min_per_second: float = 10.0
    window: float = 10.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 2  # retries after the first try (so 3 tries in all)
    per_try_timeout: float | None = None
    retry_on: frozenset[str] = frozenset({"connect-failure", "reset", "unavailable"})
    """Conditions: ``connect-failure``, ``reset``, ``5xx``, ``gateway-error`` (502/503/504),
    ``retriable-status-codes`` (see ``status_codes``), ``unavailable`` (gRPC 14)."""
    status_codes: frozenset[int] = frozenset()
    backoff_base: float = 0.025
    backoff_max: float = 0.25
    budget: RetryBudget = field(default_factory=RetryBudget)
    max_body_bytes: int = 64 * 1024  # request bodies larger than this are never replayed


@dataclass(frozen=True, slots=True)
class CircuitBreaker:
    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024
    max_retries: int = 3
    # Failure accrual (Linkerd style): this many consecutive failures to the service open the
    # circuit; after open_duration (doubling up to max_open_duration) one probe is let through
    # (half-open); its success closes the circuit. 0 turns failure accrual off.
    consecutive_failures: int = 0
    open_duration: float = 5.0
    max_open_duration: float = 60.0


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    consecutive_5xx: int = 5
    consecutive_gateway_errors: int = 5
    consecutive_connect_failures: int = 3
    base_ejection_time: float = 30.0  # ejection n lasts n * base (capped by max_ejection_time)
    max_ejection_time: float = 300.0
    max_ejection_percent: int = 50
    # Panic threshold (Envoy's healthy_panic_threshold, Istio's minHealthPercent): with fewer
    # than this percentage of the usable endpoints healthy, ejections are ignored. 0: never.
    min_health_percent: int = 50


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Local token bucket, enforced by the server-side sidecar for its service."""

    requests_per_second: float
    burst: int


@dataclass(frozen=True, slots=True)
class FaultInjection:
    delay_percent: float = 0.0
    delay: float = 0.0
    abort_percent: float = 0.0
    abort_status: int = 503


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    """Resilience for requests to one service (from a ``TrafficPolicy`` CRD)."""

    timeout: float | None = 15.0  # whole request, all tries
    connect_timeout: float = 1.0
    retry: RetryPolicy | None = field(default_factory=RetryPolicy)
    circuit_breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    outlier_detection: OutlierDetection | None = field(default_factory=OutlierDetection)
    lb: LbPolicy = LbPolicy.LEAST_REQUEST
    rate_limit: RateLimit | None = None
    fault: FaultInjection | None = None
    idle_timeout: float = 60.0  # idle upstream keep-alive connections are closed after this


@dataclass(frozen=True, slots=True)
class Route:
    """An HTTP route of a service (from an HTTPRoute rule). First matching route wins."""

    name: str
    matches: tuple[RouteMatch, ...] = (RouteMatch(),)  # OR of matches
    backends: tuple[WeightedBackend, ...] = ()  # empty: the parent service itself
    timeout: float | None = None  # overrides TrafficPolicy.timeout
    retry: RetryPolicy | None = None  # overrides TrafficPolicy.retry
    request_headers: HeaderModifier = field(default_factory=HeaderModifier)
    response_headers: HeaderModifier = field(default_factory=HeaderModifier)


@dataclass(frozen=True, slots=True)
class Service:
    """A destination: one port of one Kubernetes Service."""

    name: str
    namespace: str
    port: int
    protocol: Protocol = Protocol.AUTO
    vips: tuple[str, ...] = ()  # ClusterIPs; outbound traffic is matched by (vip, port)
    hostnames: tuple[str, ...] = ()  # Host/:authority values (without port) that mean this service
    endpoints: tuple[Endpoint, ...] = ()
    routes: tuple[Route, ...] = ()  # empty: one default route to this service
    policy: TrafficPolicy = field(default_factory=TrafficPolicy)
    target_port: int | None = None  # endpoint port if endpoints do not carry one (informational)

    @property
    def key(self) -> ServiceKey:
        return ServiceKey(f"{self.name}.{self.namespace}:{self.port}")


@dataclass(frozen=True, slots=True)
class InboundPort:
    port: int
    protocol: Protocol = Protocol.AUTO
    service: str = ""  # name of the Service this port serves, for telemetry
    rate_limit: RateLimit | None = None


@dataclass(frozen=True, slots=True)
class Workload:
    """Who this proxy is: the labels of every span and metric it reports."""

    name: str = "unknown"
    namespace: str = "default"
    service_account: str = "default"
    pod: str = ""
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Inbound:
    ports: tuple[InboundPort, ...] = ()  # declared app ports; undeclared ports are sniffed
    app_address: str = "127.0.0.1"  # where the app listens inside the pod
    opaque_ports: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class Tracing:
    sampling_ratio: float = 1.0  # parent-based: a sampled parent is always followed
    propagation: tuple[Propagation, ...] = (Propagation.W3C, Propagation.B3_MULTI)
    otlp_grpc_endpoint: str | None = None  # e.g. "http://jaeger.observability:4317"
    otlp_http_endpoint: str | None = None  # e.g. "http://collector:4318/v1/traces"
    zipkin_endpoint: str | None = None  # e.g. "http://zipkin:9411/api/v2/spans"
    max_queue_size: int = 2048


@dataclass(frozen=True, slots=True)
class Telemetry:
    tracing: Tracing = field(default_factory=Tracing)
    access_log: AccessLogMode = AccessLogMode.OFF
    metrics: bool = True


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything one proxy needs. ``version`` is derived from the content."""

    workload: Workload = field(default_factory=Workload)
    services: tuple[Service, ...] = ()
    inbound: Inbound = field(default_factory=Inbound)
    telemetry: Telemetry = field(default_factory=Telemetry)
    version: str = ""

    def with_version(self) -> Snapshot:
        """Return this snapshot with ``version`` set to its content hash."""
        from dataclasses import replace

        return replace(self, version=content_version(self))


def to_plain(value: Any) -> Any:
    """Canonical plain-data form (dicts, lists, str, numbers): for hashing, JSON and golden files."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in fields(value) if f.name != "version"}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, frozenset):
        return sorted(to_plain(v) for v in value)
    if isinstance(value, tuple | list):
        return [to_plain(v) for v in value]
    return value


def content_version(snapshot: Snapshot) -> str:
    blob = json.dumps(to_plain(snapshot), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
