"""Span content: semantic-convention and mesh attributes, names, status."""

from __future__ import annotations

from opentelemetry.trace import SpanKind, StatusCode
from tel_rig import MakeRig, head


async def test_client_span_attributes_and_route_name(make_rig: MakeRig) -> None:
    rig = make_rig(workload="frontend", namespace="demo")
    h = head(path="/items/42?x=1", headers=(("user-agent", "curl/8"),), authority="inventory.demo:8080")
    hop = rig.tel.start_http(
        direction="outbound", head=h, peer=("127.0.0.1", 40000), destination_service="inventory.demo:8080"
    )
    hop.annotate(route="items", backend="inventory-v2.demo:8080", destination_workload="inventory-v2")
    hop.annotate(retries=1)
    hop.finish(status=200, flag=None, request_bytes=3, response_bytes=1024)
    (span,) = rig.spans()
    assert span.name == "GET items"
    assert span.kind is SpanKind.CLIENT
    a = dict(span.attributes or {})
    assert a["http.request.method"] == "GET"
    assert a["url.path"] == "/items/42"
    assert a["http.route"] == "items"
    assert a["http.response.status_code"] == 200
    assert (a["server.address"], a["server.port"]) == ("inventory.demo", 8080)
    assert a["network.peer.address"] == "127.0.0.1"
    assert a["network.protocol.version"] == "1.1"
    assert a["user_agent.original"] == "curl/8"
    assert a["mesh.source.workload"] == "frontend" and a["mesh.source.namespace"] == "demo"
    assert a["mesh.destination.service"] == "inventory.demo:8080"
    assert a["mesh.destination.workload"] == "inventory-v2"
    assert a["mesh.backend"] == "inventory-v2.demo:8080"
    assert a["mesh.retries"] == 1
    assert "error.type" not in a
    assert span.status.status_code is StatusCode.UNSET
    assert span.resource.attributes["service.name"] == "frontend"


async def test_span_without_route_is_named_by_method(make_rig: MakeRig) -> None:
    rig = make_rig()
    h = head(method="POST", path="/a/b/c", authority="[::1]:9000")
    hop = rig.tel.start_http(direction="inbound", head=h, peer=("::1", 5), destination_service=None)
    hop.finish(status=201, flag=None, request_bytes=0, response_bytes=0)
    (span,) = rig.spans()
    assert span.name == "POST"  # never the raw path: span names stay low-cardinality
    a = dict(span.attributes or {})
    assert (a["server.address"], a["server.port"]) == ("::1", 9000)
    assert a["client.address"] == "::1"
    assert a["mesh.destination.service"] == "unknown"


async def test_local_reply_marks_error_with_flag_and_decision(make_rig: MakeRig) -> None:
    rig = make_rig()
    hop = rig.tel.start_http(
        direction="outbound", head=head(), peer=("127.0.0.1", 1), destination_service="b"
    )
    hop.annotate(decision="circuit_open")
    hop.finish(status=503, flag="UO", request_bytes=0, response_bytes=0)
    (span,) = rig.spans()
    a = dict(span.attributes or {})
    assert a["mesh.response_flag"] == "UO"
    assert a["mesh.decision"] == "circuit_open"
    assert a["error.type"] == "UO"
    assert span.status.status_code is StatusCode.ERROR


async def test_4xx_is_an_error_for_clients_but_not_for_servers(make_rig: MakeRig) -> None:
    rig = make_rig()
    for direction in ("outbound", "inbound"):
        hop = rig.tel.start_http(
            direction=direction, head=head(), peer=("127.0.0.1", 1), destination_service="b"
        )
        hop.finish(status=404, flag=None, request_bytes=0, response_bytes=0)
    by_kind = {s.kind: s for s in rig.spans()}
    assert by_kind[SpanKind.CLIENT].status.status_code is StatusCode.ERROR
    assert dict(by_kind[SpanKind.CLIENT].attributes or {})["error.type"] == "404"
    assert by_kind[SpanKind.SERVER].status.status_code is StatusCode.UNSET


async def test_grpc_attributes(make_rig: MakeRig) -> None:
    rig = make_rig()
    h = head(
        method="POST",
        path="/shop.v1.Inventory/GetItem",
        headers=(("content-type", "application/grpc+proto"), ("te", "trailers")),
        version="2",
    )
    hop = rig.tel.start_http(
        direction="inbound", head=h, peer=("127.0.0.1", 1), destination_service="inventory"
    )
    hop.annotate(route="grpc-default")
    hop.finish(status=200, flag=None, request_bytes=0, response_bytes=0, grpc_status="5")
    (span,) = rig.spans()
    # gRPC spans are named service/method (already low cardinality), even when a route matched.
    assert span.name == "shop.v1.Inventory/GetItem"
    a = dict(span.attributes or {})
    assert a["rpc.system"] == "grpc"
    assert a["rpc.service"] == "shop.v1.Inventory"
    assert a["rpc.method"] == "GetItem"
    assert a["rpc.grpc.status_code"] == 5
    assert a["network.protocol.version"] == "2"
    # NOT_FOUND is the caller's business: not a server error...
    assert span.status.status_code is StatusCode.UNSET


async def test_grpc_error_status_by_side(make_rig: MakeRig) -> None:
    rig = make_rig()
    h = head(
        method="POST", path="/shop.v1.Inventory/GetItem", headers=(("content-type", "application/grpc"),)
    )
    for direction, code in (("outbound", "5"), ("inbound", "14")):
        hop = rig.tel.start_http(
            direction=direction, head=h, peer=("127.0.0.1", 1), destination_service="inv"
        )
        hop.finish(status=200, flag=None, request_bytes=0, response_bytes=0, grpc_status=code)
    by_kind = {s.kind: s for s in rig.spans()}
    # ...but it is one for the client; UNAVAILABLE is an error on both sides.
    assert by_kind[SpanKind.CLIENT].status.status_code is StatusCode.ERROR
    assert dict(by_kind[SpanKind.CLIENT].attributes or {})["error.type"] == "5"
    assert by_kind[SpanKind.SERVER].status.status_code is StatusCode.ERROR


async def test_reconfigure_swaps_sampling(make_rig: MakeRig) -> None:
    from meshproxy.config import model

    rig = make_rig(ratio=1.0)
    rig.tel.start_http(
        direction="outbound", head=head(), peer=("127.0.0.1", 1), destination_service="b"
    ).finish(status=200, flag=None, request_bytes=0, response_bytes=0)
    assert len(rig.spans()) == 1
    before = rig.tel.tracing
    rig.tel.reconfigure(model.Telemetry(tracing=model.Tracing(sampling_ratio=0.0)))
    assert rig.tel.tracing is not before
    hop = rig.tel.start_http(
        direction="outbound", head=head(), peer=("127.0.0.1", 1), destination_service="b"
    )
    assert not hop.sampled
    hop.finish(status=200, flag=None, request_bytes=0, response_bytes=0)
    # Unchanged settings keep the same pipeline.
    same = rig.tel.tracing
    rig.tel.reconfigure(model.Telemetry(tracing=model.Tracing(sampling_ratio=0.0)))
    assert rig.tel.tracing is same


async def test_span_in_flight_across_reconfigure_is_still_exported(make_rig: MakeRig) -> None:
    from meshproxy.config import model

    rig = make_rig(ratio=1.0)
    old = rig.tel.tracing
    hop = rig.tel.start_http(
        direction="outbound", head=head(), peer=("127.0.0.1", 1), destination_service="b"
    )
    rig.tel.reconfigure(model.Telemetry(tracing=model.Tracing(sampling_ratio=0.5)))
    assert rig.tel.tracing is not old
    hop.finish(status=200, flag=None, request_bytes=0, response_bytes=0)
    old.force_flush()
    assert [f"{s.context.trace_id:032x}" for s in rig.exporter.get_finished_spans()] == [hop.trace_id]
    # shutdown() cuts the old pipeline's grace period short instead of waiting it out.
    await rig.tel.shutdown(grace=5)
    assert all(not t.is_alive() for t in rig.tel._retired)
