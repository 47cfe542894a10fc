"""Generate the protobuf/gRPC Python modules in ``meshapi/`` from ``protos/``.

Used by ``make proto`` and by the wheel build (setup.py). The output is never
committed or hand-edited.
"""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def generate() -> None:
    import grpc_tools
    from grpc_tools import protoc

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    for proto in sorted((ROOT / "protos").rglob("*.proto")):
        rel = proto.relative_to(ROOT / "protos")
        args = [
            "grpc_tools.protoc",
            f"-I{ROOT / 'protos'}",
            f"-I{include}",
            f"--python_out={ROOT}",
            f"--pyi_out={ROOT}",
            f"--grpc_python_out={ROOT}",
            str(rel),
        ]
        if protoc.main(args) != 0:
            sys.exit(f"protoc failed on {rel}")


if __name__ == "__main__":
    generate()
