"""Socket options of intercepted connections: the original destination and TCP_NODELAY.

Owns: decoding ``SO_ORIGINAL_DST`` (IPv4, ``SOL_IP``/80 -> ``sockaddr_in``) and
``IP6T_SO_ORIGINAL_DST`` (IPv6, ``SOL_IPV6``/80 -> ``sockaddr_in6``) for sockets
accepted on a listener that iptables ``REDIRECT`` sends traffic to.

Invariants:
  * ``original_dst`` never raises for a connection that was simply not
    redirected (no conntrack nat entry: ``ENOENT``, or a non-Linux kernel): it
    returns None and the caller falls back to the local address.
  * Addresses are returned as text literals (``"10.0.0.1"``, ``"fd00::1"``), with
    IPv4-mapped IPv6 addresses unwrapped to plain IPv4 so routing compares like
    with like.

Concurrency: none; plain functions over a socket-like object (the stdlib socket
or uvloop's pseudo-socket, both offer ``getsockopt``/``setsockopt``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
from typing import Any, Protocol

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h
_SOL_IP = getattr(socket, "SOL_IP", 0)
_SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)
_SOCKADDR_IN_LEN = 16
_SOCKADDR_IN6_LEN = 28


class SocketLike(Protocol):
    @property
    def family(self) -> int: ...

    def getsockopt(self, level: int, optname: int, buflen: int, /) -> bytes: ...

    def setsockopt(self, level: int, optname: int, value: int, /) -> None: ...

    def getsockname(self) -> Any: ...

    def getpeername(self) -> Any: ...


def normalize_address(address: str) -> str:
    """Unwrap ``::ffff:a.b.c.d`` to ``a.b.c.d`` (dual-stack listeners report IPv4 peers that way)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return address


def decode_sockaddr_in(raw: bytes) -> tuple[str, int]:
    """``struct sockaddr_in``: family (host order), port (network order), 4 address bytes."""
    if len(raw) < 8:
        raise ValueError(f"sockaddr_in too short: {len(raw)} bytes")
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntop(socket.AF_INET, raw[4:8]), port


def decode_sockaddr_in6(raw: bytes) -> tuple[str, int]:
    """``struct sockaddr_in6``: family, port (network order), flowinfo, 16 address bytes, scope id."""
    if len(raw) < 24:
        raise ValueError(f"sockaddr_in6 too short: {len(raw)} bytes")
    port = struct.unpack_from("!H", raw, 2)[0]
    return normalize_address(socket.inet_ntop(socket.AF_INET6, raw[8:24])), port


def original_dst(sock: SocketLike) -> tuple[str, int] | None:
    """The pre-REDIRECT destination of an accepted connection, or None when it was not redirected."""
    try:
        if sock.family == socket.AF_INET6:
            # A dual-stack listener sees IPv4 clients as v4-mapped; their nat entry is IPv4.
            try:
                dst = decode_sockaddr_in6(sock.getsockopt(_SOL_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6_LEN))
            except OSError:
                dst = decode_sockaddr_in(sock.getsockopt(_SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN_LEN))
        else:
            dst = decode_sockaddr_in(sock.getsockopt(_SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN_LEN))
        ends = (sock.getsockname(), sock.getpeername())
    except (OSError, ValueError):
        # ENOENT: no nat entry (not redirected); ENOPROTOOPT: not Linux/netfilter.
        return None
    # Once any nat rule exists in the namespace (a container tool's, say), conntrack tracks
    # every connection, and one that was not redirected answers with its own destination:
    # this end's address on an accepted connection, the peer's on a connecting one.
    if any(dst == (normalize_address(str(end[0])), int(end[1])) for end in ends):
        return None
    return dst


def set_nodelay(sock: SocketLike | None) -> None:
    """Disable Nagle: the proxy writes whole messages, so coalescing only adds latency."""
    if sock is None:
        return
    # Not TCP (a unix socket in a test) or already closed: nothing to tune.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
