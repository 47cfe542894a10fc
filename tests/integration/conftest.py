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

from meshproxy.lab.netns import Lab
from tests.support.require import missing, require_lab


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    require_lab()
    with Lab(workdir=tmp_path / "lab") as the_lab:
        yield the_lab


@pytest.fixture
def iptables_available() -> None:
    if shutil.which("iptables-restore") is None:
        missing("network-namespace lab unavailable: needs iptables (make system-deps)")
