"""Build hooks.

* The gRPC/protobuf code in ``meshapi/`` is generated from ``protos/`` on every build.
* With ``MESHPROXY_MYPYC=1`` the data path's modules (``meshproxy.compiled.MODULES``) are
  compiled to C extensions with mypyc, beside their sources; ``make install`` and the image
  build set it. Without it the distribution is pure Python (and behaves the same).
"""

from __future__ import annotations

import os
import runpy
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        runpy.run_path(str(ROOT / "scripts" / "gen_protos.py"))["generate"]()
        super().run()


def compiled_extensions() -> list[Any]:
    if os.environ.get("MESHPROXY_MYPYC") != "1":
        return []
    from mypyc.build import mypycify  # build-time only: mypy ships mypyc

    modules = runpy.run_path(str(ROOT / "meshproxy" / "compiled.py"))["MODULES"]
    paths = [str(Path(*m.split("."))) + ".py" for m in modules]
    # One group: calls between the modules stay C calls. Its shared library is
    # meshproxy/datapath__mypyc*.so, inside the package, so it imports from wherever the
    # package does (not only with the checkout on sys.path). opt_level 3 is mypyc's default
    # spelled out; debug_level 1 keeps line numbers in tracebacks.
    return list(mypycify(paths, opt_level="3", debug_level="1", group_name="meshproxy.datapath"))


setup(cmdclass={"build_py": BuildPyWithProtos}, ext_modules=compiled_extensions())
