"""Issue 3 as a user sees it through real sidecars: exact Prometheus counts, callers' trace context, dead exporter.

Topology (one lab for the module): pod ``tel`` runs the OTLP/gRPC receiver
(``meshproxy.lab.spanlog``, spans appended to a file), pod ``server`` the HTTP app, pods
``client`` and ``lonely`` the callers. ``client``'s and ``server``'s sidecars export spans to
``tel``; ``lonely``'s sidecar exports to a port where nothing listens.

What the existing tests leave open and this module covers: exact per-reporter counts in
``meshproxy_requests_total`` after a known number of requests, callers that bring their own
W3C-only or B3-only context (single and multi header) joining their trace through both
sidecars, and a dead exporter that costs no request.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from mesh_rig import PY, client, control, mesh_lab, metric, spawn_app, start_sidecar, wait_for

from meshproxy.config.model import (
    Endpoint,
    Inbound,
    InboundPort,
    Protocol,
    Service,
    Snapshot,
    Telemetry,
    Tracing,
    Workload,
)
from meshproxy.lab.mesh import admin_get, intercept, wait_sidecar
from meshproxy.lab.netns import Lab, Pod
from meshproxy.lab.otlp_receiver import ReceivedSpan
from meshproxy.lab.spanlog import read_spans

pytestmark = [pytest.mark.netns, pytest.mark.slow]

VIP = "198.19.0.30"
OTLP_PORT, DEAD_PORT = 4317, 4999
WEB = "web.demo"  # destination_service: the same "<name>.<namespace>" on both sides


@dataclass
class Mesh:
    lab: Lab
    client: Pod
    lonely: Pod
    server: Pod

    @property
    def spans_file(self) -> Any:
        return self.lab.logdir / "spans.jsonl"

    def series(self, pod: Pod, reporter: str, code: str) -> tuple[float, float]:
        """(requests_total, request_duration_seconds_count) for ``web`` with ``code``, on ``pod``'s sidecar."""
        text = admin_get(self.lab, pod, "/metrics")
        labels = {"reporter": reporter, "destination_service": WEB, "response_code": code}
        if reporter == "destination":
            labels.update(source_workload="client")
        return (
            metric(text, "meshproxy_requests_total", **labels),
            metric(text, "meshproxy_request_duration_seconds_count", **labels),
        )


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    with mesh_lab() as lab:
        tel = lab.add_pod("tel")
        spans = lab.spawn(
            tel,
            [
                PY,
                "-m",
                "meshproxy.lab.spanlog",
                "--port",
                str(OTLP_PORT),
                "--out",
                str(lab.logdir / "spans.jsonl"),
            ],
            name="otlp",
        )
        cl, lonely, sv = lab.add_pod("client"), lab.add_pod("lonely"), lab.add_pod("server")
        lab.wait_listening(tel, OTLP_PORT, timeout=20, proc=spans)
        spawn_app(lab, sv, "http-app", "--name", "server", "--port", "8080", port=8080)
        web = Service(
            name="web",
            namespace="demo",
            port=80,
            protocol=Protocol.HTTP1,
            vips=(VIP,),
            endpoints=(Endpoint(sv.ip, 8080, pod="server-0", workload="server"),),
        )

        def telemetry(port: int) -> Telemetry:
            return Telemetry(tracing=Tracing(otlp_grpc_endpoint=f"http://{tel.ip}:{port}"))

        inbound = Inbound(ports=(InboundPort(8080, Protocol.HTTP1, service="web"),))
        configs = {
            cl: (Snapshot(Workload("client", "demo"), (web,), telemetry=telemetry(OTLP_PORT)), {}),
            sv: (
                Snapshot(Workload("server", "demo"), (web,), inbound, telemetry=telemetry(OTLP_PORT)),
                {},
            ),
            # A short export timeout so that the dead exporter's failures show within seconds.
            lonely: (
                Snapshot(Workload("lonely", "demo"), (web,), telemetry=telemetry(DEAD_PORT)),
                {"OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "1000"},
            ),
        }
        started = []
        for pod, (snapshot, env) in configs.items():
            intercept(lab, pod)
            started.append(start_sidecar(lab, pod, snapshot, env=env, wait=False))
        for proc in started:
            wait_sidecar(lab, proc, timeout=30)
        yield Mesh(lab, cl, lonely, sv)


def test_prometheus_series_after_a_known_number_of_requests(mesh: Mesh) -> None:
    control(mesh.lab, mesh.server, "mode", area="failing", mode="fail")
    before = {
        (side, code): mesh.series(pod, reporter, code)
        for side, pod, reporter in (("src", mesh.client, "source"), ("dst", mesh.server, "destination"))
        for code in ("200", "503")
    }
    ok = client(mesh.lab, mesh.client, "load", f"http://{VIP}/counted/x", "-n", "7", "-c", "1")
    failed = client(mesh.lab, mesh.client, "load", f"http://{VIP}/failing/x", "-n", "3", "-c", "1")
    assert ok["status"] == {"200": 7} and failed["status"] == {"503": 3}
    expected = {"200": 7.0, "503": 3.0}
    for (side, code), (total0, count0) in before.items():
        pod, reporter = (mesh.client, "source") if side == "src" else (mesh.server, "destination")
        total, count = mesh.series(pod, reporter, code)
        # Counted exactly once per request on each side, in the counter and in the histogram.
        assert (total - total0, count - count0) == (expected[code], expected[code]), (side, code)


def _spans_of(mesh: Mesh, trace_id: str) -> dict[str, ReceivedSpan]:
    def both() -> dict[str, ReceivedSpan] | None:
        spans = {s.kind: s for s in read_spans(mesh.spans_file, trace_id)}
        return spans if {"CLIENT", "SERVER"} <= spans.keys() else None

    found: dict[str, ReceivedSpan] = wait_for(both, 30, f"CLIENT and SERVER spans of trace {trace_id}")
    return found


@pytest.mark.parametrize("style", ["w3c", "b3multi", "b3single"])
def test_caller_context_in_one_format_joins_its_trace(mesh: Mesh, style: str) -> None:
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    headers = {
        "w3c": [f"traceparent:00-{trace_id}-{parent}-01"],
        "b3multi": [f"x-b3-traceid:{trace_id}", f"x-b3-spanid:{parent}", "x-b3-sampled:1"],
        "b3single": [f"b3:{trace_id}-{parent}-1"],
    }[style]
    args = [arg for h in headers for arg in ("-H", h)]
    r = client(mesh.lab, mesh.client, "get", f"http://{VIP}/traced/{style}", *args)
    assert r["status"] == 200
    # The app behind the server's sidecar got the same trace, in the formats the mesh emits.
    seen = r["json"]["headers"]
    assert seen["traceparent"].split("-")[1] == trace_id
    assert seen["x-b3-traceid"] == trace_id
    spans = _spans_of(mesh, trace_id)
    assert spans["CLIENT"].service == "client" and spans["SERVER"].service == "server"
    assert spans["CLIENT"].parent_span_id == parent  # a child of the caller's own span
    assert spans["SERVER"].parent_span_id == spans["CLIENT"].span_id
    # The app's span id is the server sidecar's span (the next hop's parent).
    assert seen["traceparent"].split("-")[2] == spans["SERVER"].span_id


def test_dead_exporter_endpoint_costs_no_failed_requests(mesh: Mesh) -> None:
    r = client(mesh.lab, mesh.lonely, "load", f"http://{VIP}/lonely/x", "-n", "200", "-c", "4")
    assert r["status"] == {"200": 200} and not r["errors"], r

    def dropped() -> float:
        text = admin_get(mesh.lab, mesh.lonely, "/metrics")
        return metric(text, "meshproxy_spans_dropped_total", reason="export_failed")

    # The exporter really tried and failed (its spans were dropped and counted), off the
    # request path: traffic above was untouched by it.
    wait_for(dropped, 30, "spans dropped after failed exports")
    again = client(mesh.lab, mesh.lonely, "load", f"http://{VIP}/lonely/x", "-n", "50", "-c", "2")
    assert again["status"] == {"200": 50} and not again["errors"], again
