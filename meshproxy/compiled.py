"""Which of the sidecar's modules are compiled to C, and whether this process runs them.

Owns: ``MODULES``, the data path's modules that ``make install`` and the image build
compile with mypyc (``setup.py``, when ``MESHPROXY_MYPYC=1``), and ``status``, which says
which of them this interpreter imported as extension modules. mypyc compiles the typed
code as it is (``mypy --strict`` is what makes that possible); no source is written for
it. The same modules run interpreted wherever no C compiler was at hand: behaviour is
the same, each request costs more CPU (docs/performance.md, round 7).

What compiling asks of these modules (enforced by the build, which refuses code it
cannot compile):
  * exception classes are ``@mypyc_attr(native_class=False)``: they carry class
    attributes (``flag``) and are subclassed by interpreted modules;
  * no ``runtime_checkable`` Protocols (capabilities are checked by attribute);
  * no function that is itself decorated by a ``typing`` marker (see
    ``meshproxy.core.frozen``, which is therefore never compiled);
  * a compiled class cannot be subclassed or have attributes added from interpreted
    code: tests reach behaviour through constructor arguments, not monkeypatching;
  * no ``await`` (nor ``async with``/``async for``) inside an ``except`` handler or a
    ``finally`` block of a coroutine: work that awaits is done after the ``try``
    statement. CPython gives each coroutine its own "exception being handled"; a
    mypyc-compiled coroutine keeps it in the thread's, so while a handler is suspended its
    exception is every other task's ``sys.exc_info()``, and restoring out of order leaves
    it there for good (mypy 2.4.1). It then becomes the ``__context__`` of exceptions
    raised anywhere later, and keeps its traceback's frames alive. The build cannot
    refuse this, so ``tests/unit/test_compiled.py`` does.

``MESHPROXY_INTERPRETED=1`` in the environment makes a process import these modules from
their sources even where the compiled ones exist (``import meshproxy`` installs the finder):
for debugging (full Python frames, pdb) and for measuring one build beside the other
(``bench.run``'s ``meshproxy-interpreted`` scenario; ``make test`` runs the unit tests so).

This module is never compiled: the build and the tests read ``MODULES`` from it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Final

MODULES: Final[tuple[str, ...]] = (
    "meshproxy.core.balancer",
    "meshproxy.core.breaker",
    "meshproxy.core.clock",
    "meshproxy.core.detect",
    "meshproxy.core.fault",
    "meshproxy.core.flags",
    "meshproxy.core.h2util",
    "meshproxy.core.http",
    "meshproxy.core.outlier",
    "meshproxy.core.passthrough",
    "meshproxy.core.ratelimit",
    "meshproxy.core.retry",
    "meshproxy.core.routing",
    "meshproxy.io.body",
    "meshproxy.io.exchange",
    "meshproxy.io.http1_client",
    "meshproxy.io.http1_server",
    "meshproxy.io.http2_client",
    "meshproxy.io.http2_common",
    "meshproxy.io.http2_server",
    "meshproxy.io.proxy",
    "meshproxy.telemetry.hop",
    "meshproxy.telemetry.metrics",
    "meshproxy.telemetry.otlp_grpc",
    "meshproxy.telemetry.otlp_http",
    "meshproxy.telemetry.otlp_loop",
    "meshproxy.telemetry.otlp_wire",
    "meshproxy.telemetry.propagation",
    "meshproxy.telemetry.spans",
    "meshproxy.telemetry.tracing",
)


def is_extension(module: str) -> bool:
    """Whether ``module`` is (or would be) imported from a compiled extension."""
    mod = importlib.import_module(module)
    origin = getattr(mod, "__file__", None) or ""
    return origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def status() -> str:
    """``"compiled"``, ``"interpreted"`` or ``"partly compiled (n of m)"``, for reports."""
    done = sum(is_extension(m) for m in MODULES)
    if done == len(MODULES):
        return "compiled"
    if done == 0:
        return "interpreted"
    return f"partly compiled ({done} of {len(MODULES)})"


class _SourcesFirst(importlib.abc.MetaPathFinder):
    """Finds the listed modules' ``.py`` files, passing over their compiled extensions."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MODULES:
            return None
        source = Path(__file__).parent.parent.joinpath(*fullname.split(".")).with_suffix(".py")
        return importlib.util.spec_from_file_location(fullname, source) if source.exists() else None


def run_interpreted() -> None:
    """From now on, import the listed modules from their sources (those not imported yet)."""
    if not any(isinstance(f, _SourcesFirst) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourcesFirst())
