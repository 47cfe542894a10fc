"""The stream idle timeout on request bodies: a client that sends a head and part of a body,
then nothing (a slowloris-style upload), must not pin the request, its upstream connection
and its breaker slot for ever, inbound (no route timeout at all) nor outbound with the route
timeout disabled. Real HTTP/1.1 codecs over loopback: the rig of the other data-path tests.

Timeouts are short (a fraction of a second) and every wait is for an awaited condition (a
response read to EOF, the app seeing its connection end, a metric); ``asyncio.sleep`` only
paces the slow client, which is the behaviour under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

import pytest
from dp_rig import (
    VIP,
    RawServer,
    Sidecar,
    Upstream,
    event_loop_policy,
    requests_by_flag,
    service,
    snapshot,
    wait_for,
)
from prometheus_client import CollectorRegistry

from meshproxy.config.model import Inbound, Snapshot, Tracing, TrafficPolicy, Workload
from meshproxy.config.model import Telemetry as TelemetrySettings
from meshproxy.core.breaker import Limit
from meshproxy.telemetry.hop import Telemetry

__all__ = ["event_loop_policy"]  # the fixture: run every test on asyncio and uvloop

IDLE = 0.2
HEAD = b"POST /upload HTTP/1.1\r\nhost: web\r\ncontent-length: 100\r\n\r\n"


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream() as u:
        yield u


def _inbound() -> Snapshot:
    return Snapshot(inbound=Inbound(app_address="127.0.0.1")).with_version()


def _telemetry() -> tuple[Telemetry, CollectorRegistry]:
    registry = CollectorRegistry()
    tel = Telemetry.build(
        TelemetrySettings(tracing=Tracing(sampling_ratio=0.0)), Workload(name="c"), registry=registry
    )
    return tel, registry


class StalledApp:
    """An app that reads the request head and whatever body comes, never answers, and
    records what it got once its connection ends (``closed``)."""

    def __init__(self) -> None:
        self.got_head: asyncio.Event = asyncio.Event()
        self.closed: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def __call__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        got = bytearray(await r.readuntil(b"\r\n\r\n"))
        self.got_head.set()
        with contextlib.suppress(ConnectionError):
            while data := await r.read(65536):
                got += data
        if not self.closed.done():
            self.closed.set_result(bytes(got))


def _parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


async def _stalled_upload(port: int) -> tuple[bytes, float]:
    """Send a head announcing 100 bytes and 7 of them, then nothing: the whole response (the
    proxy closes the connection, the body being unread) and how long it took."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        started = time.monotonic()
        writer.write(HEAD + b"partial")
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)  # TimeoutError here: pinned for ever
        return raw, time.monotonic() - started
    finally:
        writer.close()


async def test_an_inbound_request_whose_body_stalls_gets_408_si_and_the_app_connection_is_closed() -> None:
    tel, registry = _telemetry()
    app = StalledApp()
    try:
        async with (
            RawServer(app) as srv,
            Sidecar(_inbound(), ("198.18.0.20", srv.port), direction="inbound", telemetry=tel) as sc,
        ):
            sc.proxy.stream_idle_timeout = IDLE
            raw, elapsed = await _stalled_upload(sc.listener.port)
            status, headers, body = _parse(raw)
            assert status == 408
            assert headers["x-meshproxy-flag"] == "SI"
            assert "stream idle timeout" in headers["x-meshproxy-reason"]
            assert body.startswith(b"SI: ")
            assert elapsed >= IDLE * 0.9  # not before the idle timeout (uvloop's clock is in ms)
            # The app saw the request, 7 body bytes, then its connection ended: not kept open
            # (nor pooled) with 93 announced bytes missing.
            seen = await asyncio.wait_for(app.closed, 5)
            assert seen.endswith(b"\r\n\r\npartial")
            assert sc.client.idle_count(("127.0.0.1", srv.port)) == 0
            # One end of the request, with flag SI (no DC as well).
            await wait_for(lambda: requests_by_flag(registry) == {"SI": 1.0})
            assert sc.proxy.request_watchdogs == 1
    finally:
        await tel.shutdown(grace=1.0)


async def test_an_outbound_request_whose_body_stalls_with_the_route_timeout_disabled_gets_408_si() -> None:
    tel, registry = _telemetry()
    app = StalledApp()
    policy = TrafficPolicy(timeout=None, retry=None, outlier_detection=None)
    try:
        async with (
            RawServer(app) as srv,
            Sidecar(snapshot(service(srv.port, policy=policy)), (VIP, 80), telemetry=tel) as sc,
        ):
            sc.proxy.stream_idle_timeout = IDLE
            breaker = sc.runtime.breakers[next(iter(sc.runtime.breakers))]
            raw, _ = await _stalled_upload(sc.listener.port)
            status, headers, _ = _parse(raw)
            assert (status, headers["x-meshproxy-flag"]) == (408, "SI")
            seen = await asyncio.wait_for(app.closed, 5)
            assert seen.endswith(b"partial")
            # The breaker slot and the connection slot are given back; nothing idles in the pool.
            await wait_for(lambda: breaker.count(Limit.CONNECTIONS) == 0)
            assert breaker.count(Limit.REQUESTS) == 0
            assert sc.client.idle_count(("127.0.0.1", srv.port)) == 0
            await wait_for(lambda: requests_by_flag(registry) == {"SI": 1.0})
    finally:
        await tel.shutdown(grace=1.0)


async def test_a_slow_but_moving_request_body_is_not_cut(upstream: Upstream) -> None:
    idle = 0.4
    chunks = 12
    async with Sidecar(_inbound(), ("198.18.0.20", upstream.port), direction="inbound") as sc:
        sc.proxy.stream_idle_timeout = idle
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.listener.port)
        started = time.monotonic()
        writer.write(b"POST /echo HTTP/1.1\r\nhost: app\r\ncontent-length: %d\r\n\r\n" % chunks)
        await writer.drain()
        for i in range(chunks):
            await asyncio.sleep(idle / 5)  # the client's pace: one byte every fifth of the timeout
            writer.write(bytes([65 + i]))
            await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        status, headers, _ = _parse(head)
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10)
        took = time.monotonic() - started
        writer.close()
        assert status == 200 and "x-meshproxy-flag" not in headers
        assert body == b"ABCDEFGHIJKL"
        assert took > 2 * idle  # the upload lasted well past the idle timeout
        assert sc.proxy.request_watchdogs == 1  # and it was watched all along


async def test_a_request_whose_body_arrived_whole_starts_no_watchdog(upstream: Upstream) -> None:
    async with Sidecar(_inbound(), ("198.18.0.20", upstream.port), direction="inbound") as sc:
        sc.proxy.stream_idle_timeout = IDLE
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.listener.port)
        # A small body in the same write as its head (the common case), then a bodyless GET.
        writer.write(b"POST /echo HTTP/1.1\r\nhost: app\r\ncontent-length: 5\r\n\r\nhello")
        writer.write(b"GET /hello HTTP/1.1\r\nhost: app\r\n\r\n")
        await writer.drain()
        for expected in (b"hello", b"hello\n"):
            status, headers, _ = _parse(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10))
            assert status == 200
            assert await reader.readexactly(int(headers["content-length"])) == expected
        assert sc.proxy.request_watchdogs == 0
        # The control: a body still arriving when the request reaches the pipeline is watched.
        writer.write(b"POST /echo HTTP/1.1\r\nhost: app\r\ncontent-length: 5\r\n\r\nhel")
        await writer.drain()
        await wait_for(lambda: upstream.server.requests == 3)  # the app has the head: too late
        writer.write(b"lo")
        await writer.drain()
        status, headers, _ = _parse(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10))
        assert status == 200 and await reader.readexactly(5) == b"hello"
        assert sc.proxy.request_watchdogs == 1
        writer.close()


async def test_a_request_body_that_stalls_once_the_response_streams_resets_the_stream_si() -> None:
    tel, registry = _telemetry()
    answered = asyncio.Event()

    async def early_answer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        # Answers before reading the body, starts a chunked body, then goes silent too.
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await w.drain()
        answered.set()
        with contextlib.suppress(ConnectionError):
            await r.read()

    policy = TrafficPolicy(timeout=None, retry=None, outlier_detection=None)
    try:
        async with (
            RawServer(early_answer) as srv,
            Sidecar(snapshot(service(srv.port, policy=policy)), (VIP, 80), telemetry=tel) as sc,
        ):
            sc.proxy.stream_idle_timeout = IDLE
            raw, _ = await _stalled_upload(sc.listener.port)
            status, headers, body = _parse(raw)
            # The head was already out: the client gets what there was, then the connection ends
            # without the terminating chunk (a reset, not a clean end).
            assert status == 200 and "x-meshproxy-flag" not in headers
            assert b"first" in body and not body.endswith(b"0\r\n\r\n")
            assert answered.is_set()
            await wait_for(lambda: requests_by_flag(registry) == {"SI": 1.0})
            assert sc.proxy.request_watchdogs == 1  # one watchdog for both directions
    finally:
        await tel.shutdown(grace=1.0)
