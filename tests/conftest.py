"""Session-wide guards for the compiled data path (``meshproxy.compiled``).

* Compiled modules older than their sources would shadow the edited code (an extension
  module wins over a ``.py`` beside it): the run stops and says how to rebuild.
* ``MESHPROXY_INTERPRETED=1`` runs the in-process tests on the sources even where the
  compiled modules exist (``make test`` does both). Subprocesses (``meshproxy run``) are
  not affected: they import what is installed.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import pytest

from meshproxy.compiled import MODULES

ROOT = Path(__file__).resolve().parent.parent


def _extensions(module: str) -> list[Path]:
    source = ROOT / (module.replace(".", "/") + ".py")
    return [
        source.with_suffix(sfx)
        for sfx in importlib.machinery.EXTENSION_SUFFIXES
        if source.with_suffix(sfx).exists()
    ]


def _stale() -> list[str]:
    found = []
    for module in MODULES:
        source = ROOT / (module.replace(".", "/") + ".py")
        found += [
            f"{ext.relative_to(ROOT)} is older than {source.relative_to(ROOT)}"
            for ext in _extensions(module)
            if ext.stat().st_mtime < source.stat().st_mtime
        ]
    listed = {ROOT / (m.replace(".", "/") + ".py") for m in MODULES}
    for ext in (ROOT / "meshproxy").rglob("*.so"):
        source = ext.parent / (ext.name.split(".", 1)[0] + ".py")
        if source not in listed:
            found.append(f"{ext.relative_to(ROOT)} is not in meshproxy.compiled.MODULES")
    return found


class _SourcesFirst(importlib.abc.MetaPathFinder):
    """Finds the compiled modules' ``.py`` files, passing over their extensions."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MODULES:
            return None
        return importlib.util.spec_from_file_location(fullname, ROOT / (fullname.replace(".", "/") + ".py"))


if os.environ.get("MESHPROXY_INTERPRETED") == "1":
    already = [m for m in MODULES if m in sys.modules]
    assert not already, f"imported before tests/conftest.py could keep them interpreted: {already}"
    sys.meta_path.insert(0, _SourcesFirst())
else:
    stale = _stale()
    if stale:
        pytest.exit(
            "compiled modules out of date:\n  "
            + "\n  ".join(stale)
            + "\nrun `make compile` to rebuild them, or `make uncompile` to run interpreted",
            returncode=4,
        )
