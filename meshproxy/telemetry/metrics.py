"""The proxy's Prometheus metrics, registered on one registry built at start-up.

Owns: every metric family the sidecar exposes on ``/metrics`` and the cheap,
pre-bound recording paths the request pipeline calls.

Names follow Istio's standard metrics (``*_requests_total``,
``*_request_duration_seconds`` with a ``reporter`` label) with a ``meshproxy_``
prefix, so existing dashboards translate by renaming.

Invariants:
  * Labels are bounded: workload/namespace/service/route/backend names come from
    config, codes from a small set. Never paths, IPs, pod names or trace ids
    (trace ids travel as exemplars, which are not labels).
  * Nothing is registered on prometheus-client's global default registry; each
    ``ProxyMetrics`` owns its ``CollectorRegistry`` (so tests and several proxies
    in one process never collide).
  * Label children are cached per label tuple so the hot path is a dict lookup
    plus the increments; the cache is bounded (cleared when full: the series
    stay in the registry, only the shortcut is rebuilt).

Concurrency: called from the proxy's event-loop thread; prometheus-client's
metric values are themselves thread-safe, so the exporter threads may bump the
dropped-spans counter concurrently.
"""

from __future__ import annotations

import bisect
import contextlib
from dataclasses import dataclass, field
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

# Sub-millisecond (a local hop) up to 10 s (a slow upstream or a timeout).
DURATION_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

HTTP_LABELS: Final = (
    "reporter",
    "source_workload",
    "source_namespace",
    "destination_service",
    "destination_workload",
    "response_code",
    "grpc_status",
    "route",
    "backend",
    "response_flag",
)
TCP_LABELS: Final = ("reporter", "source_workload", "source_namespace", "destination_service")

BREAKER_STATES: Final = {"closed": 0, "open": 1, "half_open": 2, "half-open": 2, "halfopen": 2}

_CACHE_LIMIT: Final = 4096


# An exemplar is kept per histogram bucket and only the last one is scraped, so refreshing a
# bucket's more often than this is work nobody sees (validating and storing one is ~4 us, the
# largest single cost of a traced request's metrics). A bucket that has not had one for this
# long (a rare slow request) always gets the new one.
EXEMPLAR_REFRESH: Final = 1.0  # seconds


@dataclass(frozen=True, slots=True)
class _HttpChildren:
    requests: Counter
    duration: Histogram
    request_bytes: Counter
    response_bytes: Counter
    # Per duration bucket (DURATION_BUCKETS and +Inf): when its exemplar may be replaced.
    exemplar_due: list[float] = field(default_factory=lambda: [0.0] * (len(DURATION_BUCKETS) + 1))

    def observe(self, duration: float, now: float, trace_id: int, span_id: int) -> None:
        """``duration`` into the histogram, with an exemplar if its bucket is due for one."""
        i = bisect.bisect_left(DURATION_BUCKETS, duration)
        if now >= self.exemplar_due[i]:
            self.exemplar_due[i] = now + EXEMPLAR_REFRESH
            self.duration.observe(duration, {"trace_id": f"{trace_id:032x}", "span_id": f"{span_id:016x}"})
        else:
            self.duration.observe(duration)


@dataclass(frozen=True, slots=True)
class _TcpChildren:
    opened: Counter
    closed: Counter
    sent: Counter
    received: Counter


class ProxyMetrics:
    """All metric families of one proxy, plus the setters the pipeline calls."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "meshproxy_requests", "HTTP/gRPC requests handled by this proxy.", HTTP_LABELS, registry=r
        )
        self.duration = Histogram(
            "meshproxy_request_duration_seconds",
            "Time from the request head to the end of the response, as seen by this proxy.",
            HTTP_LABELS,
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.request_bytes = Counter(
            "meshproxy_request_bytes", "Request body bytes received from downstream.", HTTP_LABELS, registry=r
        )
        self.response_bytes = Counter(
            "meshproxy_response_bytes", "Response body bytes sent downstream.", HTTP_LABELS, registry=r
        )
        self.tcp_opened = Counter(
            "meshproxy_tcp_connections_opened", "Opaque TCP connections opened.", TCP_LABELS, registry=r
        )
        self.tcp_closed = Counter(
            "meshproxy_tcp_connections_closed", "Opaque TCP connections closed.", TCP_LABELS, registry=r
        )
        self.tcp_sent = Counter(
            "meshproxy_tcp_sent_bytes",
            "Bytes sent to the upstream of opaque TCP connections.",
            TCP_LABELS,
            registry=r,
        )
        self.tcp_received = Counter(
            "meshproxy_tcp_received_bytes",
            "Bytes received from the upstream of opaque TCP connections.",
            TCP_LABELS,
            registry=r,
        )
        self.retries = Counter(
            "meshproxy_retries", "Retries sent to a destination.", ("destination",), registry=r
        )
        self.breaker_state = Gauge(
            "meshproxy_circuit_breaker_state",
            "Circuit state per destination: 0 closed, 1 open, 2 half-open.",
            ("destination",),
            registry=r,
        )
        self.breaker_rejections = Counter(
            "meshproxy_circuit_breaker_rejections",
            "Requests refused locally by a circuit breaker, by the limit that tripped.",
            ("destination", "limit"),
            registry=r,
        )
        self.outlier_ejections = Counter(
            "meshproxy_outlier_ejections",
            "Endpoints ejected by outlier detection.",
            ("destination",),
            registry=r,
        )
        self.ejected_endpoints = Gauge(
            "meshproxy_ejected_endpoints", "Endpoints currently ejected.", ("destination",), registry=r
        )
        self.panic_requests = Counter(
            "meshproxy_lb_panic_requests",
            "Endpoint picks made in panic mode (too few healthy endpoints: outlier ejection ignored).",
            ("destination",),
            registry=r,
        )
        self.rate_limited_requests = Counter(
            "meshproxy_rate_limited", "Requests refused by the local rate limiter.", ("service",), registry=r
        )
        self.config_info = Info("meshproxy_config", "Version of the config snapshot in use.", registry=r)
        self.control_plane_connected = Gauge(
            "meshproxy_control_plane_connected", "1 while the discovery stream is up.", registry=r
        )
        self.config_nacks = Counter(
            "meshproxy_config_nacks", "Snapshots rejected (NACKed) by this proxy.", registry=r
        )
        self.spans_dropped = Counter(
            "meshproxy_spans_dropped",
            "Finished spans never delivered: queue full (backend too slow or down) or export failed.",
            ("reason",),
            registry=r,
        )
        self.access_log_dropped = Counter(
            "meshproxy_access_log_dropped",
            "Access log lines dropped because the writer could not keep up.",
            registry=r,
        )
        self._http: dict[tuple[str, ...], _HttpChildren] = {}
        self._tcp: dict[tuple[str, ...], _TcpChildren] = {}
        self._dropped_queue_full = self.spans_dropped.labels("queue_full")
        self._dropped_export_failed = self.spans_dropped.labels("export_failed")

    # -- hot path ---------------------------------------------------------------------------------

    def http_children(self, labels: tuple[str, ...]) -> _HttpChildren:
        """Pre-bound children for one label tuple (in ``HTTP_LABELS`` order)."""
        c = self._http.get(labels)
        if c is None:
            if len(self._http) >= _CACHE_LIMIT:
                self._http.clear()
            c = _HttpChildren(
                self.requests.labels(*labels),
                self.duration.labels(*labels),
                self.request_bytes.labels(*labels),
                self.response_bytes.labels(*labels),
            )
            self._http[labels] = c
        return c

    def tcp_children(self, labels: tuple[str, ...]) -> _TcpChildren:
        c = self._tcp.get(labels)
        if c is None:
            if len(self._tcp) >= _CACHE_LIMIT:
                self._tcp.clear()
            c = _TcpChildren(
                self.tcp_opened.labels(*labels),
                self.tcp_closed.labels(*labels),
                self.tcp_sent.labels(*labels),
                self.tcp_received.labels(*labels),
            )
            self._tcp[labels] = c
        return c

    # -- resilience and control-plane state (called by the pipeline and the xds client) ----------

    def set_breaker_state(self, destination: str, state_name: str) -> None:
        """``state_name``: ``closed``, ``open`` or ``half_open`` (case-insensitive)."""
        self.breaker_state.labels(destination).set(BREAKER_STATES[state_name.lower()])

    def breaker_rejected(self, destination: str, limit: str) -> None:
        """``limit``: which limit refused it, e.g. ``max_requests``, ``max_pending``, ``open``."""
        self.breaker_rejections.labels(destination, limit).inc()

    def set_ejected(self, destination: str, n: int) -> None:
        self.ejected_endpoints.labels(destination).set(n)

    def ejection(self, destination: str) -> None:
        self.outlier_ejections.labels(destination).inc()

    def lb_panic(self, destination: str) -> None:
        self.panic_requests.labels(destination).inc()

    def rate_limited(self, service: str) -> None:
        self.rate_limited_requests.labels(service).inc()

    def retry(self, destination: str) -> None:
        self.retries.labels(destination).inc()

    def set_config_version(self, version: str) -> None:
        self.config_info.info({"version": version})

    def set_control_plane_connected(self, connected: bool) -> None:
        self.control_plane_connected.set(1 if connected else 0)

    def config_nack(self) -> None:
        self.config_nacks.inc()

    def forget_destination(self, destination: str) -> None:
        """Drop a destination's gauges once it leaves the config (so they don't linger as stale series)."""
        for g in (self.breaker_state, self.ejected_endpoints):
            with contextlib.suppress(KeyError):
                g.remove(destination)

    # -- exporter threads ----------------------------------------------------------------------

    def spans_dropped_queue_full(self, n: int = 1) -> None:
        self._dropped_queue_full.inc(n)

    def spans_dropped_export_failed(self, n: int) -> None:
        self._dropped_export_failed.inc(n)
