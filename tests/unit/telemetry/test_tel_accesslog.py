"""Access log: one JSON line per request, joined to spans by trace id; bounded, never blocking."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path
from typing import Any

from tel_rig import MakeRig, head

from meshproxy.config import model
from meshproxy.telemetry import Telemetry
from meshproxy.telemetry.accesslog import AccessLog


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


async def test_one_line_per_request_with_span_fields(make_rig: MakeRig) -> None:
    rig = make_rig(access_log=model.AccessLogMode.ON, workload="frontend", namespace="demo")
    h = head(path="/items/7?color=red", headers=(("user-agent", "curl/8"), ("x-request-id", "rid-1")))
    hop = rig.tel.start_http(
        direction="outbound", head=h, peer=("127.0.0.1", 40000), destination_service="inv"
    )
    hop.annotate(route="items", backend="inv-v1", retries=2)
    hop.finish(status=503, flag="UF", request_bytes=12, response_bytes=34, error="connect_failed")
    (span,) = rig.spans()
    await rig.tel.shutdown()  # flushes the access-log writer thread
    (rec,) = lines(rig.log)
    assert rec["trace_id"] == f"{span.context.trace_id:032x}"
    assert rec["span_id"] == f"{span.context.span_id:016x}"
    assert rec["request_id"] == "rid-1"
    assert rec["http.request.method"] == "GET"
    assert rec["url.path"] == "/items/7" and rec["url.query"] == "color=red"
    assert rec["http.response.status_code"] == 503
    assert rec["mesh.response_flag"] == "UF"
    assert rec["error.type"] == "connect_failed"
    assert rec["mesh.route"] == "items" and rec["mesh.backend"] == "inv-v1" and rec["mesh.retries"] == 2
    assert rec["mesh.source.workload"] == "frontend" and rec["mesh.destination.service"] == "inv"
    assert rec["reporter"] == "source" and rec["direction"] == "outbound"
    assert (rec["request_bytes"], rec["response_bytes"]) == (12, 34)
    assert rec["client.address"] == "127.0.0.1" and rec["user_agent.original"] == "curl/8"
    assert isinstance(rec["duration_ms"], float) and rec["duration_ms"] >= 0
    assert rec["timestamp"].endswith("+00:00")


async def test_sampled_mode_logs_only_traced_requests(make_rig: MakeRig) -> None:
    rig = make_rig(access_log=model.AccessLogMode.SAMPLED, ratio=1.0)
    traced = head(headers=(("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),))
    untraced = head(headers=(("traceparent", "00-11111111111111111111111111111111-00f067aa0ba902b7-00"),))
    for h in (untraced, traced, untraced):
        rig.tel.start_http(
            direction="inbound", head=h, peer=("127.0.0.1", 1), destination_service="s"
        ).finish(status=200, flag=None, request_bytes=0, response_bytes=0)
    # A TCP connection has no trace: not logged in sampled mode.
    rig.tel.tcp_opened(direction="outbound", destination_service="db").finish(
        bytes_sent=1, bytes_received=1, flag=None
    )
    await rig.tel.shutdown()  # flushes the writer: everything logged is now in the stream
    assert [r["trace_id"] for r in lines(rig.log)] == ["4bf92f3577b34da6a3ce929d0e0e4736"]


async def test_off_mode_logs_nothing_and_on_mode_logs_tcp(make_rig: MakeRig) -> None:
    off = make_rig(access_log=model.AccessLogMode.OFF)
    off.tel.start_http(
        direction="inbound", head=head(), peer=("127.0.0.1", 1), destination_service="s"
    ).finish(status=200, flag=None, request_bytes=0, response_bytes=0)
    on = make_rig(access_log=model.AccessLogMode.ON)
    on.tel.tcp_opened(direction="outbound", destination_service="db.demo:5432").finish(
        bytes_sent=10, bytes_received=20, flag="UF"
    )
    await off.tel.shutdown()
    await on.tel.shutdown()
    assert off.log.getvalue() == ""
    (rec,) = lines(on.log)
    assert rec["network.transport"] == "tcp"
    assert (rec["bytes_sent"], rec["bytes_received"], rec["mesh.response_flag"]) == (10, 20, "UF")


class _StuckStream(io.StringIO):
    """A stdout whose reader went away: write blocks until released."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def write(self, s: str) -> int:
        self.release.wait()
        return super().write(s)


async def test_a_stuck_sink_drops_and_counts_instead_of_blocking() -> None:
    stream = _StuckStream()
    dropped: list[int] = []
    log = AccessLog(stream, max_queue=4, on_drop=lambda: dropped.append(1))
    for i in range(50):
        log.log({"i": i})  # would hang the test (and the event loop) if it blocked
    # The writer holds one record in hand and the queue holds 4: the rest are dropped.
    assert len(dropped) >= 50 - 5
    stream.release.set()
    log.close(timeout=5)
    written = [json.loads(x)["i"] for x in stream.getvalue().splitlines()]
    assert len(written) + len(dropped) == 50
    assert written == sorted(written)


async def test_access_log_to_a_file(tmp_path: Path) -> None:
    path = tmp_path / "access.jsonl"
    tel = Telemetry.build(
        model.Telemetry(access_log=model.AccessLogMode.ON),
        model.Workload(name="w"),
        env={},
        access_log_path=str(path),
    )
    assert not path.exists()  # opened only when the first line is due
    for status in (200, 404):
        tel.start_http(
            direction="inbound", head=head(), peer=("127.0.0.1", 1), destination_service="s"
        ).finish(status=status, flag=None, request_bytes=0, response_bytes=0)
    await tel.shutdown()
    assert [json.loads(x)["http.response.status_code"] for x in path.read_text().splitlines()] == [200, 404]
