"""A failing test stays a reported failure when pytest's traceback formatter crashes on
CPython 3.11.2's AST bug (``tests.support.report_guard``), instead of an INTERNALERROR that
loses the run's results."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.report_guard import AST_BUG

ROOT = Path(__file__).resolve().parents[2]

CONFTEST = f'''
import pytest

@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    # What the interpreter bug does to pytest's formatter, made to happen every time.
    def crash(excinfo, style=None):
        raise SystemError("{AST_BUG} (before=2, after=1)")
    for item in items:
        item.repr_failure = crash
'''

TESTS = """
def test_fails():
    assert 1 + 1 == 3, "arithmetic"

def test_passes():
    pass
"""


def _run(tmp_path: Path, *plugins: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_sample.py").write_text(TESTS)
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rf"]
    for p in plugins:
        argv += ["-p", p]
    return subprocess.run(
        argv,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": ""},
    )


def test_without_the_guard_the_run_ends_in_an_internal_error(tmp_path: Path) -> None:
    r = _run(tmp_path)
    assert "INTERNALERROR" in r.stdout + r.stderr


def test_with_the_guard_the_failure_is_reported_with_its_traceback(tmp_path: Path) -> None:
    r = _run(tmp_path, "tests.support.report_guard")
    out = r.stdout + r.stderr
    assert "INTERNALERROR" not in out
    assert r.returncode == 1, out
    assert "1 failed, 1 passed" in out
    assert "AssertionError: arithmetic" in out and "test_sample.py" in out
