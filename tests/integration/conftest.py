"""Fixtures for integration tests: the network-namespace ``lab``.

A test that takes ``lab`` gets a fresh ``meshproxy.lab.netns.Lab`` (router namespace plus
bridge, no pods yet) whose logs live under the test's ``tmp_path``; it is torn down after
the test, also when the test fails. Without root or ``ip netns`` the test is skipped with
the reason, except under CI (``CI`` set), where the lab is required and the test fails.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshproxy.lab.netns import Lab, cleanup_stale, unavailable_reason
from tests.support.require import missing


def _require(reason: str | None) -> None:
    if reason is None:
        return
    missing(f"network-namespace lab unavailable: {reason}")


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    _require(unavailable_reason())
    cleanup_stale()  # namespaces left by an earlier run that crashed
    with Lab(workdir=tmp_path / "lab") as the_lab:
        yield the_lab


@pytest.fixture
def iptables_available() -> None:
    _require(None if shutil.which("iptables-restore") else "needs iptables (make system-deps)")
