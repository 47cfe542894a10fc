"""Session-wide guard for the compiled data path (``meshproxy.compiled``).

Compiled modules older than their sources would shadow the edited code (an extension
module wins over a ``.py`` beside it): the run stops and says how to rebuild. With
``MESHPROXY_INTERPRETED=1`` (``make test`` runs the unit tests so, a second time) the
sources are imported instead and the check is moot.

Also: a failure whose traceback runs through compiled frames must still be reported.
Debian's CPython 3.11.2 can raise ``SystemError: AST constructor recursion depth
mismatch`` (CPython gh-106905, fixed in 3.11.5) while pytest parses source around such a
frame to format it; the error escapes as an INTERNALERROR and the run's results are lost.
``tests.support.report_guard`` then reports the failure with a plain formatted traceback.
"""

from __future__ import annotations

import importlib.machinery
import os
from pathlib import Path

import pytest

from meshproxy.compiled import MODULES
from tests.support.report_guard import pytest_runtest_makereport  # noqa: F401 (a hook)

ROOT = Path(__file__).resolve().parent.parent


def _stale() -> list[str]:
    listed = {ROOT.joinpath(*m.split(".")).with_suffix(".py") for m in MODULES}
    found = []
    for ext in (ROOT / "meshproxy").rglob("*"):
        if not ext.name.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
            continue
        stem = ext.name.split(".", 1)[0]
        if stem.endswith("__mypyc"):
            continue  # the group's shared library: its stubs are checked against the sources
        source = ext.with_name(stem + ".py")
        if source not in listed:
            found.append(f"{ext.relative_to(ROOT)} is not in meshproxy.compiled.MODULES")
        elif ext.stat().st_mtime < source.stat().st_mtime:
            found.append(f"{ext.relative_to(ROOT)} is older than {source.relative_to(ROOT)}")
    return found


if os.environ.get("MESHPROXY_INTERPRETED") != "1" and (stale := _stale()):
    pytest.exit(
        "compiled modules out of date:\n  "
        + "\n  ".join(stale)
        + "\nrun `make compile` to rebuild them, or `make uncompile` to run interpreted",
        returncode=4,
    )
