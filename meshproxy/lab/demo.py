"""``meshproxy demo``: the whole mesh on one machine, in network namespaces, in a few seconds.

Owns: the demo's topology (one description, ``SERVICES`` and ``PODS``), the static sidecar
configs generated from it (``build_snapshots``, pure), and the orchestration: build a lab,
start the unmodified demo apps, intercept each pod's traffic, start a sidecar per pod as the
proxy UID, send load, print what happened, tear down.

    client ─▶ frontend ─▶ catalog ─▶ inventory  (HTTPRoute-like split: 90% v1, 10% v2)
    every pod: app + `meshproxy iptables install` + `meshproxy run --config <generated yaml>`
    telemetry pod: OTLP receiver (meshproxy.lab.spanlog) that every sidecar exports spans to,
                   over OTLP/HTTP on :4318 (the project's default transport), or over
                   OTLP/gRPC on :4317 with ``--otlp grpc``

Names resolve through each pod's /etc/hosts (``/etc/netns/<ns>/hosts``) to service VIPs in
198.19.0.0/24 that no interface owns: only the sidecars know where they lead.

Invariants: nothing outside the lab's namespaces is changed (see ``meshproxy.lab.netns``);
the lab is torn down on every exit path (normal end, error, Ctrl-C) unless ``--keep`` is
given, and then on Ctrl-C.

Concurrency: sequential orchestration; the pods' processes run concurrently and are
polled (``wait_listening``, ``wait_until``) with deadlines, never slept on blindly.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshproxy.config.model import (
    AccessLogMode,
    Endpoint,
    Inbound,
    InboundPort,
    Protocol,
    Route,
    Service,
    ServiceKey,
    Snapshot,
    Telemetry,
    Tracing,
    WeightedBackend,
    Workload,
)
from meshproxy.lab.mesh import ADMIN_PORT, PROXY_UID, admin_get, intercept, start_sidecar, wait_sidecar
from meshproxy.lab.netns import Lab, LabError, Pod, cleanup_stale, unavailable_reason, wait_until
from meshproxy.lab.otlp_receiver import GRPC, HTTP, TRACES_PATH
from meshproxy.lab.spanlog import read_spans, render_trace

NAMESPACE = "demo"
APP_PORT = 8080
APP_UID = 65534  # the apps run unprivileged, as "nobody"
OTLP_GRPC_PORT = 4317
OTLP_HTTP_PORT = 4318
TELEMETRY_POD = "telemetry"
CLIENT_POD = "client"


class SpanTransport(enum.StrEnum):
    """How the sidecars send spans to the telemetry pod (``--otlp``). The receiver there
    listens for both; only the sidecars' ``Tracing`` differs."""

    HTTP = "http"  # the default, as wherever the project picks one (chart, bench)
    GRPC = "grpc"

    @property
    def label(self) -> str:
        return HTTP if self is SpanTransport.HTTP else GRPC

    @property
    def port(self) -> int:
        return OTLP_HTTP_PORT if self is SpanTransport.HTTP else OTLP_GRPC_PORT

    def tracing(self, collector_ip: str) -> Tracing:
        if self is SpanTransport.HTTP:
            return Tracing(otlp_http_endpoint=f"http://{collector_ip}:{OTLP_HTTP_PORT}{TRACES_PATH}")
        return Tracing(otlp_grpc_endpoint=f"http://{collector_ip}:{OTLP_GRPC_PORT}")


@dataclass(frozen=True, slots=True)
class DemoService:
    name: str
    vip: str
    pods: tuple[str, ...]  # pods behind the service
    split: tuple[tuple[str, int], ...] = ()  # (backend service, weight): an HTTPRoute split


@dataclass(frozen=True, slots=True)
class DemoPod:
    name: str
    module: str  # the app to run, "" for none
    env: Mapping[str, str] = field(default_factory=dict)
    labels: tuple[tuple[str, str], ...] = ()


SERVICES = (
    DemoService("frontend", "198.19.0.10", ("frontend",)),
    DemoService("catalog", "198.19.0.11", ("catalog",)),
    DemoService(
        "inventory",
        "198.19.0.12",
        ("inventory-v1", "inventory-v2"),
        (("inventory-v1", 90), ("inventory-v2", 10)),
    ),
    DemoService("inventory-v1", "198.19.0.13", ("inventory-v1",)),
    DemoService("inventory-v2", "198.19.0.14", ("inventory-v2",)),
)

PODS = (
    DemoPod(
        "frontend", "meshdemo.frontend", {"CATALOG_URL": "http://catalog.demo:8080"}, (("app", "frontend"),)
    ),
    DemoPod(
        "catalog", "meshdemo.catalog", {"INVENTORY_URL": "http://inventory.demo:8080"}, (("app", "catalog"),)
    ),
    DemoPod(
        "inventory-v1", "meshdemo.inventory", {"VERSION": "v1"}, (("app", "inventory"), ("version", "v1"))
    ),
    DemoPod(
        "inventory-v2", "meshdemo.inventory", {"VERSION": "v2"}, (("app", "inventory"), ("version", "v2"))
    ),
    DemoPod(CLIENT_POD, "", {}, (("app", "client"),)),  # runs the load generator on demand
)


def hostnames(service: str) -> tuple[str, ...]:
    return (
        f"{service}.{NAMESPACE}",
        f"{service}.{NAMESPACE}.svc",
        f"{service}.{NAMESPACE}.svc.cluster.local",
    )


def hosts_file(services: tuple[DemoService, ...] = SERVICES) -> dict[str, list[str]]:
    return {s.vip: list(hostnames(s.name)) for s in services}


def _key(name: str) -> ServiceKey:
    return ServiceKey(f"{name}.{NAMESPACE}:{APP_PORT}")


def build_snapshots(pod_ips: Mapping[str, str], tracing: Tracing | str) -> dict[str, Snapshot]:
    """One static config per pod, all from ``SERVICES``/``PODS``. Pure: no I/O.

    ``tracing``: the sidecars' span export (``SpanTransport.tracing``), or a bare OTLP/gRPC
    endpoint (what callers passed before the demo moved to OTLP/HTTP).
    """
    if isinstance(tracing, str):
        tracing = Tracing(otlp_grpc_endpoint=tracing)
    services = tuple(
        Service(
            name=s.name,
            namespace=NAMESPACE,
            port=APP_PORT,
            protocol=Protocol.HTTP1,
            vips=(s.vip,),
            hostnames=hostnames(s.name),
            endpoints=tuple(Endpoint(pod_ips[p], APP_PORT, pod=f"{p}-0", workload=p) for p in s.pods),
            routes=(Route("split", backends=tuple(WeightedBackend(_key(b), w) for b, w in s.split)),)
            if s.split
            else (),
        )
        for s in SERVICES
    )
    serving = {p: s.name for s in SERVICES for p in s.pods if not s.split}
    snapshots = {}
    for pod in PODS:
        inbound = (InboundPort(APP_PORT, Protocol.HTTP1, service=serving[pod.name]),) if pod.module else ()
        snapshots[pod.name] = Snapshot(
            workload=Workload(name=pod.name, namespace=NAMESPACE, pod=f"{pod.name}-0", labels=pod.labels),
            services=services,
            inbound=Inbound(ports=inbound),
            telemetry=Telemetry(tracing=tracing, access_log=AccessLogMode.ON),
        ).with_version()
    return snapshots


# --- orchestration ------------------------------------------------------------------------


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


@dataclass
class Demo:
    lab: Lab
    pods: dict[str, Pod] = field(default_factory=dict)
    transport: SpanTransport = SpanTransport.HTTP

    def say(self, text: str) -> None:
        print(text, flush=True)

    def start(self) -> None:
        lab = self.lab
        self.say(f"lab {lab.prefix}*  (logs in {lab.logdir})")
        telemetry = lab.add_pod(TELEMETRY_POD)
        ports = ("--port", str(OTLP_GRPC_PORT), "--http-port", str(OTLP_HTTP_PORT))
        spans = lab.spawn(
            telemetry,
            _python("-m", "meshproxy.lab.spanlog", *ports, "--out", str(self.spans_file)),
            name="otlp",
        )
        for spec in PODS:
            self.pods[spec.name] = lab.add_pod(spec.name, hosts=hosts_file())
        for port in (OTLP_GRPC_PORT, OTLP_HTTP_PORT):
            lab.wait_listening(telemetry, port, proc=spans)
        label, port = self.transport.label, self.transport.port
        self.say(
            f"  {TELEMETRY_POD:<14}{telemetry.ip:<13}OTLP receiver, sidecars export over {label} to :{port}"
        )

        ips = {name: pod.ip for name, pod in self.pods.items()}
        snapshots = build_snapshots(ips, self.transport.tracing(telemetry.ip))
        # Start everything first and wait afterwards: the processes boot in parallel.
        started = []
        for spec in PODS:
            pod = self.pods[spec.name]
            app = (
                lab.spawn(pod, _python("-m", spec.module), name="app", uid=APP_UID, env=spec.env)
                if spec.module
                else None
            )
            intercept(lab, pod)
            started.append((spec, pod, app, start_sidecar(lab, pod, snapshots[spec.name], wait=False)))
        for spec, pod, app, sidecar in started:
            if app is not None:
                lab.wait_listening(pod, APP_PORT, timeout=20, proc=app)
            wait_sidecar(lab, sidecar)
            app_name = spec.module or "(load generator)"
            self.say(f"  {spec.name:<14}{pod.ip:<13}{app_name:<20} + sidecar (uid {PROXY_UID})")

    @property
    def spans_file(self) -> Path:
        return self.lab.logdir / "spans.jsonl"

    def load(self, requests: int, concurrency: int = 4) -> dict[str, Any]:
        argv = _python("-m", "meshdemo.load", f"http://frontend.{NAMESPACE}:{APP_PORT}/", "-n", str(requests))
        done = self.lab.exec(
            self.pods[CLIENT_POD], [*argv, "-c", str(concurrency)], uid=APP_UID, check=False, timeout=300
        )
        try:
            result: dict[str, Any] = json.loads(done.stdout)
        except ValueError:
            raise LabError(
                f"load generator failed ({done.returncode}): {done.stderr.strip()[-2000:]}"
            ) from None
        return result

    def warm_up(self, timeout: float = 20.0) -> None:
        """Wait until one request makes it end to end (the sidecars may still be starting)."""
        wait_until(
            lambda: self.load(1, 1)["status"] == {"200": 1}, timeout, "the first request to succeed", 0.2
        )


def summarize(result: Mapping[str, Any]) -> str:
    total = result["requests"]
    ok = sum(result["versions"].values()) or 1
    lines = [
        f"requests   {total} in {result['seconds']:.2f}s from the client pod to http://frontend.{NAMESPACE}:{APP_PORT}/",
        "status     " + ", ".join(f"{code}: {n}" for code, n in sorted(result["status"].items())),
        "inventory  "
        + ", ".join(f"{v}: {n} ({100 * n / ok:.0f}%)" for v, n in sorted(result["versions"].items()))
        + "   (route: 90% v1 / 10% v2)",
    ]
    lines += [f"error      {e}" for e in result["errors"]]
    return "\n".join(lines)


def show_trace(demo: Demo, trace_id: str, expected_spans: int, timeout: float) -> None:
    def complete() -> bool:
        return len(read_spans(demo.spans_file, trace_id)) >= expected_spans

    with contextlib.suppress(TimeoutError):  # show whatever arrived
        wait_until(complete, timeout, f"{expected_spans} spans of trace {trace_id}", 0.2)
    spans = read_spans(demo.spans_file, trace_id)
    # Where the receiver says the spans came from, not what the sidecars were told.
    over = ", ".join(sorted({s.transport for s in spans}))
    demo.say(
        f"\none request's hops (trace {trace_id}, {len(spans)} spans{', over ' + over if over else ''}):"
    )
    demo.say(render_trace(spans) if spans else "  no spans arrived (see the sidecar logs)")


def unreadable_by(*uids: int) -> str | None:
    """Why the sidecar/apps could not start as ``uids`` (e.g. a checkout under /root, mode 700)."""
    check = "import meshproxy.io.app, meshdemo.frontend"
    for uid in uids:
        argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", sys.executable, "-c", check]
        done = subprocess.run(argv, capture_output=True, text=True, check=False, cwd="/")
        if done.returncode != 0:
            where = Path(sys.executable).parent.parent
            last = done.stderr.strip().splitlines()[-1:] or ["?"]
            return (
                f"UID {uid} cannot run {sys.executable} ({last[0]}). The sidecars and apps run as "
                f"unprivileged users, so {where} and every directory above it must be world-readable "
                "(a checkout under /root is not): move the checkout, e.g. to /opt, or `chmod o+rx` the path."
            )
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--requests", type=int, default=200, help="requests to send (default 200)")
    parser.add_argument("--keep", action="store_true", help="leave the mesh running until Ctrl-C")
    parser.add_argument(
        "--trace-timeout", type=float, default=15.0, help="seconds to wait for a trace's spans"
    )
    parser.add_argument(
        "--otlp",
        type=SpanTransport,
        choices=list(SpanTransport),
        default=SpanTransport.HTTP,
        help="how the sidecars export spans: http (OTLP/HTTP to :4318, the default) or grpc (OTLP/gRPC to :4317)",
    )


def main(args: argparse.Namespace) -> int:
    reason = unavailable_reason()
    if reason is not None:
        print(f"meshproxy demo {reason}: run it as root, e.g. `sudo make demo`.", file=sys.stderr)
        return 1
    if shutil.which("iptables-restore") is None:
        print(
            "meshproxy demo needs iptables: run `make system-deps` (or apt-get install iptables).",
            file=sys.stderr,
        )
        return 1
    stale = cleanup_stale()
    if stale:
        print(f"removed {len(stale)} namespaces left by an earlier run")
    problem = unreadable_by(PROXY_UID, APP_UID)
    if problem is not None:
        print(f"meshproxy demo: {problem}", file=sys.stderr)
        return 1
    # SIGTERM tears down like Ctrl-C; SIGINT explicitly too, since a shell starts background
    # jobs with SIGINT ignored and Python then never raises KeyboardInterrupt.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    lab = Lab()
    demo = Demo(lab, transport=SpanTransport(args.otlp))
    ok = False
    try:
        demo.start()
        demo.warm_up()
        result = demo.load(args.requests)
        print("\n" + summarize(result))
        if result["trace_ids"]:
            show_trace(demo, result["trace_ids"][-1], expected_spans=6, timeout=args.trace_timeout)
        metrics = [
            line
            for line in admin_get(lab, demo.pods["catalog"], "/metrics").splitlines()
            if "requests_total{" in line and not line.startswith("#")
        ]
        catalog = demo.pods["catalog"].netns
        print(
            f"\nmetrics of the catalog sidecar (ip netns exec {catalog} curl -s localhost:{ADMIN_PORT}/metrics):"
        )
        print("\n".join(f"  {m}" for m in metrics[:8]) or "  (none yet)")
        ok = result["status"].get("200") == result["requests"]
        if args.keep:
            print(
                f"\nthe mesh keeps running; try:\n  ip netns exec {lab.prefix}{CLIENT_POD} curl -s http://frontend.demo:8080/"
            )
            print(
                f"  ip netns exec {catalog} curl -s localhost:{ADMIN_PORT}/config_dump\nCtrl-C to tear down."
            )
            while True:
                signal.pause()
    except KeyboardInterrupt:
        print("\ninterrupted")
    except (LabError, TimeoutError) as exc:
        print(f"\nmeshproxy demo failed: {exc}", file=sys.stderr)
        for proc in lab.processes:
            print(
                f"--- {proc.log} (last lines)\n{''.join(proc.output().splitlines(True)[-15:])}",
                file=sys.stderr,
            )
    finally:
        logs = lab.logdir
        if not ok:
            keep = Path(os.environ.get("TMPDIR", "/tmp")) / f"meshproxy-demo-logs-{int(time.time())}"
            shutil.copytree(logs, keep, dirs_exist_ok=True)
            print(f"logs kept in {keep}", file=sys.stderr)
        lab.close()
        print("lab torn down")
    return 0 if ok else 1
