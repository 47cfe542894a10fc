"""A tiny "who answered?" TCP probe, to check interception rules without a sidecar.

Owns: ``python -m meshproxy.lab.probe serve --name N PORT...``, which accepts on each port
and answers every connection with one JSON line and closes::

    {"name": "podB-relay", "listener": 15006, "local": ["198.18.0.3", 15006],
     "original_dst": ["198.18.0.3", 8080],
     "peer": ["198.18.0.2", 40312], "uid": 1357}

and ``python -m meshproxy.lab.probe connect HOST PORT``, which prints the line it got (or a
JSON ``{"error": ...}`` and exits 1), so a test can tell which listener a connection
really reached and where it was going before ``REDIRECT`` rewrote it.

IPv6 connections are answered the same way (``IP6T_SO_ORIGINAL_DST``). ``original_dst`` equals ``local`` for a connection that was not redirected (or is ``null``
when the pod has no conntrack/nat state at all). It is read with ``getsockopt(SOL_IP, SO_ORIGINAL_DST)`` here on purpose,
independently of the sidecar's own decoding, so the interception tests check the kernel's
behaviour and not our parser.

Invariants: one line per connection, then close; no state kept between connections.
Concurrency: one asyncio loop, one task per connection (the stdlib server's).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import struct
import sys
from collections.abc import Sequence

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h


def original_dst(sock: socket.socket) -> tuple[str, int] | None:
    try:
        if sock.family == socket.AF_INET6:  # IP6T_SO_ORIGINAL_DST -> struct sockaddr_in6
            raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
            (port,) = struct.unpack_from("!H", raw, 2)
            return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)  # struct sockaddr_in
    except OSError:  # ENOENT: no nat entry, i.e. not redirected
        return None
    (port,) = struct.unpack_from("!H", raw, 2)
    return socket.inet_ntop(socket.AF_INET, raw[4:8]), port


async def serve(name: str, host: str, ports: Sequence[int]) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        reply = {
            "name": name,
            "listener": writer.get_extra_info("sockname")[1],
            "local": list(writer.get_extra_info("sockname")[:2]),
            "original_dst": original_dst(sock),
            "peer": list(writer.get_extra_info("peername")[:2]),
            "uid": os.getuid(),
        }
        writer.write(json.dumps(reply).encode() + b"\n")
        try:
            await writer.drain()
        finally:
            writer.close()

    # host None: one IPv4 and one IPv6-only socket per port (asyncio sets IPV6_V6ONLY), so
    # addresses are reported as plain IPv4/IPv6, never v4-mapped.
    servers = [await asyncio.start_server(answer, host or None, port) for port in ports]
    print(f"probe {name} listening on {host or '*'} ports {list(ports)}", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def connect(host: str, port: int, timeout: float, source: str | None = None) -> int:
    try:
        with socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0) if source else None
        ) as sock:
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1
    if not data:
        print(json.dumps({"error": "connection closed without a reply"}))
        return 1
    sys.stdout.write(data.decode())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshproxy.lab.probe")
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--name", required=True)
    s.add_argument("--host", default="", help="default: all addresses, IPv4 and IPv6")
    s.add_argument("ports", nargs="+", type=int)
    c = sub.add_parser("connect")
    c.add_argument("host")
    c.add_argument("port", type=int)
    c.add_argument("--timeout", type=float, default=3.0)
    c.add_argument("--source", help="bind this source address first")
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        asyncio.run(serve(args.name, args.host, args.ports))
        return 0
    return connect(args.host, args.port, args.timeout, args.source)


if __name__ == "__main__":
    sys.exit(main())
