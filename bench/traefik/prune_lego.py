"""Writes a copy of lego's DNS-provider factory without the providers the module proxy cannot serve.

Owns: one build-time file transformation for ``bench/traefik/build.sh`` (used through
``go build -overlay``); the module cache itself is never modified.

Invariant: only import lines and ``case``/``return`` pairs naming a pruned provider are dropped;
every other line is kept byte for byte, so the result stays valid Go. Single-threaded, no state.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def prune(source: str, providers: set[str]) -> str:
    """Drop the imports and the ``case`` branches of ``providers`` from the factory source."""
    out: list[str] = []
    for line in source.splitlines(keepends=True):
        imp = re.fullmatch(r'\s*"github\.com/go-acme/lego/v\d+/providers/dns/([a-z0-9]+)"\s*', line)
        if imp and imp.group(1) in providers:
            continue
        ret = re.fullmatch(r"\s*return ([a-z0-9]+)\.NewDNSProvider\(\)\s*", line)
        if ret and ret.group(1) in providers:
            # The branch is ``case "name", ...:`` followed by this return; drop both.
            if out and out[-1].lstrip().startswith("case "):
                out.pop()
            continue
        out.append(line)
    return "".join(out)


def main() -> int:
    src, dst, *names = sys.argv[1:]
    Path(dst).write_text(prune(Path(src).read_text(), set(names)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
