"""Summary, ratios, target checks, Markdown table and plot of a ``make bench-peers`` run.

Owns: everything computed from the raw measurement rows of ``bench.compare`` (one row per
scenario x test x round), and nothing that measures.

Invariants:
  * Pure arithmetic on the rows (no I/O, no clock) except ``plot``, which writes one PNG and
    imports matplotlib lazily, so the rest works without the optional ``bench`` extra.
  * Added latency is taken against ``direct`` of the *same round and test*, then the median
    over rounds; scenarios are never compared across rounds, because absolute times on a
    shared machine drift (shared/GUIDE.md section 5).
  * A ratio is ``None`` (not 0, not inf) when either side is missing or its denominator is
    not positive, and the table leaves such a cell empty.

Concurrency: none.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# meshproxy-l4 is the floor: the same two sidecars relaying bytes (every port opaque TCP,
# telemetry off), so what a Python process on uvloop costs before it reads any HTTP.
FLOOR = "meshproxy-l4"
MESH = ("meshproxy", "meshproxy-notel", FLOOR)
PEERS = ("haproxy", "nginx", "traefik")
ORDER = ("direct", *MESH, *PEERS)
LATENCY = ("p50_ms", "p90_ms", "p99_ms", "max_ms")
Row = dict[str, Any]


def ratio(num: float | None, den: float | None) -> float | None:
    """``num / den``, or None when either is missing or the denominator is not positive."""
    if num is None or den is None or den <= 0:
        return None
    return num / den


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _order(scenario: str) -> int:
    return ORDER.index(scenario) if scenario in ORDER else len(ORDER)


def test_order(test: str) -> tuple[int, int]:
    """``http-250 < http-1000 < http-2000 < http-sat < grpc-1000 < tcp-bulk``."""
    kind, _, arg = test.partition("-")
    kinds = ("http", "grpc", "tcp")
    return (kinds.index(kind) if kind in kinds else 9, int(arg) if arg.isdigit() else 10**9)


def summarize(rows: Sequence[Row]) -> list[Row]:
    """One entry per (test, scenario): medians over rounds, latency added over direct, RSS peaks."""
    direct = {(r["round"], r["test"]): r for r in rows if r["scenario"] == "direct"}
    keys = sorted({(r["test"], r["scenario"]) for r in rows}, key=lambda k: (test_order(k[0]), _order(k[1])))
    out: list[Row] = []
    for test, scenario in keys:
        mine = [r for r in rows if r["test"] == test and r["scenario"] == scenario]
        entry: Row = {"test": test, "scenario": scenario, "rounds": len(mine)}
        for metric in (*LATENCY, "actual_qps", "cpu_s_per_1000", "proxy_cpu_util", "gbit_s", "cpu_s_per_gb"):
            value = _median(r.get(metric) for r in mine)
            if value is not None:
                entry[metric] = value
        for metric in LATENCY:
            added = [
                r[metric] - direct[(r["round"], test)][metric]
                for r in mine
                if metric in r and (r["round"], test) in direct and metric in direct[(r["round"], test)]
            ]
            if added and scenario != "direct":
                entry["added_" + metric] = statistics.median(added)
        for metric in ("rss_idle_mb", "rss_load_mb"):
            peaks = [max(r[metric]) for r in mine if r.get(metric)]
            if peaks:
                entry[metric] = max(peaks)
        entry["requests"] = sum(int(r.get("requests", 0)) for r in mine)
        entry["errors"] = sum(int(r.get("errors", 0)) for r in mine)
        out.append(entry)
    return out


# Which metric each ratio compares, and whether lower is better (for the reader, not the maths).
RATIO_METRICS = (
    ("added_p50_ms", "lower"),
    ("added_p99_ms", "lower"),
    ("cpu_s_per_1000", "lower"),
    ("actual_qps", "higher"),  # only meaningful for the saturation test
    ("gbit_s", "higher"),
    ("cpu_s_per_gb", "lower"),
)


def ratios(summary: Sequence[Row]) -> list[Row]:
    """meshproxy (telemetry on and off) divided by each peer, per test and metric present in both."""
    by = {(e["test"], e["scenario"]): e for e in summary}
    out: list[Row] = []
    for test in sorted({e["test"] for e in summary}, key=test_order):
        for mesh in MESH:
            mine = by.get((test, mesh))
            if mine is None:
                continue
            for peer in PEERS:
                theirs = by.get((test, peer))
                if theirs is None:
                    continue
                for metric, better in RATIO_METRICS:
                    if metric == "actual_qps" and not test.endswith("-sat"):
                        continue
                    value = ratio(mine.get(metric), theirs.get(metric))
                    if value is not None:
                        out.append(
                            {
                                "test": test,
                                "scenario": mesh,
                                "peer": peer,
                                "metric": metric,
                                "ratio": value,
                                "better": better,
                            }
                        )
    return out


@dataclass(frozen=True, slots=True)
class Target:
    """One of issue 7's targets: ``metric`` of meshproxy (telemetry on) against ``peer``.

    ``limited_by`` is what the report prints when the target is missed: the cause as far as
    it has been measured (docs/performance.md: py-spy profiles of both sidecars; the RSS split
    with telemetry on and off), kept short. Change it when a profile says otherwise.
    """

    name: str
    test: str  # "*": any test of the scenario (idle RSS is taken at every sidecar start)
    metric: str
    peer: str | None  # None: an absolute limit
    limit: float
    higher_is_better: bool = False
    limited_by: str = ""


_QUEUEING = (
    "both sidecars queue on one shared core, and each request's Python work in them (parse, "
    "route, rewrite headers, telemetry) costs several times a C proxy's CPU, so the tail "
    "grows at rates where the peers still idle"
)
TARGETS = (
    Target("added p99 <= nginx's (1000/s)", "http-1000", "added_p99_ms", "nginx", 1.0, limited_by=_QUEUEING),
    Target(
        "added p99 <= HAProxy's (1000/s)", "http-1000", "added_p99_ms", "haproxy", 1.0, limited_by=_QUEUEING
    ),
    Target(
        "CPU per request <= 3x nginx's (1000/s)",
        "http-1000",
        "cpu_s_per_1000",
        "nginx",
        3.0,
        limited_by=(
            "per-request Python work in each sidecar (HTTP parse, routing, header rewrite, span "
            "and metrics recording); not the system calls or the event loop: the same two "
            "sidecars relaying the same bytes without reading HTTP cost about what nginx does"
        ),
    ),
    Target(
        "saturation throughput per core >= Traefik's",
        "http-sat",
        "actual_qps",
        "traefik",
        1.0,
        True,
        limited_by=(
            "both sidecars share one core, so two hops top out near 1 / (CPU per request): "
            "the per-request Python work is the bound"
        ),
    ),
    Target(
        "idle RSS <= 40 MB per sidecar",
        "*",
        "rss_idle_mb",
        None,
        40.0,
        limited_by=(
            "the imported libraries: grpcio for the config stream (~9 MB), the "
            "OpenTelemetry SDK and protobuf (~5 MB)"
        ),
    ),
)

# How each metric reads in a sentence: (unit, format).
_UNITS = {
    "added_p99_ms": ("ms", "{:+.3f}"),
    "cpu_s_per_1000": ("CPU s/1000 req", "{:.3f}"),
    "actual_qps": ("req/s", "{:.0f}"),
    "rss_idle_mb": ("MB", "{:.1f}"),
}


def _entry(by: dict[tuple[str, str], Row], test: str, scenario: str, metric: str) -> float | None:
    """``metric`` of ``scenario`` at ``test``; for test ``*`` the largest over every test."""
    if test != "*":
        value = by.get((test, scenario), {}).get(metric)
        return None if value is None else float(value)
    values = [float(e[metric]) for (_, s), e in by.items() if s == scenario and e.get(metric) is not None]
    return max(values) if values else None


def _met(t: Target, mine: float, bound: float) -> bool:
    return mine >= bound if t.higher_is_better else mine <= bound


def check_targets(summary: Sequence[Row], targets: Sequence[Target] = TARGETS) -> list[Row]:
    """Each target's measured value (a ratio, or MB for the absolute one) and whether it is met.

    ``met`` is None only when meshproxy or the peer was not measured at the target's test.
    It is decided on the absolute values (meshproxy against ``limit`` x the peer's), so a peer
    whose added latency came out at or below zero (noise against ``direct``) still gives a
    verdict, though its ratio (``value``) is None.
    """
    by = {(e["test"], e["scenario"]): e for e in summary}
    out: list[Row] = []
    for t in targets:
        mine = _entry(by, t.test, "meshproxy", t.metric)
        theirs = None if t.peer is None else _entry(by, t.test, t.peer, t.metric)
        value = mine if t.peer is None else ratio(mine, theirs)
        if mine is None or (t.peer is not None and theirs is None):
            met = None
        else:
            met = _met(t, mine, t.limit if theirs is None else t.limit * theirs)
        out.append(
            {
                "target": t.name,
                "value": value,
                "limit": t.limit,
                "met": met,
                "unit": "MB" if t.peer is None else "x",
            }
        )
    return out


def targets_by_round(
    rows: Sequence[Row], targets: Sequence[Target] = TARGETS
) -> dict[str, list[float | None]]:
    """Each target's value in each round alone (rounds in order), from that round's rows.

    Every scenario of a round ran within minutes of the others, so a same-round ratio sees
    the least drift; a neighbour that took the machine for one round shows up as one
    outlying value here instead of hiding in the median. The verdict stays with the medians.
    """
    out: dict[str, list[float | None]] = {t.name: [] for t in targets}
    for rnd in sorted({r["round"] for r in rows}):
        checked = check_targets(summarize([r for r in rows if r["round"] == rnd]), targets)
        for c in checked:
            out[c["target"]].append(c["value"])
    return out


def _evidence(t: Target, by: dict[tuple[str, str], Row]) -> str:
    """What the same run says about the cause, from numbers it measured (empty if none)."""
    notes = []
    if t.metric == "added_p99_ms":
        asked = int(t.test.rsplit("-", 1)[1])
        qps = _entry(by, t.test, "meshproxy", "actual_qps")
        if qps is not None and qps < 0.97 * asked:
            notes.append(
                f"meshproxy delivered {qps:.0f} of {asked} req/s asked (fortio -nocatchup), "
                "so its p99 here is mostly queueing"
            )
        if t.peer is not None:
            cpu = ratio(
                _entry(by, t.test, "meshproxy", "cpu_s_per_1000"),
                _entry(by, t.test, t.peer, "cpu_s_per_1000"),
            )
            if cpu is not None:
                notes.append(f"CPU per request {cpu:.2f}x {t.peer}'s")
    elif t.metric == "cpu_s_per_1000" and t.peer is not None:
        off = ratio(_entry(by, t.test, "meshproxy-notel", t.metric), _entry(by, t.test, t.peer, t.metric))
        if off is not None:
            notes.append(f"with telemetry off {off:.2f}x {t.peer}'s")
    elif t.metric == "actual_qps" and t.peer is not None:
        mine = _entry(by, t.test, "meshproxy", "proxy_cpu_util")
        theirs = _entry(by, t.test, t.peer, "proxy_cpu_util")
        if mine is not None and theirs is not None:
            notes.append(f"proxy core {mine:.0%} busy for meshproxy, {theirs:.0%} for {t.peer}")
        direct = _entry(by, t.test, "direct", "actual_qps")
        if direct is not None:
            notes.append(f"the same load generator drove {direct:.0f} req/s with no proxy")
    elif t.metric == "rss_idle_mb":
        off = _entry(by, t.test, "meshproxy-notel", t.metric)
        if off is not None:
            notes.append(f"with telemetry off {off:.1f} MB")
    if t.metric in ("added_p99_ms", "cpu_s_per_1000") and t.peer is not None:
        notes.extend(_floor(t, t.peer, by))
    return "; ".join(notes)


def _floor(t: Target, peer: str, by: dict[tuple[str, str], Row]) -> list[str]:
    """What the floor scenario says: how much of the gap remains with no HTTP work at all."""
    floor = _entry(by, t.test, FLOOR, t.metric)
    theirs = _entry(by, t.test, peer, t.metric)
    if floor is None or theirs is None:
        return []
    unit, fmt = _UNITS.get(t.metric, ("", "{:.3f}"))
    share = ratio(floor, _entry(by, t.test, "meshproxy", t.metric))
    versus = ratio(floor, theirs)
    measured = f"{versus:.2f}x {peer}'s" if versus is not None else f"{fmt.format(floor)} {unit}"
    text = f"the same two sidecars relaying bytes only ({FLOOR}: no HTTP parsing, no telemetry): {measured}"
    if share is not None:
        text += f", {share:.0%} of meshproxy's"
    return [text]


def explain_misses(summary: Sequence[Row], targets: Sequence[Target] = TARGETS) -> list[Row]:
    """For every missed target: by how much (relative and in the metric's unit) and what limits it."""
    by = {(e["test"], e["scenario"]): e for e in summary}
    checked = {c["target"]: c for c in check_targets(summary, targets)}
    out: list[Row] = []
    for t in targets:
        if checked[t.name]["met"] is not False:
            continue
        mine = _entry(by, t.test, "meshproxy", t.metric)
        theirs = None if t.peer is None else _entry(by, t.test, t.peer, t.metric)
        assert mine is not None  # met is False only when measured
        unit, fmt = _UNITS.get(t.metric, ("", "{:.3f}"))
        bound = t.limit if theirs is None else t.limit * theirs
        allowed = f"{'needed' if t.higher_is_better else 'allowed'} {fmt.format(bound)} {unit}"
        if theirs is not None:
            allowed += f" ({t.limit:g}x {t.peer}'s" + ("" if t.limit == 1 else f" {fmt.format(theirs)}") + ")"
        factor = ratio(bound, mine) if t.higher_is_better else ratio(mine, bound)
        if factor is None:  # a bound at or below zero: say it in the metric's unit
            gap = f"{abs(mine - bound):.3f} {unit} {'short' if t.higher_is_better else 'over'}"
        else:
            gap = f"{factor:.2f}x {'short' if t.higher_is_better else 'over'}"
        how = f"{fmt.format(mine)} {unit}, {allowed}: {gap}"
        out.append(
            {
                "target": t.name,
                "missed_by": how,
                "factor": factor,
                "limited_by": t.limited_by,
                "evidence": _evidence(t, by),
            }
        )
    return out


# --- Markdown ------------------------------------------------------------------------------------


def _f(value: Any, fmt: str = "{:.3f}") -> str:
    return "" if value is None else fmt.format(value)


def markdown(report: Row) -> str:
    m = report["machine"]
    meth = report["method"]
    lines = [
        f"Measured {m['date']} on {m['cpu_model']} ({m['cpus']} cores, shared), kernel {m['kernel']}, "
        f"Python {m['python']} ({m.get('interpreter', '?')}), data path {m.get('data_path', 'interpreted')}; {m['haproxy']}; {m['nginx']}; Traefik {m['traefik']}; fortio {m['fortio']}; "
        f"{m['iperf3']}. Two hops (client-side + server-side sidecar, `meshproxy iptables install` "
        f"interception), 1 KB responses, {meth['connections']} connections, {meth['duration_s']} s per run, "
        f"median of {meth['rounds']} interleaved rounds; proxies pinned to CPU {meth['proxy_cpu']}, "
        f"load generator and backend to CPU {meth['load_cpu']}.",
        "",
    ]
    summary = report["summary"]
    lat = [e for e in summary if not e["test"].startswith("tcp") and not e["test"].endswith("-sat")]
    if lat:
        lines += [
            "**Latency at a fixed rate** (ms; *added* = over direct in the same round; CPU = both proxies)",
            "",
            "| test | scenario | achieved req/s | p50 | p90 | p99 | max | added p50 | added p99 "
            "| CPU s/1000 req | RSS idle MB | RSS load MB | errors |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for e in lat:
            lines.append(
                f"| {e['test']} | {e['scenario']} | {_f(e.get('actual_qps'), '{:.0f}')} | {_f(e.get('p50_ms'))} | {_f(e.get('p90_ms'))} | "
                f"{_f(e.get('p99_ms'))} | {_f(e.get('max_ms'), '{:.1f}')} | {_f(e.get('added_p50_ms'))} | "
                f"{_f(e.get('added_p99_ms'))} | {_f(e.get('cpu_s_per_1000'))} | "
                f"{_f(e.get('rss_idle_mb'), '{:.0f}')} | {_f(e.get('rss_load_mb'), '{:.0f}')} | {e['errors']} |"
            )
        lines.append("")
    sat = [e for e in summary if e["test"].endswith("-sat")]
    if sat:
        lines += [
            f"**Saturation** (fortio -qps 0, {meth.get('sat_connections', meth['connections'])} connections; "
            "both proxies share one core)",
            "",
            "| scenario | req/s | proxy core busy | CPU s/1000 req | p50 ms | p99 ms | errors |",
            "|---|---|---|---|---|---|---|",
        ]
        for e in sat:
            lines.append(
                f"| {e['scenario']} | {_f(e.get('actual_qps'), '{:.0f}')} | "
                f"{_f(e.get('proxy_cpu_util'), '{:.0%}')} | {_f(e.get('cpu_s_per_1000'))} | "
                f"{_f(e.get('p50_ms'))} | {_f(e.get('p99_ms'))} | {e['errors']} |"
            )
        lines.append("")
    tcp = [e for e in summary if e["test"].startswith("tcp")]
    if tcp:
        lines += [
            "**Opaque TCP bulk transfer** (iperf3, one stream)",
            "",
            "| scenario | Gbit/s | CPU s/GB | RSS load MB |",
            "|---|---|---|---|",
        ]
        for e in tcp:
            lines.append(
                f"| {e['scenario']} | {_f(e.get('gbit_s'), '{:.2f}')} | {_f(e.get('cpu_s_per_gb'))} | "
                f"{_f(e.get('rss_load_mb'), '{:.0f}')} |"
            )
        lines.append("")
    rs = report.get("ratios", [])
    if rs:
        lines += [
            "**Ratios** meshproxy / peer (same run)",
            "",
            "| test | metric | scenario | / HAProxy | / nginx | / Traefik |",
            "|---|---|---|---|---|---|",
        ]
        cells: dict[tuple[str, str, str], dict[str, float]] = {}
        for r in rs:
            cells.setdefault((r["test"], r["metric"], r["scenario"]), {})[r["peer"]] = r["ratio"]
        for (test, metric, scenario), peers in cells.items():
            lines.append(
                f"| {test} | {metric} | {scenario} | "
                + " | ".join(_f(peers.get(p), "{:.2f}x") for p in PEERS)
                + " |"
            )
        lines.append("")
    ts = report.get("targets", [])
    if ts:
        # Older result files have no "target_misses": derive them from their summary.
        misses = {m["target"]: m for m in report.get("target_misses") or explain_misses(summary)}
        lines += [
            "**Issue 7 targets** (meshproxy, telemetry on; a miss says by how much and what limits it)",
            "",
            "| target | measured | round by round | met | missed by | what limits it |",
            "|---|---|---|---|---|---|",
        ]
        # From the raw rows, so result files written before "by_round" existed get it too.
        by_round = targets_by_round(report.get("rows", []))
        for t in ts:
            fmt = "{:.1f} MB" if t["unit"] == "MB" else "{:.2f}x"
            value = _f(t["value"], fmt)
            rounds = ", ".join(_f(v, fmt) or "-" for v in by_round.get(t["target"], []))
            met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
            miss = misses.get(t["target"], {})
            why = "; this run: ".join(x for x in (miss.get("limited_by"), miss.get("evidence")) if x)
            lines.append(
                f"| {t['target']} | {value} | {rounds} | {met} | {miss.get('missed_by', '')} | {why} |"
            )
        lines.append("")
    skipped = report.get("skipped", {})
    if skipped:
        lines += ["Not measured: " + "; ".join(f"{k}: {v}" for k, v in sorted(skipped.items())), ""]
    return "\n".join(lines)


# --- plot ------------------------------------------------------------------------------------------


def plot(report: Row, out: Path, test: str = "http-1000") -> bool:
    """Latency percentiles and CPU per 1000 requests by proxy for ``test``; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    entries = [e for e in report["summary"] if e["test"] == test]
    names = [e["scenario"] for e in entries]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.2
    for i, metric in enumerate(("p50_ms", "p90_ms", "p99_ms")):
        xs = [j + (i - 1) * width for j in range(len(names))]
        ax1.bar(xs, [e.get(metric) or 0 for e in entries], width, label=metric.removesuffix("_ms"))
    ax1.set_xticks(range(len(names)), names, rotation=20)
    ax1.set_yscale("log")  # p50 and p99 differ by orders of magnitude on a shared machine
    ax1.set_ylabel("latency, ms (two hops, log scale)")
    ax1.set_title(f"{test}: latency percentiles")
    ax1.legend()
    cpu = [(e["scenario"], e["cpu_s_per_1000"]) for e in entries if e.get("cpu_s_per_1000") is not None]
    ax2.bar([n for n, _ in cpu], [v for _, v in cpu], color="tab:gray")
    ax2.set_ylabel("CPU seconds per 1000 requests (both proxies)")
    ax2.set_title(f"{test}: proxy CPU per 1000 requests")
    ax2.tick_params(axis="x", rotation=20)
    fig.suptitle(
        f"meshproxy vs peers, {report['machine']['date']} (median of {report['method']['rounds']} rounds)"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True
