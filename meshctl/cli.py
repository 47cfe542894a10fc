"""``meshctl``: the operator's view of the mesh, from the control plane's discovery API.

    meshctl proxy-status                  one row per connected proxy:
                                          NAME NAMESPACE VERSION-ACKED STATE LAST-NACK
    meshctl proxy-config POD [-n NS]      the config that proxy ACKed, as JSON

``--control-plane HOST:PORT`` (or ``MESHCTL_CONTROL_PLANE``) says where the
control plane's gRPC port is; default ``localhost:15010`` (e.g. through
``kubectl port-forward -n meshproxy-system deploy/controlplane 15010``).

Owns only the command line and the table layout; the RPCs and their messages
come from ``controlplane.convert`` (the only module that builds them).
Exit codes: 0 ok, 1 the control plane answered with an error, 2 it could not
be reached. Concurrency: none (blocking gRPC calls with a deadline).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TextIO

import grpc

from controlplane import convert
from meshapi.discovery.v1 import discovery_pb2_grpc

DEFAULT_CONTROL_PLANE = "localhost:15010"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshctl", description="Inspect the mesh's proxies.")
    parser.add_argument(
        "--control-plane",
        default=os.environ.get("MESHCTL_CONTROL_PLANE", DEFAULT_CONTROL_PLANE),
        help="control plane gRPC address (env MESHCTL_CONTROL_PLANE; default %(default)s)",
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for an answer")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("proxy-status", help="sync status of every connected proxy")
    pc = sub.add_parser("proxy-config", help="the config a proxy ACKed, as JSON")
    pc.add_argument("pod")
    pc.add_argument("-n", "--namespace", default="default")
    return parser


def format_table(rows: Sequence[convert.ProxyStatusView]) -> str:
    header = ("NAME", "NAMESPACE", "VERSION-ACKED", "STATE", "LAST-NACK")
    lines = [header] + [
        (
            r.node.pod,
            r.node.namespace,
            r.acked_version or "-",
            r.state,
            # One line per proxy: a multi-line error would break the table.
            " ".join(r.last_nack.split()) or "-",
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(
        "   ".join(cell.ljust(w) for cell, w in zip(line[:-1], widths, strict=True)) + "   " + line[-1]
        for line in lines
    )


def run(args: argparse.Namespace, out: TextIO) -> int:
    with grpc.insecure_channel(args.control_plane) as channel:
        stub = discovery_pb2_grpc.ConfigDiscoveryStub(channel)  # type: ignore[no-untyped-call]
        if args.command == "proxy-status":
            resp = stub.ListProxies(convert.list_proxies_request(), timeout=args.timeout)
            print(format_table(convert.proxy_statuses_from_proto(resp)), file=out)
            return 0
        resp = stub.GetProxyConfig(
            convert.get_proxy_config_request(args.pod, args.namespace), timeout=args.timeout
        )
        print(resp.snapshot_json, file=out)
        return 0


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args, out or sys.stdout)
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        print(f"meshctl: {getattr(code, 'name', 'ERROR')}: {details}", file=sys.stderr)
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return 2
        return 1


if __name__ == "__main__":
    sys.exit(main())
