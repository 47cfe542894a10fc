"""Prometheus series after real hops: names, bounded labels, values, exemplars."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from tel_rig import MakeRig, head

from meshproxy.telemetry import Telemetry
from meshproxy.telemetry.hop import MAX_SOURCES, SOURCE_NAMESPACE_HEADER, SOURCE_WORKLOAD_HEADER


def samples(tel: Telemetry, name: str) -> list[Sample]:
    text = generate_latest(tel.metrics.registry).decode()
    return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def one(tel: Telemetry, name: str, **labels: str) -> float:
    found = [s for s in samples(tel, name) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, samples(tel, name))
    return float(found[0].value)


async def test_outbound_requests_are_counted_with_bounded_labels(make_rig: MakeRig) -> None:
    rig = make_rig(workload="frontend", namespace="demo")
    for i in range(5):
        h = head(path=f"/items/{i}?q={i}")
        hop = rig.tel.start_http(
            direction="outbound",
            head=h,
            peer=(f"198.18.0.{i + 1}", 4000 + i),
            destination_service="inventory.demo:8080",
        )
        hop.annotate(route="items", backend="inventory-v1.demo:8080", destination_workload="inventory-v1")
        hop.finish(
            status=200 if i < 3 else 503, flag=None if i < 3 else "UF", request_bytes=10, response_bytes=100
        )

    ok = one(rig.tel, "meshproxy_requests_total", response_code="200")
    failed = one(rig.tel, "meshproxy_requests_total", response_code="503")
    assert (ok, failed) == (3, 2)
    [s200] = [s for s in samples(rig.tel, "meshproxy_requests_total") if s.labels["response_code"] == "200"]
    assert s200.labels == {
        "reporter": "source",
        "source_workload": "frontend",
        "source_namespace": "demo",
        "destination_service": "inventory.demo:8080",
        "destination_workload": "inventory-v1",
        "response_code": "200",
        "grpc_status": "",
        "route": "items",
        "backend": "inventory-v1.demo:8080",
        "response_flag": "-",
    }
    assert one(rig.tel, "meshproxy_requests_total", response_code="503", response_flag="UF") == 2
    assert one(rig.tel, "meshproxy_request_duration_seconds_count", response_code="200") == 3
    assert one(rig.tel, "meshproxy_request_bytes_total", response_code="200") == 30
    assert one(rig.tel, "meshproxy_response_bytes_total", response_code="503") == 200
    # Never paths, IPs or trace ids in any label value.
    text = generate_latest(rig.tel.metrics.registry).decode()
    assert "/items" not in text and "198.18." not in text


async def test_inbound_reports_destination_and_caller_identity(make_rig: MakeRig) -> None:
    client = make_rig(workload="frontend", namespace="demo")
    server = make_rig(workload="inventory-v1", namespace="shop")
    h = head()
    out = client.tel.start_http(
        direction="outbound", head=h, peer=("127.0.0.1", 1), destination_service="inventory"
    )
    forwarded = h.with_headers(out.upstream_headers(h))
    inbound = server.tel.start_http(
        direction="inbound", head=forwarded, peer=("198.18.0.9", 5), destination_service="inventory"
    )
    inbound.finish(status=200, flag=None, request_bytes=0, response_bytes=0)
    out.finish(status=200, flag=None, request_bytes=0, response_bytes=0)

    (s,) = samples(server.tel, "meshproxy_requests_total")
    assert s.labels["reporter"] == "destination"
    assert (s.labels["source_workload"], s.labels["source_namespace"]) == ("frontend", "demo")
    assert s.labels["destination_workload"] == "inventory-v1"


async def test_caller_identity_from_the_network_cannot_explode_cardinality(make_rig: MakeRig) -> None:
    rig = make_rig()
    for i in range(MAX_SOURCES + 20):
        h = head(headers=((SOURCE_WORKLOAD_HEADER, f"w{i}"), (SOURCE_NAMESPACE_HEADER, "ns")))
        hop = rig.tel.start_http(
            direction="inbound", head=h, peer=("127.0.0.1", 1), destination_service="svc"
        )
        hop.finish(status=200, flag=None, request_bytes=0, response_bytes=0)
    bad = head(headers=((SOURCE_WORKLOAD_HEADER, "Not A Name!"), (SOURCE_NAMESPACE_HEADER, "ns")))
    rig.tel.start_http(
        direction="inbound", head=bad, peer=("127.0.0.1", 1), destination_service="svc"
    ).finish(status=200, flag=None, request_bytes=0, response_bytes=0)
    workloads = {s.labels["source_workload"] for s in samples(rig.tel, "meshproxy_requests_total")}
    assert len(workloads) == MAX_SOURCES + 1
    assert one(rig.tel, "meshproxy_requests_total", source_workload="unknown") == 21


async def test_grpc_status_label_and_tcp_counters(make_rig: MakeRig) -> None:
    rig = make_rig()
    h = head(path="/shop.Inventory/Get", headers=(("content-type", "application/grpc"),), version="2")
    hop = rig.tel.start_http(direction="outbound", head=h, peer=("127.0.0.1", 1), destination_service="inv")
    hop.finish(status=200, flag=None, request_bytes=5, response_bytes=7, grpc_status="14")
    assert one(rig.tel, "meshproxy_requests_total", grpc_status="14") == 1

    for sent, received in ((100, 1000), (1, 2)):
        tcp = rig.tel.tcp_opened(direction="outbound", destination_service="db.demo:5432")
        tcp.finish(bytes_sent=sent, bytes_received=received, flag=None)
    open_now = rig.tel.tcp_opened(direction="outbound", destination_service="db.demo:5432")
    labels = {"destination_service": "db.demo:5432", "reporter": "source"}
    assert one(rig.tel, "meshproxy_tcp_connections_opened_total", **labels) == 3
    assert one(rig.tel, "meshproxy_tcp_connections_closed_total", **labels) == 2
    assert one(rig.tel, "meshproxy_tcp_sent_bytes_total", **labels) == 101
    assert one(rig.tel, "meshproxy_tcp_received_bytes_total", **labels) == 1002
    open_now.finish(bytes_sent=0, bytes_received=0, flag="UF")
    open_now.finish(bytes_sent=0, bytes_received=0, flag="UF")  # idempotent
    assert one(rig.tel, "meshproxy_tcp_connections_closed_total", **labels) == 3


async def test_finish_twice_counts_once(make_rig: MakeRig) -> None:
    rig = make_rig()
    hop = rig.tel.start_http(
        direction="outbound", head=head(), peer=("127.0.0.1", 1), destination_service="b"
    )
    hop.finish(status=200, flag=None, request_bytes=0, response_bytes=0)
    hop.finish(status=500, flag="UR", request_bytes=0, response_bytes=0)
    assert [s.labels["response_code"] for s in samples(rig.tel, "meshproxy_requests_total")] == ["200"]
    assert len(rig.spans()) == 1


async def test_metrics_off_records_nothing(make_rig: MakeRig) -> None:
    rig = make_rig(metrics=False)
    rig.tel.start_http(
        direction="outbound", head=head(), peer=("127.0.0.1", 1), destination_service="b"
    ).finish(status=200, flag=None, request_bytes=0, response_bytes=0)
    assert samples(rig.tel, "meshproxy_requests_total") == []


def values(tel: Telemetry, name: str, **labels: str) -> list[float]:
    return [s.value for s in samples(tel, name) if all(s.labels.get(k) == v for k, v in labels.items())]


async def test_resilience_and_control_plane_metrics(make_rig: MakeRig) -> None:
    tel = make_rig().tel
    m = tel.metrics
    m.set_breaker_state("inventory.demo:8080", "open")
    m.set_breaker_state("cart.demo:80", "half_open")
    m.breaker_rejected("inventory.demo:8080", "max_requests")
    m.set_ejected("inventory.demo:8080", 2)
    m.ejection("inventory.demo:8080")
    m.rate_limited("inventory")
    m.retry("inventory.demo:8080")
    m.retry("inventory.demo:8080")
    m.set_config_version("abc123")
    m.set_config_version("def456")
    m.set_control_plane_connected(True)
    m.config_nack()
    assert values(tel, "meshproxy_circuit_breaker_state", destination="inventory.demo:8080") == [1]
    assert values(tel, "meshproxy_circuit_breaker_state", destination="cart.demo:80") == [2]
    assert values(tel, "meshproxy_circuit_breaker_rejections_total", limit="max_requests") == [1]
    assert values(tel, "meshproxy_ejected_endpoints") == [2]
    assert values(tel, "meshproxy_outlier_ejections_total") == [1]
    assert values(tel, "meshproxy_rate_limited_total", service="inventory") == [1]
    assert values(tel, "meshproxy_retries_total", destination="inventory.demo:8080") == [2]
    # Only the current version is exposed.
    assert [s.labels for s in samples(tel, "meshproxy_config_info")] == [{"version": "def456"}]
    assert values(tel, "meshproxy_control_plane_connected") == [1]
    assert values(tel, "meshproxy_config_nacks_total") == [1]
    m.set_control_plane_connected(False)
    assert values(tel, "meshproxy_control_plane_connected") == [0]
    m.forget_destination("inventory.demo:8080")
    assert values(tel, "meshproxy_circuit_breaker_state", destination="inventory.demo:8080") == []


async def test_exemplars_carry_the_trace_id_in_openmetrics_only(make_rig: MakeRig) -> None:
    rig = make_rig(ratio=1.0)
    hop = rig.tel.start_http(
        direction="outbound", head=head(), peer=("127.0.0.1", 1), destination_service="b"
    )
    hop.finish(status=200, flag=None, request_bytes=0, response_bytes=0)
    unsampled = make_rig(ratio=0.0)
    hop2 = unsampled.tel.start_http(
        direction="outbound", head=head(), peer=("127.0.0.1", 1), destination_service="b"
    )
    hop2.finish(status=200, flag=None, request_bytes=0, response_bytes=0)

    om = generate_openmetrics(rig.tel.metrics.registry).decode()
    exemplars = [
        s.exemplar
        for f in parse_openmetrics(om)
        for s in f.samples
        if s.name == "meshproxy_request_duration_seconds_bucket" and s.exemplar is not None
    ]
    assert len(exemplars) == 1
    assert exemplars[0].labels == {"trace_id": hop.trace_id, "span_id": hop.span_id}
    # The classic text format has no exemplars.
    assert hop.trace_id not in generate_latest(rig.tel.metrics.registry).decode()
    # No exemplar for an unsampled request: its trace id leads nowhere.
    om2 = generate_openmetrics(unsampled.tel.metrics.registry).decode()
    assert not [s for f in parse_openmetrics(om2) for s in f.samples if s.exemplar is not None]


async def test_a_bucket_exemplar_is_refreshed_at_most_once_per_interval() -> None:
    from meshproxy.config import model
    from meshproxy.telemetry import Telemetry
    from meshproxy.telemetry.metrics import EXEMPLAR_REFRESH

    now = [100.0]
    tel = Telemetry.build(
        model.Telemetry(tracing=model.Tracing(sampling_ratio=1.0)),
        model.Workload(name="a", namespace="demo"),
        env={},
        clock=lambda: now[0],
    )

    def request(seconds: float) -> str:
        hop = tel.start_http(
            direction="outbound", head=head(), peer=("127.0.0.1", 1), destination_service="b"
        )
        now[0] += seconds
        hop.finish(status=200, flag=None, request_bytes=0, response_bytes=0)
        return hop.trace_id

    def exemplars() -> dict[str, str]:
        om = generate_openmetrics(tel.metrics.registry).decode()
        return {
            s.labels["le"]: s.exemplar.labels["trace_id"]
            for f in parse_openmetrics(om)
            for s in f.samples
            if s.name == "meshproxy_request_duration_seconds_bucket" and s.exemplar is not None
        }

    first = request(0.0002)  # the 0.5 ms bucket
    request(0.0002)  # same bucket, right after: the first request's exemplar stays
    slow = request(2.0)  # a slow one lands in its own bucket and gets its exemplar at once
    assert exemplars() == {"0.0005": first, "2.5": slow}
    now[0] += EXEMPLAR_REFRESH
    later = request(0.0002)  # the interval has passed: the bucket shows a fresh example
    assert exemplars() == {"0.0005": later, "2.5": slow}
    await tel.shutdown(grace=1)
