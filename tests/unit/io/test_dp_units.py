"""Units of the data path without a proxy in the middle: sockopt, body streams, runtime, telemetry wiring."""

from __future__ import annotations

import json
import random
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from dp_rig import VIP, Sidecar, Upstream, service, snapshot
from prometheus_client import CollectorRegistry

from meshproxy.config.model import Endpoint, OutlierDetection, Snapshot, TrafficPolicy, Workload
from meshproxy.config.model import Telemetry as TelemetrySettings
from meshproxy.core.clock import FakeClock
from meshproxy.core.errors import ConfigError
from meshproxy.core.outlier import Outcome
from meshproxy.io.body import BodyQueue, NotReplayableError, ReplayBuffer
from meshproxy.io.runtime import Runtime
from meshproxy.io.sockopt import decode_sockaddr_in, decode_sockaddr_in6, original_dst
from meshproxy.telemetry.hop import Telemetry

# ---- sockopt -------------------------------------------------------------------------------------


def test_decode_sockaddr_in() -> None:
    raw = (
        struct.pack("=H", socket.AF_INET) + struct.pack("!H", 8080) + socket.inet_aton("10.1.2.3") + bytes(8)
    )
    assert decode_sockaddr_in(raw) == ("10.1.2.3", 8080)


def test_decode_sockaddr_in6_unwraps_v4_mapped() -> None:
    def sa6(addr: str, port: int) -> bytes:
        return (
            struct.pack("=H", socket.AF_INET6)
            + struct.pack("!HI", port, 0)
            + socket.inet_pton(socket.AF_INET6, addr)
            + struct.pack("=I", 0)
        )

    assert decode_sockaddr_in6(sa6("fd00::7", 443)) == ("fd00::7", 443)
    assert decode_sockaddr_in6(sa6("::ffff:198.18.0.10", 80)) == ("198.18.0.10", 80)


def test_original_dst_is_none_without_a_redirect() -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        with socket.create_connection(srv.getsockname()) as c:
            conn, _ = srv.accept()
            with conn:
                assert original_dst(conn) is None
                assert original_dst(c) is None


# ---- body streams ---------------------------------------------------------------------------------


async def test_body_queue_pauses_above_high_water_and_resumes_below_low() -> None:
    events: list[str] = []
    q = BodyQueue(
        high_water=100, pause=lambda: events.append("pause"), resume=lambda: events.append("resume")
    )
    for _ in range(3):
        q.feed(b"x" * 50)
    assert events == ["pause"]
    assert await q.read() == b"x" * 50
    assert events == ["pause"]  # 100 bytes left: still above the low-water mark
    await q.read()
    await q.read()
    assert events == ["pause", "resume"]
    q.feed_end((("grpc-status", "0"),))
    assert await q.read() == b""
    assert q.trailers == (("grpc-status", "0"),)


async def test_body_queue_hands_over_a_finished_body_in_one_piece() -> None:
    events: list[str] = []
    q = BodyQueue(high_water=4, pause=lambda: events.append("pause"), resume=lambda: events.append("resume"))
    q.feed(b"abc")
    assert q.take_complete() is None  # more may come: read chunk by chunk
    q.feed(b"def")
    assert events == ["pause"]
    q.feed_end((("x-checksum", "1"),))
    assert q.take_complete() == b"abcdef"
    assert events == ["pause", "resume"]  # the socket is read again once the queue is empty
    assert await q.read() == b""
    assert q.trailers == (("x-checksum", "1"),)

    failed = BodyQueue()
    failed.feed(b"x")
    failed.feed_error(RuntimeError("upstream reset"))
    assert failed.take_complete() is None
    assert await failed.read() == b"x"  # what arrived before the error, then the error
    with pytest.raises(RuntimeError):
        await failed.read()


async def test_replay_buffer_replays_small_bodies_and_refuses_large_ones() -> None:
    class Chunks:
        def __init__(self, parts: list[bytes]) -> None:
            self.parts = list(parts)

        @property
        def trailers(self) -> None:
            return None

        async def read(self) -> bytes:
            return self.parts.pop(0) if self.parts else b""

    async def drain(s: object) -> bytes:
        out = b""
        while data := await s.read():  # type: ignore[attr-defined]
            out += data
        return out

    small = ReplayBuffer(Chunks([b"ab", b"cd"]), limit=10)
    assert await drain(small.stream()) == b"abcd"
    assert await drain(small.stream()) == b"abcd"
    assert small.replayable

    big = ReplayBuffer(Chunks([b"x" * 8, b"y" * 8]), limit=10)
    assert await drain(big.stream()) == b"x" * 8 + b"y" * 8  # the first try still gets everything
    assert not big.replayable
    with pytest.raises(NotReplayableError):
        big.stream()

    # A try that failed half-way is replayed from the start, then continues from the source.
    part = ReplayBuffer(Chunks([b"1", b"2", b"3"]), limit=10)
    first = part.stream()
    assert await first.read() == b"1"
    assert await drain(part.stream()) == b"123"


async def test_replay_buffer_hands_a_body_that_arrived_whole_to_each_try_in_one_piece() -> None:
    def arrived(*parts: bytes) -> BodyQueue:
        q = BodyQueue()
        for part in parts:
            q.feed(part)
        q.feed_end(None)
        return q

    whole = ReplayBuffer(arrived(b"ab", b"cd"), limit=10)
    first = whole.stream()
    assert first.take_complete() == b"abcd"
    assert await first.read() == b""
    second = whole.stream()  # the retry gets the same bytes, again in one piece
    assert second.take_complete() == b"abcd"
    assert await second.read() == b""
    assert whole.replayable

    # Too large to keep: the first try still sends all of it; a second try is refused.
    big = ReplayBuffer(arrived(b"x" * 8, b"y" * 8), limit=10)
    assert big.stream().take_complete() == b"x" * 8 + b"y" * 8
    assert not big.replayable
    with pytest.raises(NotReplayableError):
        big.stream()

    # Still arriving: nothing taken, the try reads chunk by chunk as before.
    arriving = BodyQueue()
    arriving.feed(b"1")
    partial = ReplayBuffer(arriving, limit=10)
    stream = partial.stream()
    assert stream.take_complete() is None
    assert await stream.read() == b"1"
    arriving.feed(b"2")
    arriving.feed_end(None)
    # What the first try read is kept; the rest is taken from the source in one piece.
    assert partial.stream().take_complete() == b"12"


# ---- runtime ---------------------------------------------------------------------------------------


def _runtime(tmp_path: Path | None = None) -> Runtime:
    return Runtime(
        clock=FakeClock(), rng=random.Random(1), cache_path=tmp_path / "cache.json" if tmp_path else None
    )


def test_invalid_snapshot_is_rejected_naming_the_field_and_changes_nothing() -> None:
    rt = _runtime()
    good = snapshot(service(8080))
    rt.apply(good)
    bad_ep = service(8080, endpoints=(Endpoint(address="not-an-ip", port=8080),))
    with pytest.raises(ConfigError) as exc:
        rt.apply(snapshot(bad_ep))
    assert exc.value.path == "services[0].endpoints[0].address"
    assert rt.active is not None and rt.active.version == good.version
    with pytest.raises(ConfigError, match=r"services\[1\]: duplicate"):
        rt.apply(snapshot(service(8080), service(8081)))


def test_endpoint_state_survives_a_config_swap() -> None:
    rt = _runtime()
    ep = Endpoint(address="127.0.0.1", port=8080)
    rt.apply(snapshot(service(8080, endpoints=(ep,))))
    svc_key = rt.active.snapshot.services[0].key if rt.active else None
    assert svc_key is not None
    pool = rt.pools[svc_key]
    pool.on_request_start(ep)
    extra = Endpoint(address="127.0.0.2", port=8080)
    rt.apply(snapshot(service(8080, endpoints=(ep, extra))))
    assert rt.pools[svc_key] is pool
    assert pool.in_flight(ep) == 1
    assert len(pool.endpoints) == 2


def test_a_new_min_health_percent_reaches_the_existing_pool_with_its_ejections() -> None:
    rt = _runtime()
    eps = (Endpoint(address="127.0.0.1", port=8080), Endpoint(address="127.0.0.2", port=8080))

    def with_threshold(percent: int) -> Snapshot:
        od = OutlierDetection(consecutive_connect_failures=1, min_health_percent=percent)
        return snapshot(service(8080, endpoints=eps, policy=TrafficPolicy(outlier_detection=od)))

    rt.apply(with_threshold(0))
    pool = rt.pools[rt.active.snapshot.services[0].key] if rt.active else None
    assert pool is not None
    pool.on_request_start(eps[0])
    pool.on_request_end(eps[0], Outcome.CONNECT_FAILURE)
    assert pool.ejected_count == 1 and not pool.in_panic  # 1 of 2 healthy; panic off
    rt.apply(with_threshold(60))
    assert rt.pools[rt.active.snapshot.services[0].key] is pool
    assert pool.ejected_count == 1 and pool.in_panic  # 50% < 60%: the new threshold applies now
    rt.apply(with_threshold(50))
    assert not pool.in_panic


def test_cache_lets_a_restarted_sidecar_start_with_the_last_good_config(tmp_path: Path) -> None:
    rt = _runtime(tmp_path)
    snap = snapshot(service(8080))
    rt.apply(snap)
    restarted = _runtime(tmp_path)
    cached = restarted.load_cache()
    assert cached is not None
    assert cached.version == snap.version
    assert cached == snap
    (tmp_path / "cache.json").write_text("{not json")
    assert _runtime(tmp_path).load_cache() is None


def test_cache_is_not_written_for_a_rejected_snapshot(tmp_path: Path) -> None:
    rt = _runtime(tmp_path)
    rt.apply(snapshot(service(8080)))
    before = json.loads((tmp_path / "cache.json").read_text())
    with pytest.raises(ConfigError):
        rt.apply(snapshot(service(0)))
    assert json.loads((tmp_path / "cache.json").read_text()) == before


# ---- telemetry wiring ------------------------------------------------------------------------------


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream() as u:
        yield u


async def test_requests_are_counted_and_carry_a_request_id(upstream: Upstream) -> None:
    registry = CollectorRegistry()
    tel = Telemetry.build(TelemetrySettings(), Workload(name="client", namespace="demo"), registry=registry)
    dead = Endpoint(address="127.0.0.1", port=1)
    try:
        async with (
            Sidecar(snapshot(service(upstream.port)), (VIP, 80), telemetry=tel) as sc,
            httpx.AsyncClient(base_url=sc.url) as client,
        ):
            r = await client.get("/headers")
            sent = dict((k, v) for k, v in r.json())
            assert sent.get("x-request-id")
            assert sent.get("traceparent")
            sc.runtime.apply(snapshot(service(upstream.port, endpoints=(dead,))))
            assert (await client.get("/hello")).status_code == 503
    finally:
        await tel.shutdown(grace=1.0)
    ok = registry.get_sample_value(
        "meshproxy_requests_total",
        {
            "reporter": "source",
            "source_workload": "client",
            "source_namespace": "demo",
            "destination_service": "web.demo",
            "destination_workload": "unknown",
            "response_code": "200",
            "grpc_status": "",
            "route": "default",
            "backend": "web.demo:80",
            "response_flag": "-",
        },
    )
    assert ok == 1.0
    failed = [
        s
        for m in registry.collect()
        if m.name == "meshproxy_requests"
        for s in m.samples
        if s.name.endswith("_total") and s.labels.get("response_flag") == "UF"
    ]
    assert [s.labels["response_code"] for s in failed] == ["503"]
