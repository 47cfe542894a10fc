"""The ``meshproxy`` command line: one entry point, one module per subcommand.

    meshproxy run --config FILE | --control-plane ADDR   the sidecar (meshproxy.io.app)
    meshproxy iptables install|cleanup                    the init step (meshproxy.iptables)
    meshproxy demo                                        the local demo mesh (meshproxy.lab.demo)

Each subcommand module exposes ``add_arguments(parser)`` and ``main(args) -> int``;
this module only wires them, so importing the CLI stays cheap.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("meshproxy.io.app", "run the sidecar proxy"),
    "iptables": ("meshproxy.iptables", "install or remove the pod's traffic interception rules"),
    "demo": ("meshproxy.lab.demo", "run the local demo mesh in network namespaces (no cluster)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshproxy", description="The mesh's sidecar proxy.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rc: int = importlib.import_module(args._module).main(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
