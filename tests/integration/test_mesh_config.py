"""Config changes under steady load, driven through the real control plane: zero failed requests.

Topology (one lab for the module): pod ``cp`` runs ``controlplane run --from-dir DIR`` (the
manifests in DIR are the cluster), pods ``client``, ``v1``, ``v2`` and ``v1b`` are meshed with
``meshproxy iptables install`` and sidecars started with ``--control-plane``: no sidecar has a
config file, everything they know comes over the discovery stream.

The cluster: Services ``web`` (VIP, selects all web pods), ``web-v1`` and ``web-v2`` (by
version), an ``HTTPRoute`` splitting ``web`` between them, and the Pods. A test rewrites a
manifest while a load generator in ``client`` keeps calling ``web``, waits (on the apps'
counters) until the change shows in the traffic, stops the load, and requires that not one
request failed: no non-2xx status and no connection error.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mesh_rig import PY, RIG, control, mesh_lab, spawn_app, start_sidecar, wait_for

from meshproxy.lab.mesh import admin_get, intercept, wait_sidecar
from meshproxy.lab.netns import CommandError, Lab, Pod

pytestmark = [pytest.mark.netns, pytest.mark.slow]

VIP = "198.19.0.40"
CP_PORT = 15010

SERVICES = f"""
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: demo}}
spec:
  clusterIP: {VIP}
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: v1
kind: Service
metadata: {{name: web-v1, namespace: demo}}
spec:
  clusterIP: 198.19.0.41
  selector: {{app: web, version: v1}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: v1
kind: Service
metadata: {{name: web-v2, namespace: demo}}
spec:
  clusterIP: 198.19.0.42
  selector: {{app: web, version: v2}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
"""


def route(v1: int, v2: int) -> str:
    return f"""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: web-split, namespace: demo}}
spec:
  parentRefs: [{{group: "", kind: Service, name: web, port: 80}}]
  rules:
  - backendRefs:
    - {{name: web-v1, port: 80, weight: {v1}}}
    - {{name: web-v2, port: 80, weight: {v2}}}
"""


def pod_manifest(pod: Pod, labels: dict[str, str], ready: bool = True) -> str:
    label_text = ", ".join(f"{k}: {v}" for k, v in labels.items())
    return f"""
apiVersion: v1
kind: Pod
metadata: {{name: {pod.name}-0, namespace: demo, labels: {{{label_text}}}}}
spec:
  containers: [{{name: app, ports: [{{containerPort: 8080}}]}}]
status: {{phase: Running, podIP: {pod.ip}, conditions: [{{type: Ready, status: "{ready}"}}]}}
"""


def write(path: Path, text: str) -> None:
    """Replace a manifest in one step, so the control plane never reads half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.rename(path)


@dataclass
class Mesh:
    lab: Lab
    manifests: Path
    pods: dict[str, Pod]

    def hits(self, name: str) -> int:
        return int(control(self.lab, self.pods[name], "stats")["hits"].get("live", {}).get("200", 0))

    def ready(self, name: str) -> bool:
        try:
            admin_get(self.lab, self.pods[name], "/ready")
        except CommandError:  # 503 until the first config is applied
            return False
        return True


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    with mesh_lab() as lab:
        manifests = lab.logdir / "manifests"
        manifests.mkdir()
        cp = lab.add_pod("cp")
        pods = {name: lab.add_pod(name) for name in ("client", "v1", "v2", "v1b")}
        write(manifests / "services.yaml", SERVICES)
        write(manifests / "route.yaml", route(100, 0))
        write(manifests / "client.yaml", pod_manifest(pods["client"], {"app": "client"}))
        for name, version in (("v1", "v1"), ("v2", "v2")):
            write(manifests / f"{name}.yaml", pod_manifest(pods[name], {"app": "web", "version": version}))
        # v1b exists but is not Ready yet: no endpoint until a test flips its condition.
        write(manifests / "v1b.yaml", pod_manifest(pods["v1b"], {"app": "web", "version": "v1"}, ready=False))
        plane = lab.spawn(
            cp,
            [PY, "-m", "controlplane.cli", "run", "--from-dir", str(manifests), "--listen-address", "0.0.0.0",
             "--grpc-port", str(CP_PORT), "--metrics-port", "15014", "--poll-interval", "0.2"],
            name="controlplane",
        )  # fmt: skip
        lab.wait_listening(cp, CP_PORT, timeout=30, proc=plane)
        for name in ("v1", "v2", "v1b"):
            spawn_app(lab, pods[name], "http-app", "--name", name, "--port", "8080", port=8080)
        sidecars = []
        for pod in pods.values():
            intercept(lab, pod)
            args = ["--control-plane", f"{cp.ip}:{CP_PORT}", "--pod-namespace", "demo"]
            sidecars.append(start_sidecar(lab, pod, None, args=args, wait=False))
        for proc in sidecars:
            wait_sidecar(lab, proc, timeout=30)
        m = Mesh(lab, manifests, pods)
        for name in pods:
            wait_for(lambda n=name: m.ready(n), 30, f"{name}'s sidecar configured by the control plane")
        yield m


@dataclass
class Load:
    """The client app calling ``web`` over keep-alive connections until told to stop."""

    mesh: Mesh
    proc: subprocess.Popen[str]
    stop_file: Path

    @classmethod
    def start(cls, mesh: Mesh, concurrency: int = 2) -> Load:
        stop = mesh.lab.logdir / f"stop-load-{secrets.token_hex(4)}"
        argv = [PY, RIG, "load", f"http://{VIP}/live/x", "--until", str(stop), "-c", str(concurrency)]
        proc = subprocess.Popen(
            mesh.lab.command(mesh.pods["client"], argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        return cls(mesh, proc, stop)

    def finish(self) -> dict[str, Any]:
        self.stop_file.touch()
        out, err = self.proc.communicate(timeout=60)
        assert out.strip(), err
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return result


def test_shifting_the_split_under_load_fails_no_request(mesh: Mesh) -> None:
    v1_before, v2_before = mesh.hits("v1"), mesh.hits("v2")
    load = Load.start(mesh)
    try:
        wait_for(lambda: mesh.hits("v1") >= v1_before + 50, 30, "load flowing to v1")
        assert mesh.hits("v2") == v2_before  # weight 0: v2 gets nothing yet
        write(mesh.manifests / "route.yaml", route(50, 50))
        wait_for(lambda: mesh.hits("v2") >= v2_before + 50, 30, "v2 serving after the split moved")
    finally:
        r = load.finish()
    assert set(r["status"]) == {"200"} and not r["errors"], r
    assert r["names"].get("v1", 0) > 0 and r["names"].get("v2", 0) > 0, r


def test_adding_an_endpoint_under_load_fails_no_request(mesh: Mesh) -> None:
    assert mesh.hits("v1b") == 0  # not Ready: never picked
    served_before = mesh.hits("v1") + mesh.hits("v2")
    load = Load.start(mesh)
    try:
        wait_for(lambda: mesh.hits("v1") + mesh.hits("v2") >= served_before + 50, 30, "load flowing")
        # What the kubelet does once the new pod's probes pass: its Ready condition turns True.
        write(mesh.manifests / "v1b.yaml", pod_manifest(mesh.pods["v1b"], {"app": "web", "version": "v1"}))
        wait_for(lambda: mesh.hits("v1b") >= 30, 30, "the new endpoint v1b serving")
    finally:
        r = load.finish()
    assert set(r["status"]) == {"200"} and not r["errors"], r
    assert r["names"].get("v1b", 0) > 0, r


def test_removing_an_endpoint_under_load_fails_no_request(mesh: Mesh) -> None:
    v1b = mesh.pods["v1b"]
    write(mesh.manifests / "v1b.yaml", pod_manifest(v1b, {"app": "web", "version": "v1"}))
    load = Load.start(mesh)
    try:
        start = mesh.hits("v1b")
        wait_for(lambda: mesh.hits("v1b") >= start + 20, 30, "v1b serving under load")
        # The pod goes away (its app keeps answering what it already got, as a terminating
        # pod does): the control plane drops the endpoint, requests in flight finish.
        (mesh.manifests / "v1b.yaml").unlink()

        def endpoint_gone() -> bool:
            dump = json.loads(admin_get(mesh.lab, mesh.pods["client"], "/config_dump"))
            addresses = {e["address"] for s in dump["services"] for e in s.get("endpoints", ())}
            return v1b.ip not in addresses

        wait_for(endpoint_gone, 30, "v1b gone from the client sidecar's config")
        frozen = mesh.hits("v1b")
        served = mesh.hits("v1") + mesh.hits("v2")
        wait_for(lambda: mesh.hits("v1") + mesh.hits("v2") >= served + 50, 30, "load flowing without v1b")
        assert mesh.hits("v1b") == frozen  # no new request went to the removed endpoint
    finally:
        r = load.finish()
    assert set(r["status"]) == {"200"} and not r["errors"], r
