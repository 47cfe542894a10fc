"""A -> B -> C through real sidecars in the netns lab: one trace, the right parent links.

The demo topology (client -> frontend -> catalog -> inventory) runs with interception and
a sidecar per pod, every sidecar exporting OTLP/gRPC to the lab's receiver pod
(``meshproxy.lab.spanlog``, built on ``OtlpReceiver``). One request must give the span chain

    client CLIENT -> frontend SERVER -> frontend CLIENT -> catalog SERVER -> catalog CLIENT -> inventory-vN SERVER

with the mesh attributes set, and the server-side sidecars' metrics must name their caller.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshproxy.lab.demo import Demo
from meshproxy.lab.mesh import admin_get
from meshproxy.lab.netns import Lab, wait_until
from meshproxy.lab.spanlog import read_spans
from tests.support.require import require_lab

pytestmark = [pytest.mark.netns, pytest.mark.slow]


@pytest.fixture
def world_readable_lab() -> Iterator[Lab]:
    """A lab whose workdir the proxy UID can read.

    The shared ``lab`` fixture puts the workdir under pytest's ``tmp_path``, whose parents are
    mode 0700, so a sidecar running as the proxy UID cannot read its config there. ``Lab()``
    without a workdir makes its own under /tmp (and removes it on close).
    """
    require_lab(iptables=True)
    with Lab() as lab:
        yield lab


def test_span_chain_through_three_sidecars(world_readable_lab: Lab) -> None:
    if importlib.util.find_spec("meshproxy.io.app") is None:
        pytest.skip("the sidecar (meshproxy.io.app) has not landed yet")
    demo = Demo(world_readable_lab)
    demo.start()
    demo.warm_up()
    result = demo.load(3, 1)
    assert result["status"] == {"200": 3}, result
    trace_id = result["trace_ids"][-1]

    wait_until(
        lambda: len(read_spans(demo.spans_file, trace_id)) >= 6, 30, f"6 spans of trace {trace_id}", 0.2
    )
    spans = read_spans(demo.spans_file, trace_id)
    by = {
        (s.service.split("-v")[0] if s.service.startswith("inventory") else s.service, s.kind): s
        for s in spans
    }
    assert len(spans) == 6, [(s.service, s.kind, s.name) for s in spans]
    client = by["client", "CLIENT"]
    fe_server, fe_client = by["frontend", "SERVER"], by["frontend", "CLIENT"]
    cat_server, cat_client = by["catalog", "SERVER"], by["catalog", "CLIENT"]
    inv_server = by["inventory", "SERVER"]

    # Each sidecar's server span is the child of the calling sidecar's client span, and each
    # client span the child of its pod's server span (the app forwarded the headers).
    assert fe_server.parent_span_id == client.span_id
    assert fe_client.parent_span_id == fe_server.span_id
    assert cat_server.parent_span_id == fe_client.span_id
    assert cat_client.parent_span_id == cat_server.span_id
    assert inv_server.parent_span_id == cat_client.span_id

    for s in spans:
        assert s.attributes["http.response.status_code"] == 200, s
        assert s.attributes["http.request.method"] == "GET"
        assert s.status != "ERROR"
    assert fe_server.attributes["mesh.source.workload"] == "client"
    assert cat_server.attributes["mesh.source.workload"] == "frontend"
    assert inv_server.attributes["mesh.source.workload"] == "catalog"
    assert cat_client.attributes["mesh.destination.service"].startswith("inventory.demo")
    # The 90/10 split route picked one of the versions, and the span says which.
    assert cat_client.attributes["mesh.route"] == "split"
    assert cat_client.attributes["mesh.backend"] in ("inventory-v1.demo:8080", "inventory-v2.demo:8080")
    assert inv_server.service == cat_client.attributes["mesh.backend"].split(".")[0]

    text = admin_get(world_readable_lab, demo.pods["catalog"], "/metrics")
    inbound = [
        s
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "meshproxy_requests_total" and s.labels["reporter"] == "destination"
    ]
    assert inbound and all(s.labels["source_workload"] == "frontend" for s in inbound)
    assert sum(s.value for s in inbound) >= 3
