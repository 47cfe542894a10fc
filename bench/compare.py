"""``make bench-peers``: meshproxy beside HAProxy, nginx and Traefik (and no proxy), in one run.

Owns: the peer benchmark's orchestration: the lab, the backends, starting and stopping each
scenario's two sidecars, the load runs, the sampling of CPU and RSS, and writing the results.
Config text comes from ``bench.peers``; all arithmetic and the report from ``bench.report``.

Topology (a ``meshproxy.lab`` lab: network namespaces on a bridge, 198.18.0.0/24)::

    pod "client":  fortio load / iperf3 -c ──▶ [client-side sidecar :15001] ──┐
    pod "server":  [server-side sidecar :15006] ──▶ fortio server :8080 (HTTP, 1 KB)  ◀──┘
                                                     fortio server :8079 (gRPC ping)
                                                     iperf3 -s    :5201 (opaque TCP)

Every scenario but ``direct`` gets the same interception, installed by
``meshproxy iptables install`` in both pods, exactly as the init container does.

Scenarios: direct, meshproxy (metrics + spans at 100%, exported over OTLP/HTTP to the span
sink ``bench.spancount`` in a third pod), meshproxy-notel, meshproxy-l4 (the floor: the same two
sidecars with every port declared opaque TCP and telemetry off, so they relay bytes and read no
HTTP; its opaque TCP test would repeat meshproxy-notel's and is not run),
haproxy (HTTP mode, ``http-reuse always``; TCP mode for opaque), nginx (proxy_pass/grpc_pass
with upstream keep-alive; stream module for opaque), traefik (file provider, entrypoints
15001/15006; built from its Go module by scripts/go-tool.sh).

Tests per scenario: ``http-<rate>`` fixed-rate latency (fortio, 16 connections, -uniform
-nocatchup), ``http-sat`` saturation (fortio -qps 0, 64 connections), ``grpc-<rate>`` gRPC unary ping over h2c,
``tcp-bulk`` iperf3 bulk throughput through the opaque relay. The proxies are pinned to CPU 1,
the load generator and the backends to CPU 0. Rounds are interleaved and the scenario order
rotates each round, so drift on a shared machine hits every scenario alike.

Measurements: CPU seconds of both proxies (utime+stime of the processes and their children from
/proc over the load window), RSS idle (after one warm-up request) and under load (peak of a
sampler thread polling /proc every 0.2 s during the load).

Network rule: all traffic stays inside the lab's namespaces; the lab is torn down on exit, also
on failure or Ctrl-C (``Lab`` is a context manager and registers an atexit hook).

Concurrency: one thread drives everything; a sampler thread per load run only reads /proc.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import peers, report
from bench.run import ROOT, cpu_seconds, fortio, fortio_load, host_facts, percentile, rss_mb, tool_version
from meshproxy.lab.netns import Lab, LabError, LabProcess, wait_until

PROXY_UID = 1357
OTLP_PORT = 4317  # the span sink's OTLP/gRPC port: it always listens there; the sidecars use OTLP/HTTP
PROXY_CPU = "1"
LOAD_CPU = "0"
CONNECTIONS = 16
# Saturation: enough requests in flight that the proxies, not the round trip of 16 connections, are
# the limit (with 16, nginx and HAProxy saturated at well under half their core).
SAT_CONNECTIONS = 64
L4 = "meshproxy-l4"
SCENARIOS = ("direct", "meshproxy", "meshproxy-notel", L4, "haproxy", "nginx", "traefik")
PEERS = ("haproxy", "nginx", "traefik")


def go_tool(name: str) -> tuple[str | None, str]:
    """Path of a pinned Go tool built by scripts/go-tool.sh, or None and the reason it failed."""
    done = subprocess.run([str(ROOT / "scripts" / "go-tool.sh"), name], capture_output=True, text=True)
    if done.returncode != 0:
        return None, (done.stderr.strip().splitlines() or ["build failed"])[-1]
    return done.stdout.strip(), ""


@dataclass
class Sidecars:
    """The running sidecars of one scenario (none for direct)."""

    scenario: str
    procs: list[LabProcess] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]


class RssSampler:
    """Peak RSS per process while a load runs; a daemon thread that only reads /proc."""

    def __init__(self, pids: list[int], interval: float = 0.2) -> None:
        self.pids = pids
        self.interval = interval
        self.peak = [0.0 for _ in pids]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for i, pid in enumerate(self.pids):
                self.peak[i] = max(self.peak[i], rss_mb(pid))
            self._stop.wait(self.interval)

    @contextlib.contextmanager
    def running(self) -> Iterator[RssSampler]:
        if self.pids:
            self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            if self._thread.is_alive():
                self._thread.join()


class Compare:
    """The lab and its long-lived processes (backends, OTLP span sink) for one benchmark run."""

    def __init__(self, lab: Lab, fortio_bin: str, traefik_bin: str | None, args: argparse.Namespace) -> None:
        self.lab = lab
        self.fortio = fortio_bin
        self.traefik = traefik_bin
        self.args = args
        self.client = lab.add_pod("client")
        self.server = lab.add_pod("server")
        self.telemetry_pod = lab.add_pod("telemetry")
        self.meshproxy = str(ROOT / ".venv" / "bin" / "meshproxy")
        self.workdir = lab.logdir
        self.spans_file = self.workdir / "spans.count"  # the sink's running span total
        on_load_cpu = ["taskset", "-c", LOAD_CPU]
        backend = lab.spawn(
            self.server,
            [
                *on_load_cpu,
                self.fortio,
                "server",
                "-http-port",
                str(peers.HTTP.port),
                "-grpc-port",
                str(peers.GRPC.port),
                "-redirect-port",
                "disabled",
                "-tcp-port",
                "disabled",
                "-udp-port",
                "disabled",
                "-quiet",
            ],
            name="backend",
        )
        lab.wait_listening(self.server, peers.HTTP.port, proc=backend)
        lab.wait_listening(self.server, peers.GRPC.port, proc=backend)
        iperf = lab.spawn(
            self.server, [*on_load_cpu, "iperf3", "-s", "-p", str(peers.TCP.port)], name="iperf3"
        )
        lab.wait_listening(self.server, peers.TCP.port, proc=iperf)
        receiver = lab.spawn(
            self.telemetry_pod,
            [
                # With the load generator, not on the proxies' core: the receiver's work is not
                # the sidecar's cost, and must not steal the core the sidecars are measured on.
                *on_load_cpu,
                # Counting, not the demo's spanlog: writing every span as JSON on this core
                # showed up as latency of the traced scenario (docs/performance.md).
                sys.executable,
                "-m",
                "bench.spancount",
                "--host",
                "0.0.0.0",
                "--port",
                str(OTLP_PORT),
                "--http-port",
                str(peers.OTLP_HTTP_PORT),
                "--out",
                str(self.spans_file),
            ],
            name="otlp",
            cwd=ROOT,
        )
        lab.wait_listening(self.telemetry_pod, OTLP_PORT, proc=receiver)
        lab.wait_listening(self.telemetry_pod, peers.OTLP_HTTP_PORT, proc=receiver)

    # --- sidecars ------------------------------------------------------------------------------

    def _iptables(self, action: str) -> None:
        for pod in (self.client, self.server):
            self.lab.exec(pod, [self.meshproxy, "iptables", action, "--proxy-uid", str(PROXY_UID)])

    def _dir(self, name: str) -> Path:
        d = self.workdir / name
        d.mkdir(exist_ok=True)
        shutil.chown(d, PROXY_UID, PROXY_UID)
        return d

    def _spawn_pair(self, scenario: str, argv_for: dict[str, list[str]]) -> Sidecars:
        sidecars = Sidecars(scenario)
        pinned = ["taskset", "-c", PROXY_CPU]
        for pod in (self.client, self.server):
            proc = self.lab.spawn(pod, [*pinned, *argv_for[pod.name]], name=scenario, uid=PROXY_UID)
            sidecars.procs.append(proc)
        for pod, proc in zip((self.client, self.server), sidecars.procs, strict=True):
            for port in (peers.OUTBOUND_PORT, peers.INBOUND_PORT):
                self.lab.wait_listening(pod, port, timeout=60, proc=proc)
        return sidecars

    def start(self, scenario: str, workload: peers.Workload) -> Sidecars:
        """Start both sidecars of ``scenario`` for ``workload``; interception goes on first."""
        if scenario == "direct":
            return Sidecars(scenario)
        self._iptables("install")
        try:
            return self._spawn_pair(scenario, self._argv(scenario, workload))
        except BaseException:
            self._iptables("cleanup")
            raise

    def _argv(self, scenario: str, workload: peers.Workload) -> dict[str, list[str]]:
        argv: dict[str, list[str]] = {}
        ip = self.server.ip
        for pod in (self.client, self.server):
            d = self._dir(f"{scenario}-{workload.kind.value}-{pod.name}")
            if scenario.startswith("meshproxy"):
                configs = peers.meshproxy_configs(
                    ip,
                    peers.meshproxy_telemetry(scenario == "meshproxy", self.telemetry_pod.ip),
                    opaque=scenario == L4,
                )
                conf = d / "sidecar.yaml"
                conf.write_text(configs[0] if pod is self.client else configs[1])
                argv[pod.name] = [self.meshproxy, "run", "--config", str(conf), "--log-level", "warning"]
            elif scenario == "haproxy":
                conf = d / "haproxy.cfg"
                conf.write_text(peers.haproxy_conf(workload, ip))
                argv[pod.name] = ["haproxy", "-db", "-f", str(conf)]
            elif scenario == "nginx":
                conf = d / "nginx.conf"
                conf.write_text(peers.nginx_conf(workload, ip, str(d)))
                argv[pod.name] = ["nginx", "-c", str(conf)]
            elif scenario == "traefik":
                if self.traefik is None:
                    raise LabError("traefik was not built")
                dynamic = d / "dynamic.yml"
                dynamic.write_text(peers.traefik_dynamic(workload, ip))
                static = d / "traefik.yml"
                static.write_text(peers.traefik_static(str(dynamic)))
                argv[pod.name] = [self.traefik, f"--configFile={static}"]
            else:
                raise ValueError(f"unknown scenario {scenario}")
            for f in d.iterdir():
                f.chmod(0o644)
        return argv

    def stop(self, sidecars: Sidecars) -> None:
        for proc in sidecars.procs:
            proc.stop()
        if sidecars.scenario != "direct":
            self._iptables("cleanup")

    # --- load ----------------------------------------------------------------------------------

    def warm(self, workload: peers.Workload) -> None:
        """One successful exchange through the scenario before anything is measured.

        A listening proxy is not yet a routing one: Traefik opens its entrypoints before its
        file provider's routers are loaded, and a connection accepted in that window stays for
        good with the entrypoint's first router, which has no routes and hands the bytes to
        its HTTP server: that waits for a request line iperf3 never sends and, after its 60 s
        read timeout, answers "HTTP/1.1 400", whose "H" iperf3 reports as "received an unknown
        control message" (measured). Hence a warm-up for every workload, each attempt bounded.
        """
        if workload.kind is peers.Kind.TCP:
            # A 64 KB iperf3 test: the real control protocol and a data connection, end to end.
            argv = [
                "iperf3", "-c", self.server.ip, "-p", str(workload.port), "-n", "64K",
                "--connect-timeout", "3000",
            ]  # fmt: skip
            wait_until(lambda: self._attempt(argv, 10), 30, "first iperf3 test")
            return
        if workload.kind is peers.Kind.GRPC:
            # grpcping exits non-zero when the call fails (``fortio load`` would exit 0).
            argv = [self.fortio, "grpcping", "-n", "1", f"{self.server.ip}:{workload.port}"]
        else:
            url = f"http://{self.server.ip}:{workload.port}/echo?size=1024"
            argv = [sys.executable, "-c", f"import urllib.request as u; u.urlopen({url!r}, timeout=5).read()"]
        wait_until(lambda: self._attempt(argv, 10), 30, f"first {workload.kind.value} exchange")

    def _attempt(self, argv: list[str], timeout: float) -> bool:
        """Run ``argv`` in the client pod once; True when it exits 0 within ``timeout`` s."""
        try:
            return self.lab.exec(self.client, argv, check=False, timeout=timeout).returncode == 0
        except subprocess.TimeoutExpired:  # the process is killed; the caller tries again
            return False

    def fortio_load(self, workload: peers.Workload, rate: int, duration: float, out: Path) -> dict[str, Any]:
        target = (
            f"{self.server.ip}:{workload.port}"
            if workload.kind is peers.Kind.GRPC
            else f"http://{self.server.ip}:{workload.port}/echo?size=1024"
        )
        grpc = ("-grpc", "-ping") if workload.kind is peers.Kind.GRPC else ()
        connections = CONNECTIONS if rate else SAT_CONNECTIONS
        return fortio_load(
            self.lab, self.client, self.fortio, target,
            rate=rate, connections=connections, duration=duration, out=out, extra=grpc,
        )  # fmt: skip

    def iperf(self, duration: float) -> dict[str, Any]:
        argv = [
            "taskset",
            "-c",
            LOAD_CPU,
            "iperf3",
            "-c",
            self.server.ip,
            "-p",
            str(peers.TCP.port),
            "-t",
            str(duration),
            "-J",
        ]
        done = self.lab.exec(self.client, argv, timeout=duration + 60)
        data: dict[str, Any] = json.loads(done.stdout)
        return data


def http_row(data: dict[str, Any], grpc: bool) -> dict[str, Any]:
    """Latency and counts from fortio's JSON result."""
    hist = data["DurationHistogram"]
    count = int(hist["Count"])
    ok = int(data["RetCodes"].get("SERVING" if grpc else "200", 0))
    return {
        "requests": count,
        "errors": count - ok,
        "actual_qps": float(data["ActualQPS"]),
        "p50_ms": percentile(hist, 50),
        "p90_ms": percentile(hist, 90),
        "p99_ms": percentile(hist, 99),
        "max_ms": float(hist["Max"]) * 1000,
    }


def tests_for(args: argparse.Namespace) -> dict[peers.Kind, list[str]]:
    tests: dict[peers.Kind, list[str]] = {k: [] for k in peers.Kind}
    tests[peers.Kind.HTTP] = [f"http-{r}" for r in args.rates.split(",") if r]
    if args.saturation:
        tests[peers.Kind.HTTP].append("http-sat")
    tests[peers.Kind.GRPC] = [f"grpc-{r}" for r in args.grpc_rates.split(",") if r]
    if args.tcp:
        tests[peers.Kind.TCP] = ["tcp-bulk"]
    return tests


def measure(
    cmp: Compare, sidecars: Sidecars, workload: peers.Workload, test: str, rnd: int, rss_idle: list[float]
) -> dict[str, Any]:
    args = cmp.args
    pids = sidecars.pids
    row: dict[str, Any] = {"round": rnd, "scenario": sidecars.scenario, "test": test, "rss_idle_mb": rss_idle}
    sampler = RssSampler(pids)
    cpu0 = cpu_seconds(pids)
    t0 = time.monotonic()
    with sampler.running():
        if workload.kind is peers.Kind.TCP:
            data = cmp.iperf(args.tcp_duration)
            if "error" in data:
                raise LabError(f"iperf3: {data['error']}")
            received = data["end"]["sum_received"]
            nbytes = int(received["bytes"])
            row.update({"bytes": nbytes, "gbit_s": float(received["bits_per_second"]) / 1e9})
        else:
            rate = 0 if test.endswith("-sat") else int(test.rsplit("-", 1)[1])
            duration = args.sat_duration if rate == 0 else args.duration
            out = cmp.workdir / f"{sidecars.scenario}-{test}-{rnd}.json"
            row.update(
                http_row(cmp.fortio_load(workload, rate, duration, out), workload.kind is peers.Kind.GRPC)
            )
    wall = time.monotonic() - t0
    cpu = cpu_seconds(pids) - cpu0
    row["rss_load_mb"] = [round(v, 1) for v in sampler.peak]
    if pids:
        row["proxy_cpu_util"] = cpu / wall
        if row.get("requests"):
            row["cpu_s_per_1000"] = cpu / row["requests"] * 1000
        if row.get("bytes"):
            row["cpu_s_per_gb"] = cpu / row["bytes"] * 1e9
    return row


def show(row: dict[str, Any]) -> None:
    if "gbit_s" in row:
        detail = f"{row['gbit_s']:.2f} Gbit/s cpu/GB {row.get('cpu_s_per_gb') or 0:.3f}s"
    else:
        detail = (
            f"{row['actual_qps']:7.0f}/s p50 {row['p50_ms']:.3f} p90 {row['p90_ms']:.3f} "
            f"p99 {row['p99_ms']:.3f} ms errors {row['errors']} cpu/1000 {row.get('cpu_s_per_1000') or 0:.3f}s"
        )
    print(
        f"round {row['round']} {row['scenario']:16} {row['test']:10} {detail} "
        f"rss idle {row['rss_idle_mb']} load {row['rss_load_mb']}",
        flush=True,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    scenarios = [s for s in args.scenarios.split(",") if s]
    skipped: dict[str, str] = {}
    traefik_bin: str | None = None
    if "traefik" in scenarios:
        traefik_bin, why = go_tool("traefik")
        if traefik_bin is None:
            skipped["traefik"] = f"build failed: {why}"
            scenarios.remove("traefik")
    tests = tests_for(args)
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    with Lab() as lab:
        cmp = Compare(lab, fortio(), traefik_bin, args)
        for rnd in range(args.rounds):
            order = scenarios[rnd % len(scenarios) :] + scenarios[: rnd % len(scenarios)]
            for scenario in order:
                for workload in peers.WORKLOADS:
                    if not tests[workload.kind] or (scenario == L4 and workload.kind is peers.Kind.TCP):
                        continue
                    try:
                        sidecars = cmp.start(scenario, workload)
                    except (LabError, TimeoutError) as exc:
                        skipped[f"{scenario}/{workload.kind.value}"] = str(exc).splitlines()[0][:200]
                        print(
                            f"round {rnd} {scenario}/{workload.kind.value}: could not start: {exc}",
                            flush=True,
                        )
                        continue
                    try:
                        cmp.warm(workload)
                        rss_idle = [round(rss_mb(p), 1) for p in sidecars.pids]
                        for test in tests[workload.kind]:
                            row = measure(cmp, sidecars, workload, test, rnd, rss_idle)
                            rows.append(row)
                            show(row)
                    except (LabError, TimeoutError, KeyError, ValueError) as exc:
                        skipped[f"{scenario}/{workload.kind.value}"] = str(exc).splitlines()[0][:200]
                        print(f"round {rnd} {scenario}/{workload.kind.value}: failed: {exc}", flush=True)
                    finally:
                        cmp.stop(sidecars)
    summary = report.summarize(rows)
    by_round = report.targets_by_round(rows)
    return {
        "machine": machine(cmp.fortio, traefik_bin),
        "method": method(args, time.monotonic() - started),
        "rows": rows,
        "summary": summary,
        "ratios": report.ratios(summary),
        "targets": [{**t, "by_round": by_round[t["target"]]} for t in report.check_targets(summary)],
        "target_misses": report.explain_misses(summary),
        "skipped": skipped,
    }


def machine(fortio_bin: str, traefik_bin: str | None) -> dict[str, Any]:
    from importlib.metadata import version as pkg

    version = tool_version
    # The build does not stamp a version into the binary ("dev"); go-tool.sh names it by its pin.
    traefik = Path(traefik_bin).name.removeprefix("traefik-") if traefik_bin else "not built"
    return {
        **host_facts(),
        "loadavg_at_end": Path("/proc/loadavg").read_text().split()[:3],
        "python": platform.python_version(),
        "meshproxy": pkg("meshproxy"),
        "haproxy": version(["haproxy", "-v"]).split(" - ")[0],
        "nginx": version(["nginx", "-v"]),
        "traefik": traefik,
        "fortio": version([fortio_bin, "version"]),
        "iperf3": version(["iperf3", "--version"]).split(" (")[0],
        "libraries": {
            p: pkg(p) for p in ("uvloop", "httptools", "h2", "opentelemetry-sdk", "prometheus-client")
        },
    }


def method(args: argparse.Namespace, elapsed: float) -> dict[str, Any]:
    return {
        "load_generator": "fortio (fixed rate: -uniform -nocatchup; saturation: -qps 0), keep-alive; iperf3 for TCP",
        "connections": CONNECTIONS,
        "sat_connections": SAT_CONNECTIONS,
        "duration_s": args.duration,
        "sat_duration_s": args.sat_duration,
        "tcp_duration_s": args.tcp_duration,
        "rounds": args.rounds,
        "response_bytes": 1024,
        "hops": 2,
        "proxy_cpu": PROXY_CPU,
        "load_cpu": LOAD_CPU,
        # Runs before this key was recorded exported over OTLP/gRPC to meshproxy.lab.spanlog.
        "span_export": f"OTLP/HTTP to bench.spancount :{peers.OTLP_HTTP_PORT}/v1/traces",
        "mode": "quick" if args.quick else "full",
        "elapsed_s": round(elapsed),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--rates", default="250,1000,2000", help="HTTP fixed rates, req/s")
    parser.add_argument("--grpc-rates", default="1000", help="gRPC unary fixed rates, req/s")
    parser.add_argument("--no-saturation", dest="saturation", action="store_false")
    parser.add_argument("--no-tcp", dest="tcp", action="store_false")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per fixed-rate run")
    parser.add_argument("--sat-duration", type=float, default=10.0)
    parser.add_argument("--tcp-duration", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="CI smoke: 1 round, 2 s runs")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration, args.sat_duration, args.tcp_duration = 1, 2.0, 2.0, 2.0
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H%M%S")
    base = args.out / f"peers-{stamp}"
    base.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    table = report.markdown(result)
    base.with_suffix(".md").write_text(table)
    (args.out / "peers-latest.md").write_text(table)
    if report.plot(result, base.with_suffix(".png")):
        shutil.copyfile(base.with_suffix(".png"), args.out / "peers-latest.png")
        print(f"plot: {base.with_suffix('.png')}")
    else:
        print("plot: skipped (pip install -e '.[bench]' for matplotlib)")
    print(table)
    print(f"results: {base.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
