"""The build the tests run on is the one ``make`` said it made.

``make test`` runs the suite twice: on the compiled data path (what ``make install`` and
the images ship) and interpreted (``MESHPROXY_INTERPRETED=1``, what a machine without a C
compiler runs). ``MESHPROXY_EXPECT_BUILD`` names which; a compile that silently produced
nothing, or an import that fell back to the sources, fails here instead of passing
unnoticed on the wrong build.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from meshproxy import compiled


def test_the_data_path_runs_as_built() -> None:
    expected = os.environ.get("MESHPROXY_EXPECT_BUILD")
    if not expected:
        pytest.skip("MESHPROXY_EXPECT_BUILD not set (make test sets it)")
    assert compiled.status() == expected


def _suspensions_in_handlers(source: str) -> list[int]:
    """Lines of ``await``/``async with``/``async for`` inside an except handler or a finally
    block of ``source`` (not counting functions defined there, which run elsewhere)."""
    lines: list[int] = []

    def scan(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
                continue
            if isinstance(child, (ast.Await, ast.AsyncWith, ast.AsyncFor)):
                lines.append(child.lineno)
            scan(child)

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Try, ast.TryStar)):
            for block in [*(h.body for h in node.handlers), node.finalbody]:
                for stmt in block:
                    scan(ast.Module(body=[stmt], type_ignores=[]))
    return sorted(lines)


def test_the_guard_sees_a_suspension_in_a_handler() -> None:
    source = (
        "async def f():\n"
        "    try:\n"
        "        await g()\n"
        "    except E:\n"
        "        async def later(): await h()\n"  # defined here, runs elsewhere: fine
        "        await h()\n"
        "    finally:\n"
        "        async with lock:\n"
        "            pass\n"
    )
    assert _suspensions_in_handlers(source) == [6, 8]


@pytest.mark.parametrize("module", compiled.MODULES)
def test_no_compiled_coroutine_suspends_while_handling_an_exception(module: str) -> None:
    # Why: meshproxy.compiled's docstring (a compiled handler that awaits leaks its exception
    # into every other task's sys.exc_info()).
    path = Path(__file__).parents[2] / (module.replace(".", "/") + ".py")
    assert _suspensions_in_handlers(path.read_text()) == [], f"{path}: await in an except/finally block"
