"""What a test does when a tool or facility it needs is missing.

Owns one rule: on a developer's machine the test is skipped, with the reason; under CI (the
``CI`` environment variable set) it fails. ``make test`` installs or builds everything a test
needs (Debian packages, Go programs, the venv's extras), so under CI a missing one is a bug in
the project's own setup, never a reason to report a green run that did not test.
"""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest


def missing(reason: str) -> NoReturn:
    """Skip the test for ``reason``; under CI, fail it."""
    if os.environ.get("CI"):
        pytest.fail(f"required under CI: {reason}")
    pytest.skip(reason)


def require_lab(*, iptables: bool = False) -> None:
    """Skip (fail under CI) unless a network-namespace lab can run here, and, with ``iptables``,
    unless ``iptables-restore`` is installed (``make system-deps``); then remove the namespaces
    an earlier run that crashed left behind, so the test starts from a clean machine."""
    from meshproxy.lab.netns import cleanup_stale, unavailable_reason

    reason = unavailable_reason()
    if reason is None and iptables and shutil.which("iptables-restore") is None:
        reason = "needs iptables (make system-deps)"
    if reason is not None:
        missing(f"network-namespace lab unavailable: {reason}")
    cleanup_stale()
