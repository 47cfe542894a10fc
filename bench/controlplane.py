"""``make bench-controlplane``: how fast an EndpointSlice change reaches every proxy.

Owns: the control plane convergence benchmark: a real API server (etcd +
kube-apiserver from ``tests/support/apiserver.py``), the real control plane
(``controlplane run --kubeconfig``, a child process), a synthetic mesh (Services,
EndpointSlices, one Pod per simulated proxy), the simulated proxies, the
measurement loop and the report (``bench/results/controlplane-<date>.json`` + ``.md``).

Method, one change at a time:

  1. Patch one endpoint address of one EndpointSlice to a fresh address (the
     change's *marker*), timestamp ``t0`` taken just before the API call.
  2. Reference: a plain ``kubernetes`` client watch on EndpointSlices in this
     process (JSON only, no model objects) records when it sees the marker.
  3. Convergence: every simulated proxy ACKs a version it did not have before
     ``t0``; the *witness* proxy decodes each snapshot in full and only counts a
     version that really holds the marker. The change has converged when the last
     proxy's ACK was written.
  4. Wait until the control plane is quiet (no response for ``--settle``
     seconds), then the next change. Responses between two changes are that
     change's pushes; their serialized ``DiscoveryResponse`` size is bytes/push.

Simulated proxies: one grpc.aio channel (one TCP connection) and one stream each,
a distinct pod identity backed by a Pod object, sending the node a sidecar sends
and ACKing every response with its version and nonce. Unlike a sidecar they do not
convert the snapshot to the config model (that is the proxy's cost, and 1000 of
them in one process would measure this process, not the control plane): they read
the version and nonce from the head of the encoded response. The witness decodes.

CPU and RSS of the control plane come from ``/proc/<pid>`` (utime+stime over the
measured window; VmRSS at the end and VmHWM, the peak). Everything listens on
127.0.0.1; endpoint addresses are drawn from 198.18.0.0/16, service VIPs from
the fixture's 198.19.0.0/16, so nothing can reach a real network.

Concurrency: the proxies and the measurement loop share one asyncio loop; API
writes run in worker threads (the ``kubernetes`` client is synchronous); the
reference watch is one thread, handing its observations over under a lock.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import ipaddress
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import kubernetes

from meshapi.discovery.v1 import discovery_pb2 as pb
from meshproxy.xds import convert
from meshproxy.xds.client import channel_options
from tests.support.apiserver import ApiServer, locate_binaries, running_apiserver

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
NAMESPACE = "bench"
SERVICE_ACCOUNT = "bench"
STREAM_METHOD = "/meshapi.discovery.v1.ConfigDiscovery/StreamConfig"
ENDPOINT_NET = ipaddress.ip_network("198.18.0.0/16")  # endpoints and markers
POD_NET = ipaddress.ip_network("198.18.224.0/19")  # simulated proxies' pod IPs
MAX_SLICE = 100  # endpoints per EndpointSlice: what the endpointslice controller does


@dataclass(frozen=True, slots=True)
class Params:
    proxies: int
    services: int
    endpoints: int
    workloads: int
    changes: int
    warmup: int
    settle: float  # seconds without a response before the next change
    timeout: float  # per change

    def __post_init__(self) -> None:
        if self.endpoints < self.services:
            raise ValueError("need at least one endpoint per service")
        if self.endpoints + self.warmup + self.changes >= 224 * 256:
            raise ValueError("too many endpoints + changes for 198.18.0.0/16 below the pod range")
        if self.proxies > POD_NET.num_addresses - 2:
            raise ValueError(f"at most {POD_NET.num_addresses - 2} proxies")


QUICK = Params(
    proxies=50, services=20, endpoints=500, workloads=10, changes=15, warmup=2, settle=0.5, timeout=60
)
FULL = Params(
    proxies=1000, services=100, endpoints=10_000, workloads=50, changes=30, warmup=3, settle=1.0, timeout=180
)


# ---------------------------------------------------------------- wire helpers


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def response_head(raw: bytes) -> tuple[str, str, str]:
    """``(version_info, nonce, payload)`` of an encoded ``DiscoveryResponse``, without decoding the payload.

    ``payload`` is ``"snapshot"``, ``"endpoints"`` (an incremental update) or ``""``.

    Walks the top-level fields and skips the payload by its length, so the cost does not
    grow with the snapshot (field order on the wire is not assumed).
    """
    version = nonce = payload = ""
    pos = 0
    while pos < len(raw):
        key, pos = _varint(raw, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 2:
            length, pos = _varint(raw, pos)
            if pos + length > len(raw):
                raise ValueError("truncated field")
            if number == 1:
                version = raw[pos : pos + length].decode()
            elif number == 2:
                nonce = raw[pos : pos + length].decode()
            elif number in _PAYLOADS:
                payload = _PAYLOADS[number]
            pos += length
        elif wire_type == 0:
            _, pos = _varint(raw, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
    return version, nonce, payload


_PAYLOADS = {
    pb.DiscoveryResponse.DESCRIPTOR.fields_by_name[name].number: name for name in ("snapshot", "endpoints")
}


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(values: Sequence[float]) -> dict[str, float]:
    return {
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values) if values else float("nan"),
        "mean": sum(values) / len(values) if values else float("nan"),
    }


def endpoint_ip(i: int) -> str:
    return str(ENDPOINT_NET[i + 1])


# ---------------------------------------------------------------- the synthetic mesh


def service_name(i: int) -> str:
    return f"svc-{i:04d}"


def workload_name(i: int) -> str:
    return f"wl-{i:03d}"


def slices_of(params: Params) -> list[tuple[int, str, list[int]]]:
    """``(service index, slice name, endpoint indexes)``: endpoints spread evenly over services."""
    out = []
    base, extra = divmod(params.endpoints, params.services)
    nxt = 0
    for s in range(params.services):
        count = base + (1 if s < extra else 0)
        ids = list(range(nxt, nxt + count))
        nxt += count
        for k in range(0, count, MAX_SLICE):
            out.append((s, f"{service_name(s)}-{k // MAX_SLICE}", ids[k : k + MAX_SLICE]))
    return out


def slice_body(service: int, name: str, ids: Sequence[int]) -> dict[str, Any]:
    svc = service_name(service)
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": [endpoint_ip(i)],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "targetRef": {"kind": "Pod", "namespace": NAMESPACE, "name": f"{svc}-{i}"},
                "zone": "zone-a",
            }
            for i in ids
        ],
    }


TEMPLATE_HASH = "5d8f7c6b9"  # a pod-template-hash, as a Deployment's ReplicaSet sets it


def pod_meta(p: int, params: Params) -> dict[str, Any]:
    """Proxy ``p``'s Pod metadata: a replica of Deployment ``wl-<p mod workloads>``.

    The owner reference makes the control plane see the Deployment as the workload, so
    replicas share one snapshot as in a real cluster (there is no controller-manager
    here: the ReplicaSet itself need not exist).
    """
    wl = workload_name(p % params.workloads)
    return {
        "name": f"proxy-{p:04d}",
        "namespace": NAMESPACE,
        "labels": {"app": wl, "pod-template-hash": TEMPLATE_HASH},
        "ownerReferences": [
            {
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": f"{wl}-{TEMPLATE_HASH}",
                "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"bench/{wl}")),
                "controller": True,
            }
        ],
    }


def create_mesh(api: kubernetes.client.ApiClient, params: Params) -> list[tuple[int, str, list[int]]]:
    """Namespace, service account, Services, EndpointSlices and one Pod per proxy."""
    # Any: the client's models are typed, its dict bodies (what we pass) are not.
    core: Any = kubernetes.client.CoreV1Api(api)
    disc: Any = kubernetes.client.DiscoveryV1Api(api)
    core.create_namespace({"metadata": {"name": NAMESPACE}})
    # No controller-manager runs: the service account admission plugin needs the account to exist.
    core.create_namespaced_service_account(NAMESPACE, {"metadata": {"name": SERVICE_ACCOUNT}})
    slices = slices_of(params)
    jobs: list[tuple[Any, dict[str, Any]]] = []
    for s in range(params.services):
        jobs.append(
            (
                core.create_namespaced_service,
                {
                    "metadata": {"name": service_name(s), "namespace": NAMESPACE},
                    "spec": {
                        "selector": {"app": workload_name(s % params.workloads)},
                        "ports": [{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}],
                    },
                },
            )
        )
    jobs += [(disc.create_namespaced_endpoint_slice, slice_body(s, n, ids)) for s, n, ids in slices]
    for p in range(params.proxies):
        jobs.append(
            (
                core.create_namespaced_pod,
                {
                    "metadata": pod_meta(p, params),
                    "spec": {
                        "serviceAccountName": SERVICE_ACCOUNT,
                        "automountServiceAccountToken": False,
                        "containers": [
                            {
                                "name": "app",
                                "image": "bench.invalid/app:1",
                                "ports": [{"name": "http", "containerPort": 8080}],
                            }
                        ],
                    },
                },
            )
        )
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for fut in [pool.submit(fn, NAMESPACE, body) for fn, body in jobs]:
            fut.result()
    return slices


# ---------------------------------------------------------------- the reference watch


class ReferenceWatch:
    """A plain client watch on EndpointSlices: when each marker address was first seen."""

    def __init__(self, api: kubernetes.client.ApiClient, resource_version: str) -> None:
        self._api: Any = kubernetes.client.DiscoveryV1Api(api)
        self._rv = resource_version
        self._lock = threading.Lock()
        self._seen: dict[str, float] = {}
        self._wanted: set[str] = set()
        self._stop = threading.Event()
        self._watch: Any = kubernetes.watch.Watch()  # type: ignore[no-untyped-call]
        self._thread = threading.Thread(target=self._run, name="reference-watch", daemon=True)
        self.errors = 0

    def start(self) -> None:
        self._thread.start()

    def expect(self, marker: str) -> None:
        with self._lock:
            self._wanted.add(marker)

    def seen(self, marker: str) -> float | None:
        with self._lock:
            return self._seen.get(marker)

    def stop(self) -> None:
        self._stop.set()
        self._watch.stop()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for event in self._watch.stream(
                    self._api.list_namespaced_endpoint_slice,
                    NAMESPACE,
                    resource_version=self._rv,
                    timeout_seconds=20,
                    deserialize=False,
                ):
                    now = time.monotonic()
                    obj = event["object"]
                    self._rv = obj.get("metadata", {}).get("resourceVersion", self._rv)
                    addresses = {a for ep in obj.get("endpoints") or () for a in ep.get("addresses", ())}
                    with self._lock:
                        for marker in list(self._wanted):
                            if marker in addresses:
                                self._seen[marker] = now
                                self._wanted.discard(marker)
                    if self._stop.is_set():
                        return
            except Exception:
                if self._stop.is_set():
                    return
                self.errors += 1
                self._stop.wait(0.2)  # back off before re-watching from the last resourceVersion


# ---------------------------------------------------------------- simulated proxies


def _identity(raw: bytes) -> bytes:
    return raw


class Coordinator:
    """Which proxies still have to ACK the current change; wakes the measurement loop."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.baseline: list[str] = [""] * count
        self.waiting: set[int] = set()
        self.marker = ""
        self.converged_at = 0.0  # when the last waiting proxy ACKed
        self.done = asyncio.Event()
        self.last_response = time.monotonic()
        self.responses: list[tuple[float, int, str]] = []  # (received at, bytes, payload) since a reset

    def start(self, baseline: list[str], marker: str) -> None:
        self.baseline = baseline
        self.marker = marker
        self.waiting = set(range(self.count))
        self.done.clear()

    def on_response(self, now: float, size: int, payload: str) -> None:
        self.last_response = now
        self.responses.append((now, size, payload))

    def on_ack(self, proxy: SimProxy) -> None:
        if proxy.index not in self.waiting:
            return
        if proxy.acked_version == self.baseline[proxy.index]:
            return
        if proxy.witness and self.marker not in proxy.acked_addresses:
            return  # a version that does not carry this change yet
        self.waiting.discard(proxy.index)
        if not self.waiting:
            self.converged_at = proxy.acked_at
            self.done.set()


@dataclass(eq=False)
class SimProxy:
    index: int
    node: convert.ProxyNode
    target: str
    coordinator: Coordinator
    witness: bool = False
    acked_version: str = ""
    acked_at: float = 0.0
    acked_addresses: frozenset[str] = frozenset()
    responses: int = 0
    streams: int = 0
    errors: list[str] = field(default_factory=list)
    by_service: dict[str, frozenset[str]] = field(default_factory=dict)  # the witness's view

    async def run(self) -> None:
        while True:
            self.streams += 1
            try:
                await self._stream()
                self.errors.append("stream ended by the control plane")
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                self.errors.append(f"{exc.code().name}: {exc.details()}")
            await asyncio.sleep(0.2)  # reconnect backoff, not synchronisation

    def _witness(self, msg: Any) -> frozenset[str]:
        """Every endpoint address the proxy would now hold (full snapshots and updates)."""
        if msg.WhichOneof("payload") == "snapshot":
            self.by_service = {
                f"{s.name}.{s.namespace}:{s.port}": frozenset(e.address for e in s.endpoints)
                for s in msg.snapshot.services
            }
        else:
            for entry in msg.endpoints.services:
                self.by_service[entry.service_key] = frozenset(e.address for e in entry.endpoints)
        return frozenset().union(*self.by_service.values())

    async def _stream(self) -> None:
        async with grpc.aio.insecure_channel(self.target, options=channel_options()) as channel:
            method = channel.stream_stream(
                STREAM_METHOD,
                request_serializer=pb.DiscoveryRequest.SerializeToString,
                response_deserializer=_identity,
            )
            call = method()  # type: ignore[call-arg]  # the stubs miss the no-iterator form
            try:
                await call.write(convert.first_request(self.node, self.acked_version))
                while True:
                    raw: Any = await call.read()
                    if raw is grpc.aio.EOF:  # type: ignore[attr-defined]
                        return
                    now = time.monotonic()
                    self.responses += 1
                    version, nonce, payload = response_head(raw)
                    self.coordinator.on_response(now, len(raw), payload)
                    addresses = self.acked_addresses
                    if self.witness:
                        addresses = self._witness(pb.DiscoveryResponse.FromString(raw))
                    await call.write(convert.ack(version, nonce))
                    self.acked_version, self.acked_at, self.acked_addresses = (
                        version,
                        time.monotonic(),
                        addresses,
                    )
                    self.coordinator.on_ack(self)
            finally:
                call.cancel()


# ---------------------------------------------------------------- the control plane process


class ControlPlaneProcess:
    """``controlplane run --kubeconfig`` as a child; its ports and /proc figures."""

    def __init__(
        self,
        kubeconfig: Path,
        log_path: Path,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                str(REPO / ".venv" / "bin" / "controlplane"),
                "run",
                f"--kubeconfig={kubeconfig}",
                "--listen-address=127.0.0.1",
                "--grpc-port=0",
                "--metrics-port=0",
                "--no-webhook",
                "--no-status",
                "--log-level=warning",
                *extra_args,
            ],
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        m = re.search(r"grpc=(\S+) metrics=(\S+)", line)
        if m is None:
            self.stop()
            raise RuntimeError(f"control plane did not start (see {log_path}): {line!r}")
        self.grpc, self.metrics = m.group(1), m.group(2)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.metrics}/ready", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def metric(self, name: str) -> float:
        """Sum of every sample of ``name`` (no labels used here)."""
        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=10) as r:
            text = r.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    # The control plane's own histograms: where its part of convergence goes.
    STAGES = (
        "meshcp_convergence_latency_seconds",  # first event of a burst -> snapshots published
        "meshcp_compile_duration_seconds",  # compile_mesh
        "meshcp_push_latency_seconds",  # response sent -> its ACK
    )

    def stage_sums(self) -> dict[str, tuple[float, float]]:
        """``(sum, count)`` of each stage histogram."""
        return {n: (self.metric(f"{n}_sum"), self.metric(f"{n}_count")) for n in self.STAGES}

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def memory(self) -> dict[str, float]:
        out = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024  # kB -> MiB
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# ---------------------------------------------------------------- the run


async def wait_until(condition: Any, within: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {within:g}s waiting for {what}")
        await asyncio.sleep(interval)  # polling a condition with a deadline


@dataclass(frozen=True, slots=True)
class ChangeSample:
    convergence: float  # t0 -> last proxy's ACK
    reference: float  # t0 -> the plain watch saw it
    api_write: float  # t0 -> the PATCH returned
    pushes: int  # responses to all proxies caused by this change
    endpoint_updates: int  # how many of them were incremental (EndpointUpdate)
    bytes_per_push: float
    cpu_seconds: float  # control plane utime+stime from t0 to quiet
    bench_cpu_seconds: float  # this process (the simulated proxies), same interval


class Profiler:
    """``py-spy record -f raw`` on the control plane over the measured changes (``--profile``)."""

    def __init__(self, pid: int, out: Path | None) -> None:
        self._pid = pid
        self._out = out
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self._out is None or self._proc is not None:
            return
        self._out.parent.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            [
                str(REPO / ".venv" / "bin" / "py-spy"),
                *("record", "-f", "raw", "-r", "200", "-p", str(self._pid), "-o", str(self._out)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        try:
            self._proc.wait(30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None


async def measure(
    server: ApiServer,
    plane: ControlPlaneProcess,
    params: Params,
    slices: list[tuple[int, str, list[int]]],
    profile: Path | None = None,
) -> dict[str, Any]:
    api = server.api_client()
    disc: Any = kubernetes.client.DiscoveryV1Api(api)
    rv = disc.list_namespaced_endpoint_slice(NAMESPACE, limit=1).metadata.resource_version
    reference = ReferenceWatch(api, rv)
    reference.start()

    coord = Coordinator(params.proxies)
    proxies = [
        SimProxy(
            index=p,
            node=convert.ProxyNode(
                pod=f"proxy-{p:04d}",
                namespace=NAMESPACE,
                service_account=SERVICE_ACCOUNT,
                labels=(("app", workload_name(p % params.workloads)),),
                proxy_version="bench",
                pod_ip=str(POD_NET[p + 1]),
                workload=workload_name(p % params.workloads),
            ),
            target=plane.grpc,
            coordinator=coord,
            witness=p == 0,
        )
        for p in range(params.proxies)
    ]
    cpu_before_connect = plane.cpu_seconds()
    connect_start = time.monotonic()
    tasks = [asyncio.create_task(px.run(), name=f"sim-proxy-{px.index}") for px in proxies]
    profiler = Profiler(plane.proc.pid, profile)
    try:
        await wait_until(
            lambda: all(px.acked_version for px in proxies), params.timeout, "every proxy's first ACK"
        )
        initial_sync = time.monotonic() - connect_start
        initial_bytes = sum(size for _, size, _ in coord.responses) / max(1, len(coord.responses))
        cpu_connect = plane.cpu_seconds() - cpu_before_connect
        mem_connected = plane.memory()
        await wait_until(
            lambda: time.monotonic() - coord.last_response > params.settle, params.timeout, "a quiet stream"
        )

        samples: list[ChangeSample] = []
        pushes_before = plane.metric("meshcp_pushes_total")
        stages_before = plane.stage_sums()
        cpu_start = plane.cpu_seconds()
        window_start = time.monotonic()
        if params.warmup == 0:
            profiler.start()
        for k in range(params.warmup + params.changes):
            _, name, ids = slices[k % len(slices)]
            position = k % len(ids)
            marker = endpoint_ip(params.endpoints + k)
            coord.start([px.acked_version for px in proxies], marker)
            coord.responses = []
            reference.expect(marker)
            patch = [{"op": "replace", "path": f"/endpoints/{position}/addresses/0", "value": marker}]
            cpu0, own0 = plane.cpu_seconds(), time.process_time()
            t0 = time.monotonic()
            await asyncio.to_thread(disc.patch_namespaced_endpoint_slice, name, NAMESPACE, patch)
            t_written = time.monotonic()
            try:
                async with asyncio.timeout(params.timeout):
                    await coord.done.wait()
            except TimeoutError:
                raise TimeoutError(
                    f"change {k}: {len(coord.waiting)} proxies did not ACK within {params.timeout:g}s"
                ) from None
            converged = coord.converged_at - t0
            await wait_until(
                lambda m=marker: reference.seen(m) is not None, params.timeout, "the reference watch"
            )
            ref = (reference.seen(marker) or 0.0) - t0
            await wait_until(
                lambda: time.monotonic() - coord.last_response > params.settle,
                params.timeout,
                "a quiet stream",
            )
            pushes = [size for at, size, _ in coord.responses if at >= t0]
            updates = sum(1 for at, _, kind in coord.responses if at >= t0 and kind == "endpoints")
            sample = ChangeSample(
                convergence=converged,
                reference=ref,
                api_write=t_written - t0,
                pushes=len(pushes),
                endpoint_updates=updates,
                bytes_per_push=sum(pushes) / len(pushes) if pushes else 0.0,
                cpu_seconds=plane.cpu_seconds() - cpu0,
                bench_cpu_seconds=time.process_time() - own0,
            )
            tag = "warmup" if k < params.warmup else f"{k - params.warmup + 1}/{params.changes}"
            print(
                f"change {tag}: convergence {sample.convergence * 1000:.0f} ms, reference "
                f"{sample.reference * 1000:.0f} ms, pushes {sample.pushes} ({sample.endpoint_updates} updates), "
                f"{sample.bytes_per_push / 1024:.1f} KiB/push, cp cpu {sample.cpu_seconds:.2f} s",
                flush=True,
            )
            if k >= params.warmup:
                samples.append(sample)
            if k + 1 == params.warmup:
                profiler.start()  # the measured changes only
            if k < params.warmup:
                pushes_before = plane.metric("meshcp_pushes_total")
                stages_before = plane.stage_sums()
                cpu_start = plane.cpu_seconds()
                window_start = time.monotonic()
        window = time.monotonic() - window_start
        cpu_window = plane.cpu_seconds() - cpu_start
        server_pushes = plane.metric("meshcp_pushes_total") - pushes_before
        stages_after = plane.stage_sums()
        stages = {
            name: (stages_after[name][0] - stages_before[name][0])
            / max(1.0, stages_after[name][1] - stages_before[name][1])
            for name in stages_after
        }
        mem_end = plane.memory()
    finally:
        profiler.stop()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        reference.stop()
        api.close()  # type: ignore[no-untyped-call]

    conv = [s.convergence for s in samples]
    refs = [s.reference for s in samples]
    return {
        "samples": [asdict(s) for s in samples],
        "convergence_s": summarize(conv),
        "reference_s": summarize(refs),
        "convergence_minus_reference_s": summarize([c - r for c, r in zip(conv, refs, strict=True)]),
        "api_write_s": summarize([s.api_write for s in samples]),
        "pushes_per_change": sum(s.pushes for s in samples) / len(samples),
        "endpoint_updates_per_change": sum(s.endpoint_updates for s in samples) / len(samples),
        "server_pushes_per_change": server_pushes / len(samples),
        "controlplane_stage_means_s": stages,
        "bytes_per_push": sum(s.bytes_per_push * s.pushes for s in samples)
        / max(1, sum(s.pushes for s in samples)),
        "initial_sync_s": initial_sync,
        "initial_bytes_per_push": initial_bytes,
        "cpu_seconds_connect": cpu_connect,
        "cpu_seconds_per_change": cpu_window / len(samples),
        "bench_cpu_seconds_per_change": sum(s.bench_cpu_seconds for s in samples) / len(samples),
        "cpu_utilisation_window": cpu_window / window,
        "rss_mib_connected": mem_connected.get("VmRSS"),
        "rss_mib_end": mem_end.get("VmRSS"),
        "rss_mib_peak": mem_end.get("VmHWM"),
        "proxy_reconnects": sum(px.streams - 1 for px in proxies),
        "proxy_errors": sorted({e for px in proxies for e in px.errors})[:10],
        "reference_watch_errors": reference.errors,
    }


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("grpcio", "protobuf", "kubernetes", "uvloop"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def source_revision() -> str:
    """The commit measured, with ``+dirty`` when the control plane's files differ from it."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            [
                "git",
                "-C",
                str(REPO),
                "status",
                "--porcelain",
                "--",
                "controlplane",
                "meshproxy/xds",
                "meshproxy/config",
                "protos",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()
    return {
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "loadavg_at_start": [round(x, 2) for x in load],
        **_versions(),
    }


def run(
    params: Params,
    workdir: Path,
    cp_args: Sequence[str] = (),
    cp_env: dict[str, str] | None = None,
    profile: Path | None = None,
) -> dict[str, Any]:
    bins, reason = locate_binaries()
    if bins is None:
        raise SystemExit(f"bench-controlplane: {reason}")
    started = dt.datetime.now(dt.UTC)
    info = machine()
    with running_apiserver(workdir / "cluster", bins) as server:
        server.install_crds()
        api = server.api_client()
        try:
            t = time.monotonic()
            slices = create_mesh(api, params)
            print(f"created the mesh in {time.monotonic() - t:.1f} s", flush=True)
        finally:
            api.close()  # type: ignore[no-untyped-call]
        plane = ControlPlaneProcess(server.kubeconfig, workdir / "controlplane.log", cp_args, cp_env)
        try:
            deadline = time.monotonic() + params.timeout
            while not plane.ready():
                if plane.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"control plane not ready; see {workdir / 'controlplane.log'}")
                time.sleep(0.1)  # polling /ready with a deadline
            result = asyncio.run(measure(server, plane, params, slices, profile))
        finally:
            plane.stop()
    return {
        "benchmark": "controlplane-convergence",
        "started": started.isoformat(timespec="seconds"),
        "params": asdict(params),
        "kubernetes": bins.version,
        "revision": source_revision(),
        "controlplane_args": list(cp_args),
        "controlplane_env": dict(cp_env or {}),
        "machine": info,
        "result": result,
    }


# ---------------------------------------------------------------- the report


def markdown(report: dict[str, Any]) -> str:
    r, p, m = report["result"], report["params"], report["machine"]

    def ms(x: float) -> str:
        return f"{x * 1000:.0f}"

    rows = [
        ("convergence (write -> every proxy ACKed)", r["convergence_s"]),
        ("reference (write -> plain watch saw it)", r["reference_s"]),
        ("convergence - reference", r["convergence_minus_reference_s"]),
        ("API write (PATCH returned)", r["api_write_s"]),
    ]
    lines = [
        f"## Control plane convergence, {report['started']}",
        "",
        f"{p['proxies']} proxies ({p['workloads']} workloads), {p['services']} services, "
        f"{p['endpoints']} endpoints; {p['changes']} EndpointSlice changes after {p['warmup']} warm-up; "
        f"commit {report.get('revision', '?')}. "
        f"Kubernetes {report['kubernetes']}, {m['cpus']} CPUs ({m['cpu']}), load average at start "
        f"{m['loadavg_at_start'][0]}; Python {m['python']}, grpcio {m.get('grpcio', '?')}."
        + (
            f" Control plane environment: `{' '.join(f'{k}={v}' for k, v in report['controlplane_env'].items())}`."
            if report.get("controlplane_env")
            else ""
        )
        + (
            f" Control plane flags: `{' '.join(report['controlplane_args'])}`."
            if report["controlplane_args"]
            else ""
        ),
        "",
        "| ms | p50 | p90 | p99 | max |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {name} | {ms(s['p50'])} | {ms(s['p90'])} | {ms(s['p99'])} | {ms(s['max'])} |"
            for name, s in rows
        ),
        "",
        "| per change / process | value |",
        "|---|---:|",
        f"| pushes per change (received / server counter) | {r['pushes_per_change']:.0f} / "
        f"{r['server_pushes_per_change']:.0f} |",
        f"| of which incremental endpoint updates | {r.get('endpoint_updates_per_change', 0):.0f} |",
        f"| bytes per push (serialized DiscoveryResponse) | {r['bytes_per_push'] / 1024:.1f} KiB |",
        f"| bytes per proxy at connect (full snapshot) | {r['initial_bytes_per_push'] / 1024:.0f} KiB |",
        f"| control plane CPU per change | {r['cpu_seconds_per_change']:.2f} s |",
        f"| simulated proxies' CPU per change (the benchmark process) | "
        f"{r.get('bench_cpu_seconds_per_change', float('nan')):.2f} s |",
        f"| control plane CPU busy over the change window | {r['cpu_utilisation_window'] * 100:.0f} % of one core |",
        f"| initial sync of all proxies (connect -> all ACKed) | {r['initial_sync_s']:.1f} s, "
        f"{r['cpu_seconds_connect']:.1f} s CPU |",
        f"| control plane RSS: connected / end / peak | {r['rss_mib_connected']:.0f} / {r['rss_mib_end']:.0f} / "
        f"{r['rss_mib_peak']:.0f} MiB |",
        f"| proxy reconnects | {r['proxy_reconnects']} |",
        *(
            f"| control plane mean `{name}` | {value * 1000:.0f} ms |"
            for name, value in r.get("controlplane_stage_means_s", {}).items()
        ),
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> tuple[Params, argparse.Namespace]:
    ap = argparse.ArgumentParser(prog="python -m bench.controlplane", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"small mesh: {QUICK}")
    for name in ("proxies", "services", "endpoints", "workloads", "changes", "warmup"):
        ap.add_argument(f"--{name}", type=int)
    ap.add_argument("--settle", type=float)
    ap.add_argument("--timeout", type=float)
    ap.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON + Markdown report")
    ap.add_argument("--tag", default="", help="suffix of the report's file name")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    ap.add_argument(
        "--cp-env", action="append", default=[], metavar="KEY=VALUE", help="environment of the control plane"
    )
    ap.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="py-spy collapsed stacks (-f raw) of the control plane over the measured changes",
    )
    ap.add_argument("cp_args", nargs="*", help="extra `controlplane run` flags (after --)")
    args = ap.parse_args(argv)
    base = QUICK if args.quick else FULL
    overrides = {
        k: getattr(args, k)
        for k in ("proxies", "services", "endpoints", "workloads", "changes", "warmup", "settle", "timeout")
        if getattr(args, k) is not None
    }
    return Params(**{**asdict(base), **overrides}), args


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    if keep:
        path = Path(tempfile.mkdtemp(prefix="bench-controlplane-"))
        print(f"work directory: {path}", flush=True)
        yield path
    else:
        with tempfile.TemporaryDirectory(prefix="bench-controlplane-") as d:
            yield Path(d)


def main(argv: Sequence[str] | None = None) -> int:
    params, args = parse_args(argv)
    with workdir(args.keep) as wd:
        env = dict(kv.split("=", 1) for kv in args.cp_env)
        report = run(params, wd, args.cp_args, env, args.profile)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"controlplane-{report['started'][:10]}{('-' + args.tag) if args.tag else ''}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {args.out / stem}.json and .md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
