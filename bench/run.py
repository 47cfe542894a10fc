"""``make bench``: the sidecar beside nginx and no proxy at all, interleaved in one run.

Owns: the benchmark topology, the scenarios, the load runs and the report.

Topology (a ``meshproxy.lab`` lab: network namespaces on a bridge, 198.18.0.0/24)::

    pod "client":  fortio load (the app) ──▶ [client-side sidecar :15001] ──┐
    pod "server":  [server-side sidecar :15006] ──▶ fortio server :8080 ◀──┘  (1 KB responses)

Scenarios (each a pair of sidecars with the same iptables interception, installed by
``meshproxy iptables install`` exactly as the init container does):

    direct           no interception, no proxy: the baseline
    nginx            Debian's nginx as a sidecar-style reverse proxy on 15001/15006, upstream keep-alive
    meshproxy        two meshproxy sidecars, metrics + spans (100% sampled, exported over OTLP/HTTP)
    meshproxy-notel  two meshproxy sidecars, telemetry off
    meshproxy-metrics    metrics only                       (with --ablation)
    meshproxy-spans1     metrics + spans at 1%              (with --ablation)
    meshproxy-grpc       metrics + spans 100% over OTLP/gRPC (with --ablation)
    meshproxy-interpreted  as meshproxy, on the sources instead of the compiled data path
                         (MESHPROXY_INTERPRETED=1; name it in --scenarios)

Method (shared/GUIDE.md section 5): fixed-rate load from fortio (sub-millisecond histogram
resolution), 16 connections, keep-alive; scenarios interleaved round by round so drift on a
shared machine hits all of them alike; the proxies pinned to CPU 1, the load generator and the
backend to CPU 0. Reported per scenario: latency p50/p90/p99/max, the latency added over
direct in the same round, CPU seconds per 1000 requests for the proxies (utime+stime from
/proc over the load window, both hops together), and the RSS of each proxy at the end.

Network rule: all traffic stays inside the lab's namespaces; the lab is torn down on exit.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshproxy import compiled
from meshproxy.config.model import (
    AccessLogMode,
    Endpoint,
    Inbound,
    InboundPort,
    Protocol,
    Service,
    Snapshot,
    Telemetry,
    Tracing,
    Workload,
)
from meshproxy.lab.mesh import config_yaml
from meshproxy.lab.netns import Lab, LabProcess, Pod, cleanup_stale, wait_until

ROOT = Path(__file__).resolve().parent.parent
PROXY_UID = 1357
APP_PORT = 8080
OTLP_PORT = 4317
OTLP_HTTP_PORT = 4318
PROXY_CPU = "1"
LOAD_CPU = "0"
SCENARIOS = ("direct", "nginx", "meshproxy", "meshproxy-notel")
ABLATION = ("meshproxy-metrics", "meshproxy-spans1", "meshproxy-grpc")
INTERPRETED = "meshproxy-interpreted"
TRACING_ALL = ("meshproxy", "meshproxy-grpc", INTERPRETED)  # every request gives one span per hop
CLK_TCK = os.sysconf("SC_CLK_TCK")
CONNECTIONS = 16


def fortio() -> str:
    done = subprocess.run([str(ROOT / "scripts" / "go-tool.sh"), "fortio"], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"bench: could not build fortio:\n{done.stderr}")
    return done.stdout.strip()


# --- proxies ---------------------------------------------------------------------------------


def telemetry_for(scenario: str, collector_ip: str) -> Telemetry:
    """A scenario's telemetry; spans go to the receiver at ``collector_ip`` over OTLP/HTTP (the
    chart's default with its bundled Jaeger) or, for ``meshproxy-grpc``, OTLP/gRPC."""
    if scenario == "meshproxy-notel":
        return Telemetry(tracing=Tracing(sampling_ratio=0.0), access_log=AccessLogMode.OFF, metrics=False)
    if scenario == "meshproxy-metrics":
        return Telemetry(tracing=Tracing(sampling_ratio=0.0), metrics=True)
    ratio = 0.01 if scenario == "meshproxy-spans1" else 1.0
    if scenario == "meshproxy-grpc":
        tracing = Tracing(sampling_ratio=ratio, otlp_grpc_endpoint=f"http://{collector_ip}:{OTLP_PORT}")
    else:
        tracing = Tracing(
            sampling_ratio=ratio, otlp_http_endpoint=f"http://{collector_ip}:{OTLP_HTTP_PORT}/v1/traces"
        )
    return Telemetry(tracing=tracing, metrics=True)


def meshproxy_configs(server: Pod, telemetry: Telemetry) -> tuple[str, str]:
    """Static configs for the client-side and server-side sidecar."""
    backend = Service(
        name="server",
        namespace="bench",
        port=APP_PORT,
        protocol=Protocol.HTTP1,
        vips=(server.ip,),
        hostnames=("server", "server.bench"),
        endpoints=(Endpoint(address=server.ip, port=APP_PORT, pod="server", workload="server"),),
    )
    client = Snapshot(
        workload=Workload(name="client", namespace="bench", pod="client"),
        services=(backend,),
        telemetry=telemetry,
    )
    srv = Snapshot(
        workload=Workload(name="server", namespace="bench", pod="server"),
        services=(backend,),
        inbound=Inbound(ports=(InboundPort(port=APP_PORT, protocol=Protocol.HTTP1, service="server"),)),
        telemetry=telemetry,
    )
    return config_yaml(client.with_version()), config_yaml(srv.with_version())


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
  upstream backend {{ server {upstream}; keepalive 64; }}
  server {{
    listen {port} reuseport;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_buffering off;
    }}
  }}
}}
"""


@dataclass
class Setup:
    name: str
    procs: list[LabProcess] = field(default_factory=list)
    intercept: bool = False


class Bench:
    def __init__(self, lab: Lab, fortio_bin: str, args: argparse.Namespace) -> None:
        self.lab = lab
        self.fortio = fortio_bin
        self.args = args
        self.client = lab.add_pod("client")
        self.server = lab.add_pod("server")
        self.telemetry_pod = lab.add_pod("telemetry")
        self.meshproxy = str(ROOT / ".venv" / "bin" / "meshproxy")
        assert lab.workdir is not None
        self.workdir = lab.workdir
        self.workdir.chmod(0o755)
        backend = lab.spawn(
            self.server,
            [
                "taskset",
                "-c",
                LOAD_CPU,
                self.fortio,
                "server",
                "-http-port",
                str(APP_PORT),
                "-grpc-port",
                "disabled",
                "-redirect-port",
                "disabled",
                "-quiet",
            ],
            name="backend",
        )
        lab.wait_listening(self.server, APP_PORT, proc=backend)
        self.spans_file = self.workdir / "spans.count"
        receiver = lab.spawn(
            self.telemetry_pod,
            [
                "taskset",  # off the proxies' core: the receiver is not what is measured
                "-c",
                LOAD_CPU,
                sys.executable,
                "-m",
                "bench.spancount",
                "--host",
                "0.0.0.0",
                "--port",
                str(OTLP_PORT),
                "--http-port",
                str(OTLP_HTTP_PORT),
                "--out",
                str(self.spans_file),
            ],
            name="otlp",
            cwd=ROOT,
        )
        lab.wait_listening(self.telemetry_pod, OTLP_PORT, proc=receiver)
        lab.wait_listening(self.telemetry_pod, OTLP_HTTP_PORT, proc=receiver)

    def spans_received(self) -> int:
        """Spans the OTLP receiver has counted so far."""
        try:
            return int(self.spans_file.read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def spans_settled(self, expected: int | None = None, timeout: float = 15.0) -> int:
        """The receiver's span count once it reached ``expected`` or stopped growing for 1.5 s
        (longer than the sidecars' 1 s export delay)."""
        deadline = time.monotonic() + timeout
        last, since = self.spans_received(), time.monotonic()
        while time.monotonic() < deadline:
            if expected is not None and last >= expected:
                return last
            time.sleep(0.1)
            now = self.spans_received()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= 1.5:
                return last
        return last

    def _iptables(self, pod: Pod, action: str) -> None:
        self.lab.exec(pod, [self.meshproxy, "iptables", action, "--proxy-uid", str(PROXY_UID)])

    def start(self, scenario: str) -> Setup:
        setup = Setup(scenario)
        if scenario == "direct":
            return setup
        setup.intercept = True
        for pod in (self.client, self.server):
            self._iptables(pod, "install")
        pinned = ["taskset", "-c", PROXY_CPU]
        if scenario == "nginx":
            for pod, port, upstream in (
                (self.client, 15001, f"{self.server.ip}:{APP_PORT}"),
                (self.server, 15006, f"127.0.0.1:{APP_PORT}"),
            ):
                d = self.workdir / f"nginx-{pod.name}"
                d.mkdir(exist_ok=True)
                (d / "nginx.conf").write_text(NGINX_CONF.format(dir=d, upstream=upstream, port=port))
                shutil.chown(d, PROXY_UID, PROXY_UID)
                proc = self.lab.spawn(
                    pod, [*pinned, "nginx", "-c", str(d / "nginx.conf")], name="nginx", uid=PROXY_UID
                )
                setup.procs.append(proc)
                self.lab.wait_listening(pod, port, proc=proc)
            return setup
        telemetry = telemetry_for(scenario, self.telemetry_pod.ip)
        client_cfg, server_cfg = meshproxy_configs(self.server, telemetry)
        for pod, cfg in ((self.client, client_cfg), (self.server, server_cfg)):
            path = self.workdir / f"{scenario}-{pod.name}.yaml"
            path.write_text(cfg)
            path.chmod(0o644)
            proc = self.lab.spawn(
                pod,
                [*pinned, self.meshproxy, "run", "--config", str(path)],
                name=scenario,
                uid=PROXY_UID,
                env={"MESHPROXY_INTERPRETED": "1"} if scenario == INTERPRETED else None,
            )
            setup.procs.append(proc)
            self.lab.wait_listening(pod, 15006, proc=proc)
            self.lab.wait_listening(pod, 15001, proc=proc)
        return setup

    def stop(self, setup: Setup) -> None:
        for proc in setup.procs:
            proc.stop()
        if setup.intercept:
            for pod in (self.client, self.server):
                self._iptables(pod, "cleanup")

    def load(self, rate: int, duration: float, out: Path) -> dict[str, Any]:
        url = f"http://{self.server.ip}:{APP_PORT}/echo?size=1024"
        return fortio_load(
            self.lab,
            self.client,
            self.fortio,
            url,
            rate=rate,
            connections=CONNECTIONS,
            duration=duration,
            out=out,
        )

    def warm(self) -> None:
        url = f"http://{self.server.ip}:{APP_PORT}/echo?size=1024"
        wait_until(
            lambda: self.lab.exec(
                self.client,
                [sys.executable, "-c", f"import urllib.request as u; u.urlopen({url!r}, timeout=2).read()"],
                check=False,
            ).returncode
            == 0,
            15,
            "first request through the scenario",
        )


def fortio_load(
    lab: Lab,
    pod: Pod,
    fortio_bin: str,
    target: str,
    *,
    rate: int,
    connections: int,
    duration: float,
    out: Path,
    extra: tuple[str, ...] = (),
) -> dict[str, Any]:
    """One fortio run from ``pod`` on the load core: fixed rate (``rate`` 0 = as fast as it can),
    uniform pacing without catch-up, sub-millisecond histogram; returns fortio's JSON result."""
    argv = [
        "taskset", "-c", LOAD_CPU, fortio_bin, "load", *extra,
        "-qps", str(rate), "-c", str(connections), "-t", f"{duration}s",
        "-uniform", "-nocatchup", "-p", "50,90,99,99.9", "-r", "0.00001",
        "-quiet", "-json", str(out), target,
    ]  # fmt: skip
    lab.exec(pod, argv, timeout=duration + 60)
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def cpu_seconds(pids: list[int]) -> float:
    """utime+stime of the processes and their (reaped and live) children."""
    total = 0.0
    for pid in pids:
        for p in [pid, *_children(pid)]:
            try:
                fields_ = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields_[11]) + int(fields_[12])) / CLK_TCK
    return total


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = (task / "children").read_text().split()
        except OSError:
            continue
        for k in kids:
            out += [int(k), *_children(int(k))]
    return out


def rss_mb(pid: int) -> float:
    best = 0.0
    for p in [pid, *_children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    best = max(best, int(line.split()[1]) / 1024)
        except OSError:
            continue
    return best


def percentile(hist: dict[str, Any], p: float) -> float:
    for item in hist["Percentiles"]:
        if abs(item["Percentile"] - p) < 1e-9:
            return float(item["Value"]) * 1000
    raise KeyError(p)


def run(args: argparse.Namespace) -> dict[str, Any]:
    scenarios = list(args.scenarios.split(","))
    if args.ablation:
        scenarios += [s for s in ABLATION if s not in scenarios]
    rates = [int(r) for r in args.rates.split(",")]
    results: list[dict[str, Any]] = []
    cleanup_stale()  # namespaces left by an interrupted earlier run
    with Lab() as lab:
        bench = Bench(lab, fortio(), args)
        for rnd in range(args.rounds):
            for scenario in scenarios:
                setup = bench.start(scenario)
                try:
                    bench.warm()
                    # Spans are checked where every request must give one span per hop.
                    tracing_all = scenario in TRACING_ALL
                    for rate in rates:
                        spans0 = bench.spans_settled() if tracing_all else 0
                        pids = [p.pid for p in setup.procs]
                        spies = profilers(args, scenario, rate, rnd, pids)
                        cpu0 = cpu_seconds(pids)
                        data = bench.load(
                            rate, args.duration, bench.workdir / f"{scenario}-{rate}-{rnd}.json"
                        )
                        cpu = cpu_seconds(pids) - cpu0
                        for spy in spies:
                            spy.wait(timeout=30)
                        count = int(data["DurationHistogram"]["Count"])
                        spans = None
                        # fortio sends one untimed warm-up request per connection before the
                        # timed ones: those are traced too.
                        expected = 2 * (count + CONNECTIONS)
                        if tracing_all:
                            spans = bench.spans_settled(spans0 + expected) - spans0
                        hist = data["DurationHistogram"]
                        count = int(hist["Count"])
                        ok = int(data["RetCodes"].get("200", 0))
                        row = {
                            "round": rnd,
                            "scenario": scenario,
                            "rate": rate,
                            "requests": count,
                            "errors": count - ok,
                            "actual_qps": data["ActualQPS"],
                            "p50_ms": percentile(hist, 50),
                            "p90_ms": percentile(hist, 90),
                            "p99_ms": percentile(hist, 99),
                            "max_ms": float(hist["Max"]) * 1000,
                            "cpu_s_per_1000": (cpu / count * 1000) if setup.procs and count else None,
                            "rss_mb": [round(rss_mb(p), 1) for p in pids],
                            "spans_expected": expected if tracing_all else None,
                            "spans_received": spans,
                        }
                        results.append(row)
                        print(
                            f"round {rnd} {scenario:18} {rate:5}/s p50 {row['p50_ms']:.3f} p90 "
                            f"{row['p90_ms']:.3f} p99 {row['p99_ms']:.3f} ms errors {row['errors']} "
                            f"cpu/1000 {row['cpu_s_per_1000'] or 0:.3f}s rss {row['rss_mb']}",
                            flush=True,
                        )
                finally:
                    bench.stop(setup)
    return {"machine": machine(), "method": method(args), "rows": results, "summary": summarize(results)}


def profilers(
    args: argparse.Namespace, scenario: str, rate: int, rnd: int, pids: list[int]
) -> list[subprocess.Popen[bytes]]:
    """With ``--profile DIR``: py-spy (collapsed stacks, 200 Hz) on each sidecar for the load window.

    Profiling costs the sidecar CPU (py-spy reads its memory), so a profiled run's numbers are
    for finding where time goes, not for the report's ratios.
    """
    if not args.profile or not scenario.startswith("meshproxy"):
        return []
    spy = ROOT / ".venv" / "bin" / "py-spy"
    args.profile.mkdir(parents=True, exist_ok=True)
    return [
        subprocess.Popen(
            [
                str(spy),
                "record",
                "-r",
                "200",
                "-f",
                "raw",
                *(["--native"] if args.profile_native else ["--nonblocking"]),
                "--subprocesses",
                "-d",
                str(int(args.duration)),
                "-o",
                str(args.profile / f"{scenario}-{rate}-{rnd}-{i}.txt"),
                "--pid",
                str(pid),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i, pid in enumerate(pids)
    ]


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median over rounds per (scenario, rate); added latency against direct of the same round."""
    direct = {(r["round"], r["rate"]): r for r in rows if r["scenario"] == "direct"}
    out: list[dict[str, Any]] = []
    keys = sorted(
        {(r["scenario"], r["rate"]) for r in rows},
        key=lambda k: (k[1], SCENARIOS.index(k[0]) if k[0] in SCENARIOS else 99),
    )
    for scenario, rate in keys:
        mine = [r for r in rows if r["scenario"] == scenario and r["rate"] == rate]
        entry: dict[str, Any] = {"scenario": scenario, "rate": rate}
        for m in ("p50_ms", "p90_ms", "p99_ms", "max_ms"):
            entry[m] = statistics.median(r[m] for r in mine)
            base = [direct[(r["round"], rate)][m] for r in mine if (r["round"], rate) in direct]
            if base:
                entry["added_" + m] = statistics.median(r[m] - b for r, b in zip(mine, base, strict=True))
        cpus = [r["cpu_s_per_1000"] for r in mine if r["cpu_s_per_1000"] is not None]
        entry["cpu_s_per_1000"] = statistics.median(cpus) if cpus else None
        entry["rss_mb"] = max((max(r["rss_mb"]) for r in mine if r["rss_mb"]), default=None)
        entry["errors"] = sum(r["errors"] for r in mine)
        if any(r.get("spans_expected") for r in mine):
            entry["spans_expected"] = sum(r["spans_expected"] or 0 for r in mine)
            entry["spans_received"] = sum(r["spans_received"] or 0 for r in mine)
        out.append(entry)
    by = {(e["scenario"], e["rate"]): e for e in out}
    for e in out:
        ng = by.get(("nginx", e["rate"]))
        if ng and e["scenario"].startswith("meshproxy"):
            if ng.get("added_p99_ms"):
                e["added_p99_vs_nginx"] = e["added_p99_ms"] / ng["added_p99_ms"]
            if ng.get("cpu_s_per_1000") and e["cpu_s_per_1000"]:
                e["cpu_vs_nginx"] = e["cpu_s_per_1000"] / ng["cpu_s_per_1000"]
        off = by.get(("meshproxy-notel", e["rate"]))
        measured = off and off.get("cpu_s_per_1000") and e["cpu_s_per_1000"]
        if measured and e["scenario"].startswith("meshproxy") and e["scenario"] != "meshproxy-notel":
            e["cpu_vs_telemetry_off"] = e["cpu_s_per_1000"] / off["cpu_s_per_1000"]  # type: ignore[index]
    return out


def tool_version(argv: list[str]) -> str:
    """The first line a tool prints about its version, or "unknown"."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (done.stdout + done.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


def interpreter() -> str:
    """The Python the proxies run on (the benchmark's own, whose venv they are started
    from): its real path, and whether it runs from a shared ``libpython`` or has the
    interpreter linked in (as Debian's, built with PGO and LTO; scripts/python.sh)."""
    try:
        shared = "libpython" in Path("/proc/self/maps").read_text()
    except OSError:
        shared = False
    return f"{os.path.realpath(sys.executable)}, {'shared libpython' if shared else 'static'}"


def host_facts() -> dict[str, Any]:
    """When and on what a result was measured (recorded with every benchmark report)."""
    return {
        "interpreter": interpreter(),
        "data_path": compiled.status(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu_model": next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ),
            "unknown",
        ),
    }


def machine() -> dict[str, Any]:
    from importlib.metadata import version as pkg

    version = tool_version
    return {
        **host_facts(),
        "python": platform.python_version(),
        "nginx": version(["nginx", "-v"]),
        "fortio": version([fortio(), "version"]),
        "libraries": {
            p: pkg(p) for p in ("uvloop", "httptools", "h2", "opentelemetry-sdk", "prometheus-client")
        },
    }


def method(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "load_generator": "fortio (fixed rate, -uniform -nocatchup, 16 connections, keep-alive)",
        "duration_s": args.duration,
        "rounds": args.rounds,
        "response_bytes": 1024,
        "pinning": f"proxies on CPU {PROXY_CPU}, load generator and backend on CPU {LOAD_CPU}",
        "hops": 2,
    }


def baselines(rows: list[dict[str, Any]]) -> str | None:
    """The baselines round by round: no proxy's p50/p90 and nginx's CPU per 1000 requests.

    On this shared machine a noisy neighbour shows there first (on a quiet run they barely
    move between rounds); a reader can tell a quiet run from a noisy one without the medians.
    """
    parts = []
    for rate in sorted({r["rate"] for r in rows}):
        direct = sorted(
            (r for r in rows if r["scenario"] == "direct" and r["rate"] == rate), key=lambda r: r["round"]
        )
        nginx = sorted(
            (
                r
                for r in rows
                if r["scenario"] == "nginx" and r["rate"] == rate and r["cpu_s_per_1000"] is not None
            ),
            key=lambda r: r["round"],
        )
        if direct:
            runs = ", ".join(f"{r['p50_ms']:.3f}/{r['p90_ms']:.3f}" for r in direct)
            parts.append(f"direct p50/p90 ms at {rate}/s: {runs}")
        if nginx:
            runs = ", ".join(f"{r['cpu_s_per_1000']:.3f}" for r in nginx)
            parts.append(f"nginx CPU s/1000 req at {rate}/s: {runs}")
    if not parts:
        return None
    return "Baselines round by round (machine noise shows here first): " + "; ".join(parts) + "."


# How far a baseline may move between the rounds of one run before the run is called noisy.
# On a quiet machine direct's p90 and nginx's CPU move by 10-20% between rounds and nginx's
# p99 by well under 2x; a neighbour's burst moves them more, and the ratios with them.
NOISE_LIMITS = {
    "direct p90": ("direct", "p90_ms", 1.5),
    "nginx CPU": ("nginx", "cpu_s_per_1000", 1.3),
    "nginx p99": ("nginx", "p99_ms", 2.0),
}


def noise(rows: list[dict[str, Any]]) -> list[str]:
    """Why this run's ratios should not be trusted (empty: the baselines held still).

    A baseline that moves between rounds (max / min over ``NOISE_LIMITS``) means the machine
    was not quiet, and the medians mix quiet and disturbed rounds."""
    reasons = []
    for rate in sorted({r["rate"] for r in rows}):
        for label, (scenario, key, limit) in NOISE_LIMITS.items():
            values = [
                r[key] for r in rows if r["scenario"] == scenario and r["rate"] == rate and r[key] is not None
            ]
            if len(values) >= 2 and min(values) > 0 and max(values) / min(values) > limit:
                reasons.append(
                    f"{label} at {rate}/s moved from {min(values):.3f} to {max(values):.3f} between rounds "
                    f"({max(values) / min(values):.1f}x, limit {limit}x)"
                )
    return reasons


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Measured {report['machine']['date']} on {report['machine']['cpu_model']} "
        f"({report['machine']['cpus']} cores), kernel {report['machine']['kernel']}, "
        f"Python {report['machine']['python']} ({report['machine'].get('interpreter', '?')}), "
        f"meshproxy's data path {report['machine'].get('data_path', 'interpreted')}, "
        f"{report['machine']['nginx']}, fortio {report['machine']['fortio']}. "
        f"Two hops, 1 KB responses, 16 connections, {report['method']['duration_s']} s per run, "
        f"median of {report['method']['rounds']} interleaved rounds.",
        "",
        "| scenario | rate/s | p50 ms | p90 ms | p99 ms | added p50 | added p99 | CPU s/1000 req | RSS MB/proxy "
        "| errors | added p99 / nginx | CPU / nginx |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(v: Any, fmt: str = "{:.3f}") -> str:
        return "" if v is None else fmt.format(v)

    for e in report["summary"]:
        lines.append(
            f"| {e['scenario']} | {e['rate']} | {f(e['p50_ms'])} | {f(e['p90_ms'])} | {f(e['p99_ms'])} | "
            f"{f(e.get('added_p50_ms'))} | {f(e.get('added_p99_ms'))} | {f(e['cpu_s_per_1000'])} | "
            f"{f(e['rss_mb'], '{:.0f}')} | {e['errors']} | {f(e.get('added_p99_vs_nginx'), '{:.2f}x')} | "
            f"{f(e.get('cpu_vs_nginx'), '{:.2f}x')} |"
        )
    line = baselines(report["rows"])
    if line:
        lines += ["", line]
    reasons = noise(report["rows"])
    if reasons:
        lines += [
            "",
            f"**Noisy run**: {'; '.join(reasons)}. The ratios above are not reliable: run again on a "
            "quiet machine.",
        ]
    tel = [e for e in report["summary"] if e["scenario"].startswith("meshproxy")]
    if any(e.get("cpu_vs_telemetry_off") for e in tel):
        lines += [
            "",
            "Telemetry cost (CPU per request of one sidecar, i.e. half of both; issue 3: spans + metrics at "
            "100% sampling <= +25% over telemetry off, no span dropped):",
            "",
            "| scenario | rate/s | CPU us/request/sidecar | vs telemetry off | spans expected | spans received |",
            "|---|---|---|---|---|---|",
        ]
        for e in tel:
            over = e.get("cpu_vs_telemetry_off")
            lines.append(
                f"| {e['scenario']} | {e['rate']} | {f(e['cpu_s_per_1000'] and e['cpu_s_per_1000'] * 500, '{:.0f}')} | "
                f"{'' if over is None else f'{(over - 1) * 100:+.0f}%'} | {e.get('spans_expected', '')} | "
                f"{e.get('spans_received', '')} |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--ablation", action="store_true", help="add the telemetry ablation scenarios")
    parser.add_argument("--rates", default="1000")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--profile", type=Path, help="write py-spy collapsed stacks of each sidecar here")
    parser.add_argument(
        "--profile-native",
        action="store_true",
        help="with --profile: C frames too (the compiled data path, uvloop, system calls); pauses the sidecar per sample",
    )
    args = parser.parse_args()
    report = run(args)
    report["noise"] = noise(report["rows"])
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H%M%S")
    (args.out / f"{stamp}.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (args.out / f"{stamp}.md").write_text(table)
    (args.out / "latest.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
