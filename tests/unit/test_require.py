"""The rule every test that needs an installed tool follows (tests/support/require.py)."""

from __future__ import annotations

import pytest

from tests.support.require import missing


def test_a_missing_tool_skips_the_test_on_a_developers_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"^haproxy not installed$"):
        missing("haproxy not installed")


def test_a_missing_tool_fails_the_test_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match=r"^required under CI: haproxy not installed$"):
        missing("haproxy not installed")


def test_a_lab_test_without_iptables_fails_under_ci_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import meshproxy.lab.netns
    import tests.support.require as require

    monkeypatch.setenv("CI", "1")
    monkeypatch.setattr(meshproxy.lab.netns, "unavailable_reason", lambda: None)  # namespaces work
    monkeypatch.setattr(require.shutil, "which", lambda _name: None)  # iptables-restore does not
    with pytest.raises(pytest.fail.Exception, match=r"needs iptables \(make system-deps\)$"):
        require.require_lab(iptables=True)
