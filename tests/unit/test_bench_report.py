"""The peer benchmark's arithmetic (bench/report.py): medians, added latency, ratios, targets.

Rows are built by hand with round numbers so every expected value can be checked on paper.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from bench import report
from tests.support.require import missing


def row(scenario: str, test: str, rnd: int, p99: float, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "round": rnd,
        "scenario": scenario,
        "test": test,
        "p50_ms": p99 / 2,
        "p90_ms": p99 * 0.8,
        "p99_ms": p99,
        "max_ms": p99 * 2,
        "requests": 1000,
        "errors": 0,
        "actual_qps": 1000.0,
        "rss_idle_mb": [],
        "rss_load_mb": [],
    }
    base.update(extra)
    return base


def test_added_latency_is_against_direct_of_the_same_round() -> None:
    # Round 1 is slow for everybody (a noisy neighbour): direct and the proxy both +10 ms.
    rows = [
        row("direct", "http-1000", 0, 1.0),
        row("direct", "http-1000", 1, 11.0),
        row("direct", "http-1000", 2, 1.0),
        row("nginx", "http-1000", 0, 2.0),
        row("nginx", "http-1000", 1, 12.0),
        row("nginx", "http-1000", 2, 2.5),
    ]
    entry = {e["scenario"]: e for e in report.summarize(rows)}["nginx"]
    assert entry["added_p99_ms"] == pytest.approx(1.0)  # median of 1.0, 1.0, 1.5
    assert entry["p99_ms"] == pytest.approx(2.5)  # median of the absolute values
    assert "added_p99_ms" not in {e["scenario"]: e for e in report.summarize(rows)}["direct"]


def test_summary_cpu_rss_and_errors() -> None:
    rows = [
        row(
            "haproxy",
            "http-1000",
            0,
            2.0,
            cpu_s_per_1000=0.02,
            rss_idle_mb=[5.0, 6.0],
            rss_load_mb=[7.0, 9.0],
        ),
        row(
            "haproxy",
            "http-1000",
            1,
            2.0,
            cpu_s_per_1000=0.04,
            rss_idle_mb=[5.0, 5.0],
            rss_load_mb=[8.0, 8.5],
            errors=3,
        ),
        row(
            "haproxy",
            "http-1000",
            2,
            2.0,
            cpu_s_per_1000=0.03,
            rss_idle_mb=[5.0, 5.5],
            rss_load_mb=[7.0, 7.0],
        ),
    ]
    (entry,) = report.summarize(rows)
    assert entry["cpu_s_per_1000"] == pytest.approx(0.03)
    assert entry["rss_idle_mb"] == 6.0  # the worst proxy in the worst round
    assert entry["rss_load_mb"] == 9.0
    assert entry["errors"] == 3 and entry["requests"] == 3000
    assert "added_p99_ms" not in entry  # no direct baseline in these rows


def test_summary_orders_tests_and_scenarios() -> None:
    rows = [
        row(s, t, 0, 1.0)
        for t in ("tcp-bulk", "http-sat", "grpc-1000", "http-2000", "http-250")
        for s in ("traefik", "meshproxy", "direct")
    ]
    keys = [(e["test"], e["scenario"]) for e in report.summarize(rows)]
    assert [k[0] for k in keys[::3]] == ["http-250", "http-2000", "http-sat", "grpc-1000", "tcp-bulk"]
    assert [k[1] for k in keys[:3]] == ["direct", "meshproxy", "traefik"]


def test_ratio_is_none_rather_than_infinite() -> None:
    assert report.ratio(2.0, 4.0) == 0.5
    assert report.ratio(None, 1.0) is None
    assert report.ratio(1.0, None) is None
    assert report.ratio(1.0, 0.0) is None
    assert report.ratio(1.0, -0.2) is None  # a negative "added" latency is noise, not a baseline


def test_ratios_mesh_over_each_peer() -> None:
    summary = [
        {
            "test": "http-1000",
            "scenario": "meshproxy",
            "added_p99_ms": 3.0,
            "cpu_s_per_1000": 0.3,
            "actual_qps": 1000.0,
        },
        {
            "test": "http-1000",
            "scenario": "nginx",
            "added_p99_ms": 1.0,
            "cpu_s_per_1000": 0.1,
            "actual_qps": 1000.0,
        },
        {"test": "http-1000", "scenario": "meshproxy-l4", "added_p99_ms": 2.0, "cpu_s_per_1000": 0.2},
        {"test": "http-sat", "scenario": "meshproxy", "actual_qps": 3000.0},
        {"test": "http-sat", "scenario": "traefik", "actual_qps": 6000.0},
    ]
    got = {(r["test"], r["scenario"], r["peer"], r["metric"]): r["ratio"] for r in report.ratios(summary)}
    assert got == {
        ("http-1000", "meshproxy", "nginx", "added_p99_ms"): pytest.approx(3.0),
        ("http-1000", "meshproxy", "nginx", "cpu_s_per_1000"): pytest.approx(3.0),
        # the byte-relay floor gets its ratios too
        ("http-1000", "meshproxy-l4", "nginx", "added_p99_ms"): pytest.approx(2.0),
        ("http-1000", "meshproxy-l4", "nginx", "cpu_s_per_1000"): pytest.approx(2.0),
        # fixed-rate runs all reach the same qps: that ratio would say nothing, so it is left out
        ("http-sat", "meshproxy", "traefik", "actual_qps"): pytest.approx(0.5),
    }


def test_targets_met_missed_and_not_measured() -> None:
    summary = [
        {
            "test": "http-1000",
            "scenario": "meshproxy",
            "added_p99_ms": 2.0,
            "cpu_s_per_1000": 0.25,
            "rss_idle_mb": 45.0,
        },
        {"test": "http-1000", "scenario": "nginx", "added_p99_ms": 1.0, "cpu_s_per_1000": 0.1},
        {"test": "http-1000", "scenario": "haproxy", "added_p99_ms": 4.0},
    ]
    got = {t["target"]: t for t in report.check_targets(summary)}
    assert got["added p99 <= nginx's (1000/s)"]["met"] is False
    assert got["added p99 <= nginx's (1000/s)"]["value"] == pytest.approx(2.0)
    assert got["added p99 <= HAProxy's (1000/s)"]["met"] is True
    assert got["CPU per request <= 3x nginx's (1000/s)"]["met"] is True  # 2.5x
    assert got["saturation throughput per core >= Traefik's"]["met"] is None
    assert got["idle RSS <= 40 MB per sidecar"] == {
        "target": "idle RSS <= 40 MB per sidecar",
        "value": 45.0,
        "limit": 40.0,
        "met": False,
        "unit": "MB",
    }


def _report(rows: list[dict[str, Any]]) -> dict[str, Any]:
    summary = report.summarize(rows)
    return {
        "machine": {
            "date": "2026-11-25T16:00:00+00:00",
            "cpu_model": "cpu",
            "cpus": 2,
            "kernel": "6.1",
            "python": "3.11",
            "haproxy": "HAProxy 2.6",
            "nginx": "nginx/1.22",
            "traefik": "3.7.13",
            "fortio": "1.66.5",
            "iperf3": "iperf 3.12",
        },
        "method": {"connections": 16, "duration_s": 10, "rounds": 1, "proxy_cpu": "1", "load_cpu": "0"},
        "rows": rows,
        "summary": summary,
        "ratios": report.ratios(summary),
        "targets": report.check_targets(summary),
        "skipped": {"traefik/grpc": "no h2c"},
    }


def test_markdown_has_one_line_per_measurement() -> None:
    rows = [
        row("direct", "http-1000", 0, 1.0),
        row("meshproxy", "http-1000", 0, 3.0, cpu_s_per_1000=0.2, rss_idle_mb=[30.0, 31.0]),
        row("nginx", "http-1000", 0, 2.0, cpu_s_per_1000=0.05),
        row("meshproxy", "http-sat", 0, 9.0, actual_qps=2500.0, proxy_cpu_util=1.0),
        {
            "round": 0,
            "scenario": "haproxy",
            "test": "tcp-bulk",
            "gbit_s": 12.5,
            "cpu_s_per_gb": 0.4,
            "rss_idle_mb": [],
            "rss_load_mb": [3.0],
        },
    ]
    text = report.markdown(_report(rows))
    assert (
        "| http-1000 | meshproxy | 1000 | 1.500 | 2.400 | 3.000 | 6.0 | 1.000 | 2.000 | 0.200 | 31 |" in text
    )
    assert "| meshproxy | 2500 | 100% |" in text
    assert "| haproxy | 12.50 | 0.400 | 3 |" in text
    assert "| http-1000 | added_p99_ms | meshproxy |  | 2.00x |  |" in text
    assert "| added p99 <= nginx's (1000/s) | 2.00x | 2.00x | **no** |" in text  # one round
    assert "Not measured: traefik/grpc: no h2c" in text


def test_plot_writes_a_png(tmp_path: Path) -> None:
    if importlib.util.find_spec("matplotlib") is None:
        # The optional `bench` extra; make test installs it, so under CI its absence is a bug.
        reason = "matplotlib not installed (pip install -e '.[bench]'; make test installs it)"
        missing(reason)
    rows = [
        row(s, "http-1000", 0, p, cpu_s_per_1000=c)
        for s, p, c in (("direct", 1.0, None), ("meshproxy", 3.0, 0.2), ("nginx", 2.0, 0.05))
    ]
    out = tmp_path / "plot.png"
    assert report.plot(_report(rows), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
