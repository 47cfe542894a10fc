"""The traffic series against prometheus-client's own Counter and Histogram.

``ProxyMetrics`` keeps the HTTP and TCP series as plain numbers and renders them at
scrape time. These tests build what it replaced (real ``Counter``/``Histogram``
objects with the same names, help, labels and buckets) in the test, feed both the
same observations, and compare the rendered text and OpenMetrics, sample for
sample; only the wall-clock values (``_created``, exemplar timestamps) are
normalised, and those are checked separately against the injected clock.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import prometheus_client.metrics
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

from meshproxy.telemetry.metrics import (
    DURATION_BUCKETS,
    HTTP_LABELS,
    TCP_LABELS,
    ProxyMetrics,
)

WALL = 1_700_000_000.25  # the injected wall clock: every _created and exemplar timestamp

TRAFFIC_FAMILIES = (
    "meshproxy_requests",
    "meshproxy_request_duration_seconds",
    "meshproxy_request_bytes",
    "meshproxy_response_bytes",
    "meshproxy_tcp_connections_opened",
    "meshproxy_tcp_connections_closed",
    "meshproxy_tcp_sent_bytes",
    "meshproxy_tcp_received_bytes",
)

ACCEPTS = (
    "",  # Prometheus text 0.0.4
    "text/plain; version=0.0.4",
    "text/plain; version=1.0.0; escaping=allow-utf-8",
    "application/openmetrics-text; version=1.0.0",
    "application/openmetrics-text; version=0.0.1",
)

A = (
    "source",
    "frontend",
    "demo",
    "inventory.demo:8080",
    "inventory-v1",
    "200",
    "",
    "items",
    "inventory-v1.demo:8080",
    "-",
)
B = (*A[:5], "503", "", "items", "inventory-v1.demo:8080", "UF")
C = ("destination", "frontend", "demo", "inventory", "inventory-v1", "200", "14", "", "", "-")


@dataclass(frozen=True)
class Hop:
    labels: tuple[str, ...]
    duration: float
    request_bytes: int
    response_bytes: int
    exemplar_at: float | None  # the hop's clock if sampled, None if not
    # What the refresh rule must decide for this hop (stated here, not recomputed, so the
    # reference side does not share the implementation's rule).
    exemplar: bool
    trace_id: int = 0
    span_id: int = 0


HOPS = (
    Hop(A, 0.0002, 10, 100, 100.0, True, 0xA1, 0x1),  # first in the 0.5 ms bucket: exemplar
    Hop(A, 0.0003, 0, 0, 100.5, False, 0xA2, 0x2),  # same bucket half a second later: kept
    Hop(A, 0.0005, 5, 0, None, False, 0xA3, 0x3),  # exactly on the 0.5 ms bound, unsampled
    Hop(A, 0.001, 0, 7, 100.6, True, 0xA4, 0x4),  # exactly on the 1 ms bound: that bucket's first
    Hop(A, 0.0004, 1, 1, 101.0, True, 0xA5, 0x5),  # 0.5 ms bucket exactly due again: replaced
    Hop(A, 10.0, 0, 0, None, False),  # on the last bound
    Hop(A, 12.5, 0, 0, 101.0, True, 0xA7, 0x7),  # past it: +Inf, its first exemplar
    Hop(A, 0.0, 0, 0, None, False),
    Hop(B, 0.07, 3, 0, None, False),
    Hop(B, 2.5, 0, 0, 50.0, True, (1 << 128) - 1, (1 << 64) - 1),  # widest ids, zero-padded
    Hop(C, 0.3, 0, 9, None, False),
    Hop(A, 0.02, 2, 20, 102.0, True, 0xA9, 0x9),
)

TA = ("source", "frontend", "demo", "db.demo:5432")
TB = ("destination", "unknown", "unknown", "db.demo:5432")
TC = ("source", "frontend", "demo", "cache.demo:6379")
# (labels, event): "open", ("close", sent, received), or "touch" (series looked up, nothing
# counted: TcpHop does that when metrics are off; the series shows as zeros, as before).
TCP_EVENTS: tuple[tuple[tuple[str, ...], object], ...] = (
    (TA, "open"),
    (TA, "open"),
    (TB, "open"),
    (TA, ("close", 100, 1000)),
    (TC, "touch"),
    (TB, ("close", 0, 0)),
    (TA, ("close", 1, 2)),
    (TA, "open"),  # still open
)


class Reference:
    """The old implementation's families: real prometheus-client objects."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
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
        self.tcp = [
            Counter(
                "meshproxy_tcp_connections_opened", "Opaque TCP connections opened.", TCP_LABELS, registry=r
            ),
            Counter(
                "meshproxy_tcp_connections_closed", "Opaque TCP connections closed.", TCP_LABELS, registry=r
            ),
            Counter(
                "meshproxy_tcp_sent_bytes",
                "Bytes sent to the upstream of opaque TCP connections.",
                TCP_LABELS,
                registry=r,
            ),
            Counter(
                "meshproxy_tcp_received_bytes",
                "Bytes received from the upstream of opaque TCP connections.",
                TCP_LABELS,
                registry=r,
            ),
        ]

    def hop(self, h: Hop) -> None:
        # All four children on the hop's first use, as the old http_children made them.
        requests = self.requests.labels(*h.labels)
        duration = self.duration.labels(*h.labels)
        req = self.request_bytes.labels(*h.labels)
        resp = self.response_bytes.labels(*h.labels)
        requests.inc()
        if h.exemplar:
            duration.observe(h.duration, {"trace_id": f"{h.trace_id:032x}", "span_id": f"{h.span_id:016x}"})
        else:
            duration.observe(h.duration)
        req.inc(h.request_bytes)
        resp.inc(h.response_bytes)

    def tcp_event(self, labels: tuple[str, ...], event: object) -> None:
        opened, closed, sent, received = (c.labels(*labels) for c in self.tcp)
        if event == "open":
            opened.inc()
        elif isinstance(event, tuple):
            _, n_sent, n_received = event
            closed.inc()
            sent.inc(n_sent)
            received.inc(n_received)


def feed(m: ProxyMetrics) -> None:
    """The same observations, through the series' recording methods (what ``hop`` calls)."""
    for h in HOPS:
        m.http_children(h.labels).record(
            h.duration, h.request_bytes, h.response_bytes, h.exemplar_at, h.trace_id, h.span_id
        )
    for labels, event in TCP_EVENTS:
        t = m.tcp_children(labels)
        if event == "open":
            t.record_open()
        elif isinstance(event, tuple):
            _, n_sent, n_received = event
            t.record_close(n_sent, n_received)


def reference() -> Reference:
    ref = Reference()
    for h in HOPS:
        ref.hop(h)
    for labels, event in TCP_EVENTS:
        ref.tcp_event(labels, event)
    return ref


class Traffic:
    """Only the traffic families of a registry (ProxyMetrics' also holds the other metrics)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        return (m for m in self._registry.collect() if m.name in TRAFFIC_FAMILIES)


_CREATED = re.compile(r"^(\S+_created(?:\{[^}]*\})?) \S+$", re.MULTILINE)
_EXEMPLAR_TS = re.compile(r"^(.* # \{[^}]*\} \S+) \S+$", re.MULTILINE)


def normalised(text: str) -> str:
    return _EXEMPLAR_TS.sub(r"\1 <ts>", _CREATED.sub(r"\1 <created>", text))


def render(registry: CollectorRegistry | Traffic, accept: str) -> str:
    encoder, _ = choose_encoder(accept)
    return encoder(registry).decode()


def samples(collector: CollectorRegistry | Traffic) -> list[Sample]:
    """Every sample, wall-clock values blanked."""
    out = []
    for m in collector.collect():
        for s in m.samples:
            value = 0.0 if s.name.endswith("_created") else s.value
            ex = s.exemplar._replace(timestamp=None) if s.exemplar is not None else None
            out.append(s._replace(value=value, exemplar=ex))
    return out


def new_metrics() -> ProxyMetrics:
    m = ProxyMetrics(wall_clock=lambda: WALL)
    feed(m)
    return m


@pytest.mark.parametrize("accept", ACCEPTS)
def test_exposition_matches_prometheus_client(accept: str) -> None:
    ref = reference()
    new = new_metrics()
    expected = render(ref.registry, accept)
    got = render(Traffic(new.registry), accept)
    # The scenario reaches what it means to: exemplars (OpenMetrics only) and _created.
    assert "_created" in expected
    assert (" # {" in expected) == accept.startswith("application/openmetrics-text; version=1")
    assert normalised(got) == normalised(expected)


def test_samples_match_prometheus_client() -> None:
    assert samples(Traffic(new_metrics().registry)) == samples(reference().registry)


def test_created_and_exemplar_timestamps_come_from_the_wall_clock() -> None:
    m = new_metrics()
    ss = [s for f in m.registry.collect() if f.name in TRAFFIC_FAMILIES for s in f.samples]
    created = [s.value for s in ss if s.name.endswith("_created")]
    # One per series per family: 3 HTTP label sets x 4 families, 3 TCP label sets x 4 families.
    assert created == [WALL] * (3 * 4 + 3 * 4)
    exemplars = [
        (s.labels["le"], s.exemplar.labels["trace_id"][-2:], s.exemplar.timestamp)
        for s in ss
        if s.exemplar is not None
    ]
    # One per bucket that had a sampled hop; A's 0.5 ms one is the hop that replaced the first.
    assert exemplars == [
        ("0.0005", "a5", WALL),
        ("0.001", "a4", WALL),
        ("0.025", "a9", WALL),
        ("+Inf", "a7", WALL),
        ("2.5", "ff", WALL),
    ]


def test_without_created_series_both_drop_them(monkeypatch: pytest.MonkeyPatch) -> None:
    # prometheus-client's switch (PROMETHEUS_DISABLE_CREATED_SERIES / disable_created_metrics()).
    monkeypatch.setattr(prometheus_client.metrics, "_use_created", False)
    for accept in ("", "application/openmetrics-text; version=1.0.0"):
        expected = render(reference().registry, accept)
        got = render(Traffic(new_metrics().registry), accept)
        assert "_created" not in got
        assert normalised(got) == normalised(expected)


def bucket_counts(m: ProxyMetrics, labels: tuple[str, ...]) -> dict[str, float]:
    want = dict(zip(HTTP_LABELS, labels, strict=True))
    return {
        s.labels["le"]: s.value
        for f in m.registry.collect()
        for s in f.samples
        if s.name == "meshproxy_request_duration_seconds_bucket"
        and {k: v for k, v in s.labels.items() if k != "le"} == want
    }


@pytest.mark.parametrize("bound_index", range(len(DURATION_BUCKETS)))
def test_a_value_on_a_bound_counts_in_that_bucket(bound_index: int) -> None:
    m = ProxyMetrics()
    bound = DURATION_BUCKETS[bound_index]
    m.http_children(A).record(bound, 0, 0, None, 0, 0)
    counts = bucket_counts(m, A)
    les = list(counts)
    assert les[-1] == "+Inf" and len(les) == len(DURATION_BUCKETS) + 1
    # Cumulative: 0 below the bound's bucket, 1 from it on.
    assert [counts[le] for le in les] == [0.0] * bound_index + [1.0] * (len(les) - bound_index)


def test_counts_and_sums_are_what_was_recorded() -> None:
    m = ProxyMetrics()
    c = m.http_children(A)
    c.record(0.003, 10, 200, None, 0, 0)
    c.record(0.2, 0, 0, None, 0, 0)
    c.record(30.0, 5, 1, None, 0, 0)
    t = m.tcp_children(TA)
    t.record_open()
    t.record_close(7, 9)
    labels = dict(zip(HTTP_LABELS, A, strict=True))
    r = m.registry
    assert r.get_sample_value("meshproxy_requests_total", labels) == 3
    assert r.get_sample_value("meshproxy_request_duration_seconds_count", labels) == 3
    assert r.get_sample_value("meshproxy_request_duration_seconds_sum", labels) == pytest.approx(30.203)
    assert r.get_sample_value("meshproxy_request_bytes_total", labels) == 15
    assert r.get_sample_value("meshproxy_response_bytes_total", labels) == 201
    assert bucket_counts(m, A) == {
        "0.0005": 0,
        "0.001": 0,
        "0.0025": 0,
        "0.005": 1,
        "0.01": 1,
        "0.025": 1,
        "0.05": 1,
        "0.1": 1,
        "0.25": 2,
        "0.5": 2,
        "1.0": 2,
        "2.5": 2,
        "5.0": 2,
        "10.0": 2,
        "+Inf": 3,
    }
    tl = dict(zip(TCP_LABELS, TA, strict=True))
    assert r.get_sample_value("meshproxy_tcp_connections_opened_total", tl) == 1
    assert r.get_sample_value("meshproxy_tcp_connections_closed_total", tl) == 1
    assert r.get_sample_value("meshproxy_tcp_sent_bytes_total", tl) == 7
    assert r.get_sample_value("meshproxy_tcp_received_bytes_total", tl) == 9


def test_series_are_never_dropped_however_many_there_are() -> None:
    # The old children cache was cleared at 4096 entries (the registry kept the series). Here the
    # series are the storage: past that many, the first one must still be there and keep counting.
    m = ProxyMetrics()
    first = m.http_children(A)
    first.record(0.01, 1, 1, None, 0, 0)
    for i in range(5000):
        m.http_children((*A[:5], str(1000 + i), *A[6:])).record(0.01, 0, 0, None, 0, 0)
    assert m.http_children(A) is first
    first.record(0.01, 1, 1, None, 0, 0)
    labels = dict(zip(HTTP_LABELS, A, strict=True))
    assert m.registry.get_sample_value("meshproxy_requests_total", labels) == 2
    assert len([s for s in samples(m.registry) if s.name == "meshproxy_requests_total"]) == 5001


def test_the_families_keep_their_place_and_their_names() -> None:
    m = ProxyMetrics()
    names = [f.name for f in m.registry.collect()]
    assert names[: len(TRAFFIC_FAMILIES)] == list(TRAFFIC_FAMILIES)
    assert names[len(TRAFFIC_FAMILIES)] == "meshproxy_retries"
    # describe() gives the registry the names: a clash is refused as with the old families...
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Counter("meshproxy_requests", "again", registry=m.registry)
    # ...and a restricted scrape finds them.
    m.http_children(A).record(0.01, 0, 0, None, 0, 0)
    only = m.registry.restricted_registry(["meshproxy_requests_total"])
    assert [s.name for f in only.collect() for s in f.samples] == ["meshproxy_requests_total"]


def test_wrong_label_counts_are_refused() -> None:
    m = ProxyMetrics()
    with pytest.raises(ValueError):
        m.http_children(A[:-1])
    with pytest.raises(ValueError):
        m.tcp_children((*TA, "extra"))
