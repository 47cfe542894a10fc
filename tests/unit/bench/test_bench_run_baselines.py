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


def _report(rows: list[dict[str, Any]]) -> dict[str, Any]:
    from bench.run import summarize

    return {
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
        "rows": rows,
        "summary": summarize(rows),
    }


def test_the_markdown_report_carries_the_line() -> None:
    assert "direct p50/p90 ms at 1000/s: 0.051/0.092, 0.081/0.190" in markdown(_report(ROWS))


def test_a_run_whose_baselines_held_still_is_not_called_noisy() -> None:
    from bench.run import noise

    quiet = [
        _row("direct", 0, 0.044, 0.068, None),
        _row("direct", 1, 0.045, 0.078, None),
        _row("nginx", 0, 0.210, 0.322, 0.104),
        _row("nginx", 1, 0.205, 0.330, 0.093),
    ]
    assert noise(quiet) == []


def test_a_moving_baseline_makes_the_run_noisy_and_the_report_says_why() -> None:
    from bench.run import noise

    reasons = noise(ROWS)  # direct p90 0.092 -> 0.190, nginx CPU 0.101 -> 0.171
    assert [r.split(" at ")[0] for r in reasons] == ["direct p90", "nginx CPU"]
    assert "from 0.092 to 0.190" in reasons[0]
    assert "**Noisy run**: direct p90 at 1000/s moved from 0.092 to 0.190" in markdown(_report(ROWS))


def test_an_nginx_tail_burst_alone_makes_the_run_noisy() -> None:
    from bench.run import noise

    rows = [_row("nginx", 0, 0.21, 0.30, 0.10), _row("nginx", 1, 0.21, 0.30, 0.10)]
    rows[1]["p99_ms"] = 1.8  # one round's tail 3x the other's, everything else equal
    assert [r.split(" at ")[0] for r in noise(rows)] == ["nginx p99"]
