"""Opaque byte relay between two connected transports (TCP proxying, WebSocket/CONNECT tunnels).

Owns: splicing two ``asyncio.Transport`` objects together byte for byte, and
opening an upstream TCP connection whose transport can be spliced.

Invariants:
  * Bytes are forwarded unchanged and in order; nothing is parsed.
  * Half-close: when one side sends EOF, EOF is sent to the other side (``write_eof``)
    and the other direction keeps flowing until it ends too; then both close.
  * Back-pressure: when a side's write buffer rises above its high-water mark its
    peer stops reading (``pause_reading``) until the buffer drains below the
    low-water mark. Memory per relay is therefore bounded by about two high-water
    marks plus one read chunk, however fast one side sends.
  * A reset (connection lost with an error) on one side aborts the other side, so
    the peer sees a reset rather than a clean close.

Concurrency: callbacks on the event loop (``asyncio.Protocol``); ``splice`` awaits
until both transports are closed and returns the byte counts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from meshproxy.core.errors import UpstreamConnectError
from meshproxy.io.sockopt import set_nodelay

log = logging.getLogger(__name__)

DEFAULT_HIGH_WATER = 64 * 1024


@dataclass(frozen=True, slots=True)
class RelayStats:
    """Bytes moved by one relay: ``a_to_b`` read from side a and written to side b."""

    a_to_b: int
    b_to_a: int
    reset: bool  # ended by a reset rather than two clean EOFs/closes


class _Side(asyncio.Protocol):
    """One end of a relay. Reads from its own transport, writes to its peer's."""

    def __init__(self, relay: _Relay, name: str) -> None:
        self.relay = relay
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.read_eof = False
        self.lost = False
        self.bytes_read = 0
        self.write_paused = False

    # Called by ``_Relay.attach``, not by the loop (the transport already exists).
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, hence a cast, not an assert.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.bytes_read += len(data)
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.lost:
            peer.transport.write(data)

    def eof_received(self) -> bool:
        self.read_eof = True
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.lost:
            if peer.transport.can_write_eof():
                peer.transport.write_eof()
            else:
                peer.transport.close()
        self.relay.check_done()
        # Keep our transport open: the other direction may still be sending to us.
        return True

    def pause_writing(self) -> None:
        self.write_paused = True
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.lost:
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.lost:
            peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.relay.side_lost(self, exc)


class _Relay:
    def __init__(self, on_done: asyncio.Future[RelayStats]) -> None:
        self.a = _Side(self, "a")
        self.b = _Side(self, "b")
        self.a.peer = self.b
        self.b.peer = self.a
        self.done = on_done
        self.reset = False

    def check_done(self) -> None:
        # Both directions ended cleanly: close both (flushes what is buffered).
        if self.a.read_eof and self.b.read_eof:
            for side in (self.a, self.b):
                if side.transport is not None and not side.lost:
                    side.transport.close()

    def side_lost(self, side: _Side, exc: Exception | None) -> None:
        peer = side.peer
        assert peer is not None
        if exc is not None:
            self.reset = True
        if peer.transport is not None and not peer.lost:
            if exc is not None:
                peer.transport.abort()
            else:
                peer.transport.close()
        if self.a.lost and self.b.lost and not self.done.done():
            self.done.set_result(RelayStats(self.a.bytes_read, self.b.bytes_read, self.reset))


def _attach(side: _Side, transport: asyncio.Transport, high_water: int) -> None:
    transport.set_write_buffer_limits(high=high_water)
    transport.set_protocol(side)
    side.connection_made(transport)
    if transport.is_closing():
        # Lost while being handed over (its old protocol saw connection_lost).
        side.lost = True


async def splice(
    a: asyncio.Transport,
    a_pending: bytes,
    b: asyncio.Transport,
    b_pending: bytes,
    *,
    a_eof: bool = False,
    b_eof: bool = False,
    high_water: int = DEFAULT_HIGH_WATER,
    on_progress: Callable[[int, int], None] | None = None,
) -> RelayStats:
    """Relay ``a`` <-> ``b`` until both are closed; return the byte counts.

    ``a_pending``/``b_pending`` are bytes already read from ``a``/``b`` (by a sniffer or an
    HTTP codec) that must be forwarded first; they count towards the totals. ``a_eof``/``b_eof``
    say that side already delivered EOF to its previous protocol. Both transports should be paused
    for reading by their previous owner; the relay resumes them.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[RelayStats] = loop.create_future()
    relay = _Relay(done)
    _attach(relay.a, a, high_water)
    _attach(relay.b, b, high_water)
    for side in (relay.a, relay.b):
        if side.lost:
            relay.side_lost(side, None)
    if not done.done():
        if a_pending:
            relay.a.data_received(a_pending)
        if b_pending:
            relay.b.data_received(b_pending)
        if a_eof:
            relay.a.eof_received()
        if b_eof:
            relay.b.eof_received()
        # Start in the right flow-control state: a buffer already above the mark pauses the peer.
        for side, peer in ((relay.a, relay.b), (relay.b, relay.a)):
            t, peer_t = side.transport, peer.transport
            if t is None or side.lost or side.read_eof or peer_t is None:
                continue
            if peer_t.get_write_buffer_size() > high_water:
                # The transport tells the peer's new protocol resume_writing() when it drains.
                peer.write_paused = True
                t.pause_reading()
            else:
                t.resume_reading()
    try:
        stats = await asyncio.shield(done)
    except asyncio.CancelledError:
        for t in (a, b):
            t.abort()
        raise
    if on_progress is not None:
        on_progress(stats.a_to_b, stats.b_to_a)
    return stats


class Parked(asyncio.Protocol):
    """Holds a fresh upstream connection, not reading, until it is spliced.

    uvloop may deliver one read even though ``pause_reading`` was called in
    ``connection_made``; such bytes (a server-first greeting) are kept for ``take``.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, hence a cast, not an assert.
        self.transport = t = cast(asyncio.Transport, transport)
        t.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.transport is not None:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True

    def take(self) -> tuple[asyncio.Transport, bytes, bool]:
        assert self.transport is not None
        data = bytes(self.buffer)
        self.buffer.clear()
        return self.transport, data, self.eof


async def open_tcp(
    host: str, port: int, *, connect_timeout: float, local_addr: tuple[str, int] | None = None
) -> Parked:
    """Connect to ``host:port`` (from ``local_addr``, if given) within ``connect_timeout``; the
    connection is parked (not reading).

    Raises ``UpstreamConnectError`` (flag UF) on refusal, unreachability or timeout.
    """
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(connect_timeout):
            transport, parked = await loop.create_connection(Parked, host, port, local_addr=local_addr)
    except (OSError, TimeoutError) as exc:
        raise UpstreamConnectError(f"connect {host}:{port}: {exc or 'timeout'}") from exc
    set_nodelay(transport.get_extra_info("socket"))
    return parked
