"""The ``meshproxy`` command line: one entry point, one module per subcommand.

    meshproxy run --config FILE | --control-plane ADDR   the sidecar (meshproxy.io.app)
    meshproxy iptables install|cleanup                    the init step (meshproxy.iptables)
    meshproxy demo                                        the local demo mesh (meshproxy.lab.demo)

Each subcommand module exposes ``add_arguments(parser)`` and ``main(args) -> int``.
Only the chosen subcommand's module is imported, so the init container's
``iptables`` step never loads the proxy, and one subcommand's import error
cannot break the others.
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


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command`` set, that subcommand's arguments are loaded too."""
    parser = argparse.ArgumentParser(prog="meshproxy", description="The mesh's sidecar proxy.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in SUBCOMMANDS else None).parse_args(argv)
    rc: int = importlib.import_module(args._module).main(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
