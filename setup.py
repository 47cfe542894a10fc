"""Build hook: generate the gRPC/protobuf code in ``meshapi/`` from ``protos/`` on every build."""

from __future__ import annotations

import runpy
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        runpy.run_path(str(Path(__file__).parent / "scripts" / "gen_protos.py"))["generate"]()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
