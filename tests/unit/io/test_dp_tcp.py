"""Opaque TCP, tunnels and the listener's guards, through the sidecar on loopback."""

from __future__ import annotations

import asyncio

import pytest
from dp_rig import VIP, RawServer, Sidecar, echo, event_loop_policy, service, snapshot

from meshproxy.config.model import Endpoint, Inbound, LbPolicy, Protocol, Snapshot, TrafficPolicy

__all__ = ["event_loop_policy"]  # the fixture: run every test on asyncio and uvloop


async def test_tcp_relay_echo_with_half_close() -> None:
    async with RawServer(echo) as srv, Sidecar(snapshot(), ("127.0.0.1", srv.port)) as sc:
        r, w = await asyncio.open_connection("127.0.0.1", sc.listener.port)
        payload = b"\x00\x01binary, not HTTP\xff" * 1000
        w.write(payload)
        await w.drain()
        got = await asyncio.wait_for(r.readexactly(len(payload)), 5)
        assert got == payload
        # Half-close: our EOF reaches the server, which still answers before closing.
        w.write_eof()
        rest = await asyncio.wait_for(r.read(), 5)
        assert rest == b"<eof>"
        w.close()


async def test_server_first_protocol_does_not_stall() -> None:
    async def greeter(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"220 smtp.example ready\r\n")
        await w.drain()
        line = await r.readline()
        w.write(b"250 got " + line)
        await w.drain()

    async with RawServer(greeter) as srv, Sidecar(snapshot(), ("127.0.0.1", srv.port)) as sc:
        r, w = await asyncio.open_connection("127.0.0.1", sc.listener.port)
        # The client says nothing first: the sniffer must give up and relay.
        greeting = await asyncio.wait_for(r.readline(), 5)
        assert greeting == b"220 smtp.example ready\r\n"
        w.write(b"HELO me\r\n")
        assert await asyncio.wait_for(r.readline(), 5) == b"250 got HELO me\r\n"
        w.close()


async def test_tcp_to_a_service_vip_is_balanced_over_its_endpoints() -> None:
    async with RawServer(echo) as a, RawServer(echo) as b:
        svc = service(
            0,
            endpoints=(
                Endpoint(address="127.0.0.1", port=a.port),
                Endpoint(address="127.0.0.1", port=b.port),
            ),
            protocol=Protocol.TCP,
            policy=TrafficPolicy(lb=LbPolicy.ROUND_ROBIN),
        )
        async with Sidecar(snapshot(svc), (VIP, 80)) as sc:
            for _ in range(4):
                r, w = await asyncio.open_connection("127.0.0.1", sc.listener.port)
                w.write(b"ping")
                assert await asyncio.wait_for(r.readexactly(4), 5) == b"ping"
                w.close()
        assert (a.accepted, b.accepted) == (2, 2)


async def test_inbound_tcp_goes_to_the_app_address_at_the_original_port() -> None:
    async with RawServer(echo) as app:
        snap = Snapshot(
            inbound=Inbound(app_address="127.0.0.1", opaque_ports=frozenset({app.port}))
        ).with_version()
        # The client dialled 198.18.0.20:<port> (this pod's IP); inbound goes to 127.0.0.1:<port>.
        async with Sidecar(snap, ("198.18.0.20", app.port), direction="inbound") as sc:
            r, w = await asyncio.open_connection("127.0.0.1", sc.listener.port)
            w.write(b"GET / HTTP/1.1\r\n\r\n")  # looks like HTTP, but the port is opaque
            assert await asyncio.wait_for(r.readexactly(18), 5) == b"GET / HTTP/1.1\r\n\r\n"
            w.close()


async def test_websocket_style_upgrade_becomes_a_raw_tunnel() -> None:
    async def ws(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = await r.readuntil(b"\r\n\r\n")
        assert b"upgrade: websocket" in head.lower()
        w.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nserver-hello"
        )
        await w.drain()
        while data := await r.read(65536):
            w.write(data[::-1])
            await w.drain()

    async with RawServer(ws) as srv, Sidecar(snapshot(), ("127.0.0.1", srv.port)) as sc:
        r, w = await asyncio.open_connection("127.0.0.1", sc.listener.port)
        w.write(b"GET /chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        await w.drain()
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert b"upgrade: websocket" in head.lower()
        assert await asyncio.wait_for(r.readexactly(12), 5) == b"server-hello"
        w.write(b"abcdef")
        await w.drain()
        assert await asyncio.wait_for(r.readexactly(6), 5) == b"fedcba"
        w.close()


async def test_connect_tunnel() -> None:
    async def http_proxy(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = await r.readuntil(b"\r\n\r\n")
        assert head.startswith(b"CONNECT db:5432 HTTP/1.1")
        w.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await w.drain()
        while data := await r.read(65536):
            w.write(b"[" + data + b"]")
            await w.drain()

    async with RawServer(http_proxy) as srv, Sidecar(snapshot(), ("127.0.0.1", srv.port)) as sc:
        r, w = await asyncio.open_connection("127.0.0.1", sc.listener.port)
        w.write(b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n")
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ")
        w.write(b"q")
        assert await asyncio.wait_for(r.readexactly(3), 5) == b"[q]"
        w.close()


async def test_connection_to_the_listener_itself_is_closed() -> None:
    # No SO_ORIGINAL_DST entry and no override: the destination is the listener -> a loop.
    async with Sidecar(snapshot(), None) as sc:
        r, w = await asyncio.open_connection("127.0.0.1", sc.listener.port)
        w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            data = await asyncio.wait_for(r.read(), 5)
            if not data:
                raise asyncio.IncompleteReadError(b"", None)
        w.close()
