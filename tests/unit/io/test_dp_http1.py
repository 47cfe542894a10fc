"""HTTP/1.1 through the sidecar on loopback: codecs, pool and pipeline against a real upstream."""

from __future__ import annotations

import asyncio
import gc
import random
import re
import socket
from collections.abc import AsyncIterator, Iterator
from typing import cast

import httpx
import pytest
from dp_rig import VIP, RawServer, Sidecar, Upstream, event_loop_policy, service, snapshot, wait_for

from meshproxy.config.model import (
    Endpoint,
    HeaderModifier,
    LbPolicy,
    OutlierDetection,
    PathMatch,
    PathMatchKind,
    RetryPolicy,
    Route,
    RouteMatch,
    Service,
    TrafficPolicy,
    WeightedBackend,
)
from meshproxy.core.clock import MonotonicClock
from meshproxy.io.http1_client import Http1Client
from meshproxy.io.http1_server import Http1Settings
from meshproxy.io.proxy import Proxy
from meshproxy.io.runtime import Runtime
from meshproxy.io.server import Listener, ListenerSettings

__all__ = ["event_loop_policy"]  # the fixture: run every test on asyncio and uvloop


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream() as u:
        yield u


@pytest.fixture
async def passthrough(upstream: Upstream) -> AsyncIterator[Sidecar]:
    """No service matches: the request goes to the original destination (the upstream)."""
    async with Sidecar(snapshot(), ("127.0.0.1", upstream.port)) as sc:
        yield sc


async def test_keepalive_reuses_one_upstream_connection(upstream: Upstream) -> None:
    async with (
        Sidecar(snapshot(service(upstream.port)), (VIP, 80)) as sc,
        httpx.AsyncClient(base_url=sc.url) as client,
    ):
        for i in range(5):
            r = await client.get(f"/hello?i={i}")
            assert r.status_code == 200
            assert r.text == "hello\n"
    assert upstream.server.requests == 5
    assert len(upstream.server.connections) == 1
    assert sc.client.connects == 1


async def test_a_burst_above_32_concurrent_requests_reuses_its_connections_for_the_next_one(
    upstream: Upstream,
) -> None:
    # The pool keeps every connection a burst opened (until the idle timeout), not a fixed
    # few: with 32 kept, each burst of 48 closed 16 and opened 16 again. At saturation that
    # was one new upstream connection (connect, accept, nat entry, sniff) per three requests
    # in both sidecars.
    burst = 48
    async with (
        Sidecar(snapshot(service(upstream.port)), (VIP, 80)) as sc,
        httpx.AsyncClient(base_url=sc.url, timeout=30) as client,
    ):
        for round_ in range(2):
            upstream.server.release.clear()
            arrived = upstream.server.requests + burst
            calls = [asyncio.create_task(client.get(f"/slow?r={round_}")) for _ in range(burst)]
            await wait_for(lambda n=arrived: upstream.server.requests == n, within=20)
            upstream.server.release.set()
            assert [r.status_code for r in await asyncio.gather(*calls)] == [200] * burst
            await wait_for(lambda: sc.client.idle_count(("127.0.0.1", upstream.port)) == burst, within=5)
        assert sc.client.connects == burst
    assert len(upstream.server.connections) == burst


async def test_chunked_upload_and_download_stream_through(passthrough: Sidecar) -> None:
    parts = [bytes([i]) * 3000 for i in range(40)]

    async def gen() -> AsyncIterator[bytes]:
        for p in parts:
            yield p

    async with httpx.AsyncClient(base_url=passthrough.url) as client:
        r = await client.post("/echo", content=gen())
        assert r.status_code == 200
        assert r.content == b"".join(parts)

        async with client.stream("GET", "/stream?n=20&size=1000") as resp:
            assert resp.headers.get("transfer-encoding") == "chunked"
            got = b"".join([c async for c in resp.aiter_raw()])
        assert got == b"".join(bytes([65 + i % 26]) * 1000 for i in range(20))


async def test_trailers_of_a_chunked_response_are_forwarded(passthrough: Sidecar) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", passthrough.listener.port)
    writer.write(b"GET /stream?n=2&size=3 HTTP/1.1\r\nHost: up\r\n\r\n")
    await writer.drain()
    data = b""
    while not data.endswith(b"0\r\nx-checksum: done\r\n\r\n"):
        chunk = await asyncio.wait_for(reader.read(65536), 5)
        assert chunk, f"connection closed early: {data!r}"
        data += chunk
    assert b"AAA" in data and b"BBB" in data
    writer.close()


async def test_malformed_request_gets_400_and_close_and_proxy_keeps_serving(passthrough: Sidecar) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", passthrough.listener.port)
    writer.write(b"GET / HTTP/1.1\r\nHost a\r\n\r\n")
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)  # read() to EOF: the proxy closes
    head = raw.split(b"\r\n\r\n", 1)[0].decode()
    assert head.startswith("HTTP/1.1 400 ")
    assert "x-meshproxy-flag: DPE" in head
    assert "connection: close" in head
    writer.close()
    async with httpx.AsyncClient(base_url=passthrough.url) as client:
        assert (await client.get("/hello")).status_code == 200


async def test_dead_backend_is_503_uf_and_proxy_keeps_serving(upstream: Upstream) -> None:
    dead = Endpoint(address="127.0.0.1", port=1)  # nothing listens on port 1
    snap = snapshot(service(upstream.port, endpoints=(dead,), policy=TrafficPolicy(retry=None)))
    async with Sidecar(snap, (VIP, 80)) as sc, httpx.AsyncClient(base_url=sc.url) as client:
        r = await client.get("/hello")
        assert r.status_code == 503
        assert r.headers["x-meshproxy-flag"] == "UF"
        # The same connection and the proxy still work: a live service next.
        sc.runtime.apply(snapshot(service(upstream.port)))
        r = await client.get("/hello")
        assert r.status_code == 200


async def test_unknown_host_on_known_vip_without_matching_route_is_404_nr(upstream: Upstream) -> None:
    only_api = Route(name="api", matches=(RouteMatch(path=PathMatch(PathMatchKind.PREFIX, "/api")),))
    async with (
        Sidecar(snapshot(service(upstream.port, routes=(only_api,))), (VIP, 80)) as sc,
        httpx.AsyncClient(base_url=sc.url) as client,
    ):
        r = await client.get("/other")
        assert r.status_code == 404
        assert r.headers["x-meshproxy-flag"] == "NR"
        r = await client.get("/api/x")
        assert r.status_code == 200
    assert upstream.server.paths == ["/api/x"]


async def test_retries_mask_a_flaky_endpoint(upstream: Upstream) -> None:
    upstream.server.flaky_failures = 2
    retry = RetryPolicy(attempts=2, retry_on=frozenset({"5xx"}), backoff_base=0.001, backoff_max=0.002)
    snap = snapshot(service(upstream.port, policy=TrafficPolicy(retry=retry, outlier_detection=None)))
    async with Sidecar(snap, (VIP, 80)) as sc, httpx.AsyncClient(base_url=sc.url) as client:
        r = await client.get("/flaky")
        assert r.status_code == 200
        assert r.text == "flaky-ok\n"
    assert upstream.server.requests == 3


async def test_retried_post_body_is_replayed(upstream: Upstream) -> None:
    # A connect failure is retried for any method; the body read by the failed try is replayed.
    dead = Endpoint(address="127.0.0.1", port=1)
    live = Endpoint(address="127.0.0.1", port=upstream.port)
    retry = RetryPolicy(attempts=2, backoff_base=0.001, backoff_max=0.002)
    policy = TrafficPolicy(retry=retry, outlier_detection=None, lb=LbPolicy.ROUND_ROBIN)
    snap = snapshot(service(upstream.port, endpoints=(dead, live), policy=policy))
    async with Sidecar(snap, (VIP, 80)) as sc, httpx.AsyncClient(base_url=sc.url) as client:
        for i in range(4):  # round robin hits the dead endpoint first at least once
            r = await client.post("/echo", content=b"payload-%d" % i)
            assert r.status_code == 200
            assert r.content == b"payload-%d" % i


async def test_expect_100_continue(passthrough: Sidecar) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", passthrough.listener.port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: up\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    await writer.drain()
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    writer.write(b"hello")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 ")
    body = await asyncio.wait_for(reader.readexactly(5), 5)
    assert body == b"hello"
    writer.close()


async def test_pipelined_requests_are_answered_in_order(passthrough: Sidecar) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", passthrough.listener.port)
    writer.write(
        b"GET /status/201 HTTP/1.1\r\nHost: up\r\n\r\n"
        b"POST /echo HTTP/1.1\r\nHost: up\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /status/202 HTTP/1.1\r\nHost: up\r\nConnection: close\r\n\r\n"
    )
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)
    assert statuses == [b"201", b"200", b"202"]
    assert b"\r\n\r\nabc" in raw
    writer.close()


async def test_hop_by_hop_headers_are_not_forwarded(passthrough: Sidecar) -> None:
    async with httpx.AsyncClient(base_url=passthrough.url) as client:
        r = await client.get(
            "/headers", headers={"connection": "keep-alive, x-secret", "x-secret": "1", "x-keep": "2"}
        )
    names = {k for k, _ in r.json()}
    assert "x-keep" in names
    assert "x-secret" not in names
    assert "keep-alive" not in names


async def test_head_response_keeps_the_connection_usable(passthrough: Sidecar) -> None:
    async with httpx.AsyncClient(base_url=passthrough.url) as client:
        r = await client.head("/hello")
        assert r.status_code == 200
        assert r.headers["content-length"] == "6"
        r = await client.get("/hello")
        assert r.text == "hello\n"


async def test_a_request_head_that_never_completes_gets_408(upstream: Upstream) -> None:
    settings = Http1Settings(header_timeout=0.3)
    async with Sidecar(snapshot(), ("127.0.0.1", upstream.port), http1=settings) as sc:
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.listener.port)
        writer.write(b"GET /hello HTTP/1.1\r\nHost: up\r\nX-Slow: ")
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
        assert raw.startswith(b"HTTP/1.1 408 ")
        writer.close()
    assert upstream.server.requests == 0


async def test_pooled_connection_closed_by_the_server_is_replaced_transparently() -> None:
    # Each upstream connection answers one request, then reads the next one and hangs up
    # without a word: the keep-alive race every pooled client meets.
    async def one_shot(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n")
        await w.drain()
        await r.readuntil(b"\r\n\r\n")

    async with (
        RawServer(one_shot) as srv,
        Sidecar(snapshot(), ("127.0.0.1", srv.port)) as sc,
        httpx.AsyncClient(base_url=sc.url) as client,
    ):
        for _ in range(3):
            r = await client.get("/x")
            assert r.status_code == 200
            assert r.text == "ok\n"
    assert srv.accepted == 3  # every request after the first needed a fresh connection


async def test_outlier_detection_ejects_a_failing_endpoint(upstream: Upstream) -> None:
    with Upstream() as bad:
        bad.server.flaky_failures = 1000
        eps = (
            Endpoint(address="127.0.0.1", port=bad.port),
            Endpoint(address="127.0.0.1", port=upstream.port),
        )
        policy = TrafficPolicy(
            retry=None,
            lb=LbPolicy.ROUND_ROBIN,
            outlier_detection=OutlierDetection(consecutive_gateway_errors=2, max_ejection_percent=50),
        )
        async with (
            Sidecar(snapshot(service(0, endpoints=eps, policy=policy)), (VIP, 80)) as sc,
            httpx.AsyncClient(base_url=sc.url) as client,
        ):
            statuses = [(await client.get("/flaky")).status_code for _ in range(10)]
        # Round robin alternates until the bad endpoint's second 503 ejects it; then only good.
        assert statuses.count(503) == 2
        assert statuses[-6:] == [200] * 6
        assert bad.server.requests == 2


async def test_dual_stack_listener_accepts_ipv4_and_ipv6(upstream: Upstream) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    rt = Runtime(clock=MonotonicClock(), rng=random.Random(1))
    rt.apply(snapshot())
    client = Http1Client()
    proxy = Proxy(rt, {"1.1": client})
    lst = Listener(
        ListenerSettings(
            direction="outbound", port=0, host="::", destination_override=("127.0.0.1", upstream.port)
        ),
        proxy,
    )
    try:
        await lst.start()
    except OSError as exc:
        pytest.skip(f"cannot bind ::: {exc}")
    try:
        for host in ("127.0.0.1", "[::1]"):
            async with httpx.AsyncClient(base_url=f"http://{host}:{lst.port}") as c:
                assert (await c.get("/hello")).text == "hello\n"
    finally:
        await lst.drain(1.0)
        await client.close()


async def test_oversized_request_head_gets_431(passthrough: Sidecar) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", passthrough.listener.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: up\r\nX-Big: " + b"a" * (70 * 1024) + b"\r\n\r\n")
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    assert raw.startswith(b"HTTP/1.1 431 "), raw[:300]
    writer.close()


def test_a_refused_request_head_keeps_its_status_while_an_exception_is_being_handled(
    upstream: Upstream, event_loop_policy: asyncio.AbstractEventLoopPolicy
) -> None:
    # httptools chains a callback's exception onto whatever exception the thread is handling
    # at the time; the status must not depend on that (it once did: 400 instead of 431).
    async def oversized_head() -> bytes:
        async with Sidecar(snapshot(), ("127.0.0.1", upstream.port)) as sc:
            reader, writer = await asyncio.open_connection("127.0.0.1", sc.listener.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: up\r\nX-Big: " + b"a" * (70 * 1024) + b"\r\n\r\n")
            raw = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            return raw

    try:
        raise RuntimeError("being handled by the code that runs the event loop")
    except RuntimeError:
        with asyncio.Runner(loop_factory=event_loop_policy.new_event_loop) as runner:
            raw = runner.run(oversized_head())
    assert raw.startswith(b"HTTP/1.1 431 "), raw[:300]


async def test_an_upstream_that_speaks_first_fails_the_request_cleanly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A server-first protocol (SSH, MySQL) behind a port declared HTTP: its banner arrives
    # before the request is written. The client gets an error; nothing is left failed for
    # nobody to await (asyncio logs those as "Future exception was never retrieved").
    class Banner(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            cast(asyncio.Transport, transport).write(b"SSH-2.0-OpenSSH_9.2p1\r\n")  # at once, unasked

    server = await asyncio.get_running_loop().create_server(Banner, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with (
            Sidecar(snapshot(), ("127.0.0.1", port)) as sc,
            httpx.AsyncClient(base_url=sc.url) as client,
        ):
            for _ in range(3):
                r = await client.get("/")
                assert r.status_code == 502, r.text
                # Said as what it is where the banner came first (the loop decides the order).
                assert "spoke first (b'SSH-2.0" in r.text or "malformed upstream response" in r.text, r.text
    finally:
        server.close()
    gc.collect()  # an unretrieved future reports itself when it is collected
    orphans = [rec.getMessage() for rec in caplog.records if "never retrieved" in rec.getMessage()]
    assert orphans == []


async def test_upstream_dying_mid_body_resets_the_client_connection() -> None:
    async def truncating(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"x" * 10)
        await w.drain()

    async with (
        RawServer(truncating) as srv,
        Sidecar(snapshot(), ("127.0.0.1", srv.port)) as sc,
        httpx.AsyncClient(base_url=sc.url) as client,
    ):
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get("/x")


async def test_client_going_away_mid_response_closes_the_upstream_connection() -> None:
    upstream_closed = asyncio.Event()

    async def endless(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        try:
            while True:
                w.write(b"4\r\ntick\r\n")
                await w.drain()
                await asyncio.sleep(0.01)
        except ConnectionError:
            upstream_closed.set()

    async with RawServer(endless) as srv, Sidecar(snapshot(), ("127.0.0.1", srv.port)) as sc:
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.listener.port)
        writer.write(b"GET /stream HTTP/1.1\r\nHost: up\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"tick"), 5)
        writer.transport.abort()
        await asyncio.wait_for(upstream_closed.wait(), 5)


async def test_route_split_goes_to_the_backend_service_and_modifies_headers(upstream: Upstream) -> None:
    with Upstream() as canary:
        canary_svc = Service(
            name="web-canary",
            namespace="demo",
            port=80,
            endpoints=(Endpoint(address="127.0.0.1", port=canary.port),),
        )
        route = Route(
            name="to-canary",
            matches=(RouteMatch(path=PathMatch(PathMatchKind.PREFIX, "/headers")),),
            backends=(WeightedBackend(service=canary_svc.key, weight=1),),
            request_headers=HeaderModifier(set=(("x-route", "canary"),)),
            response_headers=HeaderModifier(add=(("x-served-by", "canary"),)),
        )
        web = service(upstream.port, routes=(route, Route(name="rest")))
        async with (
            Sidecar(snapshot(web, canary_svc), (VIP, 80)) as sc,
            httpx.AsyncClient(base_url=sc.url) as client,
        ):
            r = await client.get("/headers")
            assert r.headers["x-served-by"] == "canary"
            assert ["x-route", "canary"] in r.json()
            assert (await client.get("/hello")).status_code == 200
        assert canary.server.paths == ["/headers"]
        assert upstream.server.paths == ["/hello"]


async def test_http10_client_gets_a_close_delimited_body_from_a_chunked_upstream(
    passthrough: Sidecar,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", passthrough.listener.port)
    writer.write(b"GET /stream?n=3&size=4 HTTP/1.0\r\n\r\n")
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)  # to EOF: the end of the body is the close
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding" not in head.lower()
    assert body == b"AAAABBBBCCCC"
    writer.close()
