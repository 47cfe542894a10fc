"""``make bench``'s report shows each round's baselines, so a noisy run can be told apart."""

from __future__ import annotations

from typing import Any

from bench.run import baselines, markdown


def _row(scenario: str, rnd: int, p50: float, p90: float, cpu: float | None) -> dict[str, Any]:
    return {
        "scenario": scenario,
        "rate": 1000,
        "round": rnd,
        "p50_ms": p50,
        "p90_ms": p90,
        "p99_ms": p90 * 2,
        "max_ms": p90 * 4,
        "cpu_s_per_1000": cpu,
        "rss_mb": [7.0] if cpu is not None else [],
        "errors": 0,
    }


ROWS = [
    _row("direct", 1, 0.081, 0.190, None),
    _row("nginx", 0, 0.250, 0.380, 0.101),
    _row("direct", 0, 0.051, 0.092, None),
    _row("nginx", 1, 0.330, 0.520, 0.171),
]


def test_baselines_list_every_round_in_order() -> None:
    assert baselines(ROWS) == (
        "Baselines round by round (machine noise shows here first): "
        "direct p50/p90 ms at 1000/s: 0.051/0.092, 0.081/0.190; "
        "nginx CPU s/1000 req at 1000/s: 0.101, 0.171."
    )


def test_no_baseline_scenario_means_no_line() -> None:
    assert baselines([_row("meshproxy", 0, 0.6, 0.9, 0.5)]) is None


def test_the_markdown_report_carries_the_line() -> None:
    from bench.run import summarize

    report = {
        "machine": {
            "date": "d",
            "cpu_model": "c",
            "cpus": 2,
            "kernel": "k",
            "python": "p",
            "nginx": "n",
            "fortio": "f",
        },
        "method": {"duration_s": 10.0, "rounds": 2},
        "rows": ROWS,
        "summary": summarize(ROWS),
    }
    assert "direct p50/p90 ms at 1000/s: 0.051/0.092, 0.081/0.190" in markdown(report)
