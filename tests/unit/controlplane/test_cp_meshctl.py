"""meshctl's table: aligned columns, one line per proxy whatever the NACK message."""

from __future__ import annotations

import pytest

from controlplane.compile import ProxyNode
from controlplane.convert import ProxyStatusView
from meshctl.cli import build_parser, format_table


def row(pod: str, state: str, acked: str = "", nack: str = "") -> ProxyStatusView:
    return ProxyStatusView(
        ProxyNode(pod, "demo"), acked, acked, acked, state, nack, "2025-01-01T00:00:00+00:00"
    )


def test_table_columns_line_up_and_multi_line_errors_stay_on_one_line() -> None:
    text = format_table(
        [
            row("a-very-long-pod-name", "SYNCED", "0123456789abcdef"),
            row("b", "STALE", "", "line one\n  line two"),
        ]
    )
    lines = text.splitlines()
    assert len(lines) == 3
    assert [line.index("NAMESPACE") if i == 0 else line.index("demo") for i, line in enumerate(lines)] == [
        lines[0].index("NAMESPACE")
    ] * 3
    assert lines[1].split() == ["a-very-long-pod-name", "demo", "0123456789abcdef", "SYNCED", "-"]
    assert lines[2].split()[:4] == ["b", "demo", "-", "STALE"] and lines[2].endswith("line one line two")


def test_control_plane_address_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHCTL_CONTROL_PLANE", "198.18.0.1:15010")
    assert build_parser().parse_args(["proxy-status"]).control_plane == "198.18.0.1:15010"
    assert build_parser().parse_args(["--control-plane", "x:1", "proxy-status"]).control_plane == "x:1"
    monkeypatch.delenv("MESHCTL_CONTROL_PLANE")
    assert build_parser().parse_args(["proxy-status"]).control_plane == "localhost:15010"
