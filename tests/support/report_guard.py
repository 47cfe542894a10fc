"""A pytest hook that keeps a failure's report when formatting its traceback crashes.

Owns: ``pytest_runtest_makereport``, registered by ``tests/conftest.py``.

Why: Debian's CPython 3.11.2 can raise ``SystemError: AST constructor recursion depth
mismatch`` (CPython gh-106905, fixed in 3.11.5) while pytest parses the source around a
frame to format it; frames of the compiled data path (line -1) have led there. The error
escaped as an INTERNALERROR and the whole run's results were lost. Here the failure is
reported instead, with a traceback formatted by the ``traceback`` module.
"""

from __future__ import annotations

import traceback
from collections.abc import Generator

import pytest
from _pytest.reports import TestReport

AST_BUG = "AST constructor recursion depth mismatch"


def _plain(error: BaseException) -> str:
    try:
        return "".join(traceback.format_exception(error))
    except SystemError:  # the same bug, in the traceback module's caret anchors
        frames = [
            f'  File "{frame.f_code.co_filename}", line {line}, in {frame.f_code.co_name}'
            for frame, line in traceback.walk_tb(error.__traceback__)
        ]
        return "\n".join(["Traceback (most recent call last):", *frames, f"{type(error).__name__}: {error}"])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, TestReport, TestReport]:
    try:
        return (yield)
    except SystemError as exc:
        if (
            AST_BUG not in str(exc)
            or call.excinfo is None
            or call.excinfo.errisinstance(pytest.skip.Exception)
        ):
            raise
        return TestReport(
            item.nodeid,
            item.location,
            dict.fromkeys(item.keywords, 1),
            "failed",
            f"{_plain(call.excinfo.value)}\n(formatted plainly: pytest's formatter hit {AST_BUG!r})",
            call.when,  # type: ignore[arg-type]
            [],
            call.duration,
            call.start,
            call.stop,
            item.user_properties,
        )
