"""The proxy's Prometheus metrics, registered on one registry built at start-up.

Owns: every metric family the sidecar exposes on ``/metrics``, and the storage
and recording paths of the per-request ones. The HTTP and TCP traffic series
(``meshproxy_requests_total``, ``meshproxy_request_duration_seconds``,
``meshproxy_{request,response}_bytes_total``, ``meshproxy_tcp_*``) are plain
Python numbers in ``HttpSeries``/``TcpSeries`` objects, turned into metric
families only when scraped, by ``TrafficCollector`` (prometheus-client's
custom-collector API). Recording an HTTP hop is then a dict lookup plus a few
additions: ~0.5 us with ``HttpSeries.record``, against ~2.5 us for the four
lock-taking prometheus-client calls it replaces
(~4.6 us when one of them stored an exemplar), on a hop of ~50 us. Everything else
(resilience, control-plane and exporter metrics, all rare) stays ordinary
prometheus-client objects.

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
  * The traffic families are exposed exactly as prometheus-client's ``Counter``
    and ``Histogram`` would expose the same observations: names, help texts,
    label names and order, cumulative buckets with ``le`` inclusive (a value equal
    to a bound counts in that bound's bucket), ``_count``/``_sum``, ``_created``
    (unless prometheus-client's created series are disabled), and bucket
    exemplars in OpenMetrics only (tests/unit/telemetry/test_tel_metrics_parity.py
    compares the two renderings).
  * A series, once created, lives as long as its ``ProxyMetrics``: Prometheus
    counters must not reset while the process lives. (This is the old
    behaviour too: prometheus-client never forgot a label child.)

Concurrency: the traffic series have no lock. They are written by the hop code
(``meshproxy.telemetry.hop``) and read by the admin server's ``/metrics`` (which
renders synchronously), both on the proxy's event-loop thread, so a scrape never
interleaves with a write. Calling ``http_children``/``tcp_children`` or a series'
methods from another thread is not allowed. The prometheus-client metrics are
thread-safe themselves: the exporter threads bump the dropped-spans counter
concurrently.
"""

from __future__ import annotations

import contextlib
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Final, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Info
from prometheus_client import metrics as _prometheus_metrics
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.samples import Exemplar, Sample
from prometheus_client.utils import floatToGoString

# Sub-millisecond (a local hop) up to 10 s (a slow upstream or a timeout).
DURATION_BUCKETS: Final[tuple[float, ...]] = (
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

# An exemplar is kept per histogram bucket and only the last one is scraped, so refreshing a
# bucket's more often than this is work nobody sees. A bucket that has not had one for this
# long (a rare slow request) always gets the new one.
EXEMPLAR_REFRESH: Final = 1.0  # seconds

# The traffic families: (name as prometheus-client's metric families carry it, help text).
REQUESTS: Final = ("meshproxy_requests", "HTTP/gRPC requests handled by this proxy.")
DURATION: Final = (
    "meshproxy_request_duration_seconds",
    "Time from the request head to the end of the response, as seen by this proxy.",
)
REQUEST_BYTES: Final = ("meshproxy_request_bytes", "Request body bytes received from downstream.")
RESPONSE_BYTES: Final = ("meshproxy_response_bytes", "Response body bytes sent downstream.")
TCP_OPENED: Final = ("meshproxy_tcp_connections_opened", "Opaque TCP connections opened.")
TCP_CLOSED: Final = ("meshproxy_tcp_connections_closed", "Opaque TCP connections closed.")
TCP_SENT: Final = ("meshproxy_tcp_sent_bytes", "Bytes sent to the upstream of opaque TCP connections.")
TCP_RECEIVED: Final = (
    "meshproxy_tcp_received_bytes",
    "Bytes received from the upstream of opaque TCP connections.",
)

# The ``le`` label of each bucket, spelled as prometheus-client spells it (``+Inf`` last).
_LE: Final = tuple(
    cast(Callable[[float], str], floatToGoString)(b) for b in (*DURATION_BUCKETS, float("inf"))
)

# trace id, span id, observed duration, wall-clock time of the observation.
_RawExemplar = tuple[int, int, float, float]


class HttpSeries:
    """The four HTTP series of one label tuple (in ``HTTP_LABELS`` order)."""

    __slots__ = (
        "_wall_clock",
        "buckets",
        "counts",
        "created",
        "duration_sum",
        "exemplar_due",
        "exemplars",
        "label_values",
    )

    def __init__(self, label_values: tuple[str, ...], wall_clock: Callable[[], float]) -> None:
        self.label_values = label_values
        self._wall_clock = wall_clock
        self.created = wall_clock()
        # requests, request bytes, response bytes (ints while they are added ints).
        self.counts: list[float] = [0, 0, 0]
        # Per duration bucket (DURATION_BUCKETS then +Inf), not cumulative: the scrape sums them.
        self.buckets: list[int] = [0] * len(_LE)
        self.duration_sum = 0.0
        # Per bucket: its latest exemplar, and when that may be replaced (on the hop's clock).
        self.exemplars: list[_RawExemplar | None] = [None] * len(_LE)
        self.exemplar_due: list[float] = [0.0] * len(_LE)

    def record(
        self,
        duration: float,
        request_bytes: int,
        response_bytes: int,
        exemplar_at: float | None,
        trace_id: int,
        span_id: int,
    ) -> None:
        """One finished request: counted, its body bytes (non-negative) added, ``duration``
        (seconds) into the histogram. ``exemplar_at`` is the hop's clock when the request was
        sampled (its trace exists) and None when not: a sampled request becomes its bucket's
        exemplar if the bucket has not had one for ``EXEMPLAR_REFRESH`` seconds.

        ``duration`` is a clock difference, so never NaN (which prometheus-client would have
        counted in no bucket)."""
        counts = self.counts
        counts[0] += 1
        counts[1] += request_bytes
        counts[2] += response_bytes
        self.duration_sum += duration
        # bisect_left: the first bound >= duration, so a value equal to a bound is counted in
        # that bound's bucket (``le`` is inclusive, as in prometheus-client); past the last
        # bound, the +Inf bucket.
        i = bisect_left(DURATION_BUCKETS, duration)
        self.buckets[i] += 1
        if exemplar_at is not None and exemplar_at >= self.exemplar_due[i]:
            self.exemplar_due[i] = exemplar_at + EXEMPLAR_REFRESH
            self.exemplars[i] = (trace_id, span_id, duration, self._wall_clock())


class TcpSeries:
    """The four TCP series of one label tuple (in ``TCP_LABELS`` order)."""

    __slots__ = ("counts", "created", "label_values")

    def __init__(self, label_values: tuple[str, ...], wall_clock: Callable[[], float]) -> None:
        self.label_values = label_values
        self.created = wall_clock()
        # opened, closed, bytes sent, bytes received.
        self.counts: list[float] = [0, 0, 0, 0]

    def record_open(self) -> None:
        """One connection opened."""
        self.counts[0] += 1

    def record_close(self, bytes_sent: int, bytes_received: int) -> None:
        """One connection closed, having sent ``bytes_sent`` to its upstream and received
        ``bytes_received`` from it (both non-negative)."""
        counts = self.counts
        counts[1] += 1
        counts[2] += bytes_sent
        counts[3] += bytes_received


def _created_enabled() -> bool:
    # prometheus-client's own switch (PROMETHEUS_DISABLE_CREATED_SERIES, or
    # disable_created_metrics()), read at every scrape as its Counter and Histogram do, so the
    # ``_created`` samples come and go with the library's setting. No public getter exists.
    return bool(getattr(_prometheus_metrics, "_use_created", True))


class TrafficCollector:
    """Renders the HTTP and TCP series as the metric families prometheus-client's ``Counter``
    and ``Histogram`` would: one family per name, one sample set per series, in the order the
    series were created."""

    def __init__(self) -> None:
        # Unbounded in the same sense the prometheus-client families were (they never forgot a
        # child): a series is the running total of a Prometheus counter, so dropping one would
        # reset it while the process lives. What bounds these dicts is the label values
        # (config-derived names, capped caller identities in ``hop``), not an eviction. The old
        # 4096-entry *shortcut* cache was cleared when full only because the registry kept the
        # real series; here the dict is the series, so it is never cleared.
        self.http: dict[tuple[str, ...], HttpSeries] = {}
        self.tcp: dict[tuple[str, ...], TcpSeries] = {}

    def describe(self) -> Iterator[Metric]:
        """The families without samples: lets the registry check for name clashes (and serve
        ``restricted_registry``) without a collect."""
        yield CounterMetricFamily(*REQUESTS, labels=HTTP_LABELS)
        yield HistogramMetricFamily(*DURATION, labels=HTTP_LABELS)
        yield CounterMetricFamily(*REQUEST_BYTES, labels=HTTP_LABELS)
        yield CounterMetricFamily(*RESPONSE_BYTES, labels=HTTP_LABELS)
        for family in (TCP_OPENED, TCP_CLOSED, TCP_SENT, TCP_RECEIVED):
            yield CounterMetricFamily(*family, labels=TCP_LABELS)

    def collect(self) -> Iterator[Metric]:
        created = _created_enabled()
        # Copies: a caller iterating lazily on another thread must not see the dicts change size.
        http = list(self.http.values())
        tcp = list(self.tcp.values())
        yield _counter(REQUESTS, HTTP_LABELS, http, 0, created)
        yield _histogram(http, created)
        yield _counter(REQUEST_BYTES, HTTP_LABELS, http, 1, created)
        yield _counter(RESPONSE_BYTES, HTTP_LABELS, http, 2, created)
        for slot, family in enumerate((TCP_OPENED, TCP_CLOSED, TCP_SENT, TCP_RECEIVED)):
            yield _counter(family, TCP_LABELS, tcp, slot, created)


def _counter(
    family: tuple[str, str],
    label_names: tuple[str, ...],
    series: list[HttpSeries] | list[TcpSeries],
    slot: int,
    created: bool,
) -> CounterMetricFamily:
    m = CounterMetricFamily(*family, labels=label_names)
    for s in series:
        m.add_metric(s.label_values, float(s.counts[slot]), created=s.created if created else None)
    return m


def _histogram(series: list[HttpSeries], created: bool) -> HistogramMetricFamily:
    name = DURATION[0]
    m = HistogramMetricFamily(*DURATION, labels=HTTP_LABELS)
    for s in series:
        buckets: list[tuple[str, float] | tuple[str, float, Exemplar]] = []
        acc = 0.0
        for le, n, raw in zip(_LE, s.buckets, s.exemplars, strict=True):
            acc += n
            if raw is None:
                buckets.append((le, acc))
            else:
                trace_id, span_id, value, at = raw
                labels = {"trace_id": f"{trace_id:032x}", "span_id": f"{span_id:016x}"}
                buckets.append((le, acc, Exemplar(labels, value, at)))
        m.add_metric(s.label_values, buckets, s.duration_sum)
        if created:
            m.samples.append(
                Sample(name + "_created", dict(zip(HTTP_LABELS, s.label_values, strict=True)), s.created)
            )
    return m


class ProxyMetrics:
    """All metric families of one proxy, plus the setters the pipeline calls.

    ``wall_clock`` stamps series creation (``_created``) and exemplars, as prometheus-client's
    ``time.time()`` did."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, wall_clock: Callable[[], float] = time.time
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._wall_clock = wall_clock
        r = self.registry
        # Registered first: the traffic families keep their place at the top of /metrics.
        self.traffic = TrafficCollector()
        r.register(self.traffic)
        self._http = self.traffic.http
        self._tcp = self.traffic.tcp
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
        self._dropped_queue_full = self.spans_dropped.labels("queue_full")
        self._dropped_export_failed = self.spans_dropped.labels("export_failed")

    # -- hot path ---------------------------------------------------------------------------------

    def http_children(self, labels: tuple[str, ...]) -> HttpSeries:
        """The series of one label tuple (in ``HTTP_LABELS`` order), created on first use."""
        s = self._http.get(labels)
        if s is None:
            if len(labels) != len(HTTP_LABELS):
                raise ValueError(f"expected {len(HTTP_LABELS)} label values, got {len(labels)}")
            s = self._http[labels] = HttpSeries(labels, self._wall_clock)
        return s

    def tcp_children(self, labels: tuple[str, ...]) -> TcpSeries:
        """The series of one label tuple (in ``TCP_LABELS`` order), created on first use."""
        s = self._tcp.get(labels)
        if s is None:
            if len(labels) != len(TCP_LABELS):
                raise ValueError(f"expected {len(TCP_LABELS)} label values, got {len(labels)}")
            s = self._tcp[labels] = TcpSeries(labels, self._wall_clock)
        return s

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
