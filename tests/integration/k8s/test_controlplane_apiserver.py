"""The real control plane process against the real API server, with real sidecars.

    kubectl apply ──▶ kube-apiserver ──watch──▶ `controlplane run --kubeconfig` (chart's RBAC)
                                                   │ gRPC discovery (127.0.0.1)
                                   `meshproxy run --control-plane` x2 ──▶ /config_dump

What a user relies on: Services, EndpointSlices, HTTPRoutes and TrafficPolicies
created with kubectl show up in every sidecar's config, and changes follow;
the sidecars ACK what they get; the control plane runs with nothing more than
the chart's ClusterRole and tells the user, in the objects' status, that the
route and the policy were accepted.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.apiserver import REPO, ApiServer, free_port

pytestmark = [pytest.mark.apiserver, pytest.mark.slow]

VENV_BIN = Path(sys.executable).parent
CHART = REPO / "deploy" / "helm" / "meshproxy"
CP_NAMESPACE = "meshproxy-system"


def wait_until(
    condition: Callable[[], bool], what: str, within: float = 60.0, logs: Callable[[], str] | None = None
) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}" + (logs() if logs else ""))
        time.sleep(0.1)


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace").splitlines()[-lines:]
        return (
            f"\n--- {self.name} ({'exited ' + str(self.popen.returncode) if self.popen.poll() is not None else 'running'}) ---\n"
            + "\n".join(text)
        )


@contextlib.contextmanager
def process(name: str, argv: list[str], workdir: Path) -> Iterator[Proc]:
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir
        )
    proc = Proc(name, popen, log)
    try:
        yield proc
    finally:
        popen.terminate()
        try:
            popen.wait(10)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()


def chart_rbac_kubeconfig(apiserver: ApiServer) -> Path:
    """Install only the chart's ServiceAccount + RBAC and return a kubeconfig acting as that account."""
    helm = apiserver.bins.helm
    rendered = subprocess.run(
        [str(helm), "template", "mp", str(CHART), "--namespace", CP_NAMESPACE,
         "-s", "templates/rbac.yaml", "-s", "templates/serviceaccount.yaml"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    accounts = [d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"]
    assert accounts, "the chart renders no ServiceAccount"
    if apiserver.kubectl("get", "namespace", CP_NAMESPACE, check=False).returncode != 0:
        apiserver.kubectl("create", "namespace", CP_NAMESPACE)
    apiserver.apply_yaml(rendered)
    # The control plane's account, not admin: any permission the chart forgot fails the test.
    sa = next(a for a in accounts if "controlplane" in a) if len(accounts) > 1 else accounts[0]
    return apiserver.serviceaccount_kubeconfig(CP_NAMESPACE, sa)


MESH = """
apiVersion: v1
kind: Service
metadata: {{name: inventory, namespace: {ns}}}
spec:
  ports: [{{name: http, port: 8080, targetPort: 8080}}]
  selector: {{app: inventory}}
---
apiVersion: v1
kind: Service
metadata: {{name: inventory-v2, namespace: {ns}}}
spec:
  ports: [{{name: http, port: 8080, targetPort: 8080}}]
  selector: {{app: inventory, version: v2}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: inventory-1
  namespace: {ns}
  labels: {{kubernetes.io/service-name: inventory}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
  - addresses: ["198.18.5.1"]
    conditions: {{ready: true}}
  - addresses: ["198.18.5.2"]
    conditions: {{ready: true}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: inventory-v2-1
  namespace: {ns}
  labels: {{kubernetes.io/service-name: inventory-v2}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
  - addresses: ["198.18.5.9"]
    conditions: {{ready: true}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: inventory-canary, namespace: {ns}}}
spec:
  parentRefs: [{{group: "", kind: Service, name: inventory, port: 8080}}]
  rules:
    - matches: [{{path: {{type: PathPrefix, value: /api}}}}]
      backendRefs:
        - {{name: inventory, port: 8080, weight: 90}}
        - {{name: inventory-v2, port: 8080, weight: 10}}
---
apiVersion: policy.meshproxy.io/v1alpha1
kind: TrafficPolicy
metadata: {{name: inventory, namespace: {ns}}}
spec:
  targetRef: {{kind: Service, name: inventory}}
  timeout: {timeout}
  loadBalancer: round_robin
"""


class Sidecar:
    def __init__(self, proc: Proc, admin_port: int) -> None:
        self.proc = proc
        self.admin_port = admin_port

    def config(self) -> dict[str, Any] | None:
        status, body = http_get(f"http://127.0.0.1:{self.admin_port}/config_dump")
        return json.loads(body) if status == 200 else None

    def service(self, name: str, ns: str) -> dict[str, Any] | None:
        cfg = self.config() or {}
        for s in cfg.get("services") or ():
            if s["name"] == name and s["namespace"] == ns:
                return dict(s)
        return None


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (len(line) == len(name) or line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_controlplane_serves_cluster_objects_to_real_sidecars(
    apiserver: ApiServer, namespace: str, tmp_path: Path
) -> None:
    ns = namespace
    kubeconfig = chart_rbac_kubeconfig(apiserver)
    apiserver.apply_yaml(MESH.format(ns=ns, timeout="3s"))
    vip = apiserver.kubectl(
        "get", "service", "inventory", "-n", ns, "-o", "jsonpath={.spec.clusterIP}"
    ).stdout
    assert vip.startswith("198.19.")

    grpc_port, metrics_port = free_port(), free_port()
    cp_argv = [
        str(VENV_BIN / "controlplane"), "run", "--kubeconfig", str(kubeconfig),
        "--listen-address", "127.0.0.1", "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
        "--no-webhook", "--debounce-quiet", "0.05", "--log-level", "debug",
    ]  # fmt: skip
    with contextlib.ExitStack() as stack:
        cp = stack.enter_context(process("controlplane", cp_argv, tmp_path))
        metrics = f"http://127.0.0.1:{metrics_port}"
        wait_until(
            lambda: http_get(f"{metrics}/ready")[0] == 200,
            "control plane /ready (every kind listed)",
            logs=cp.tail,
        )

        sidecars: list[Sidecar] = []
        for i in range(2):
            admin = free_port()
            argv = [
                str(VENV_BIN / "meshproxy"), "run", "--control-plane", f"127.0.0.1:{grpc_port}",
                "--pod-name", f"client-{i}", "--pod-namespace", ns, "--pod-ip", f"198.18.6.{i + 1}",
                "--admin-port", str(admin), "--outbound-port", str(free_port()),
                "--inbound-port", str(free_port()), "--listen-host", "127.0.0.1", "--log-format", "text",
            ]  # fmt: skip
            sidecars.append(Sidecar(stack.enter_context(process(f"sidecar-{i}", argv, tmp_path)), admin))

        def logs() -> str:
            dump = json.dumps(sidecars[0].config(), indent=1)[:3000]
            return (
                cp.tail()
                + "".join(s.proc.tail(15) for s in sidecars)
                + "\n--- sidecar-0 /config_dump ---\n"
                + dump
            )

        def inventory_everywhere(check: Callable[[dict[str, Any]], bool]) -> bool:
            services = [s.service("inventory", ns) for s in sidecars]
            return all(svc is not None and check(svc) for svc in services)

        def initial(svc: dict[str, Any]) -> bool:
            return (
                svc["port"] == 8080
                and vip in svc["vips"]
                and sorted(e["address"] for e in svc["endpoints"]) == ["198.18.5.1", "198.18.5.2"]
                and svc["policy"]["timeout"] == 3.0
                and svc["policy"]["lb"] == "round_robin"
                and any(
                    sorted((b["service"], b["weight"]) for b in r["backends"])
                    == [(f"inventory-v2.{ns}:8080", 10), (f"inventory.{ns}:8080", 90)]
                    for r in svc["routes"]
                )
            )

        wait_until(
            lambda: inventory_everywhere(initial),
            "both sidecars to get Service+slices+route+policy",
            logs=logs,
        )

        # Changes made with kubectl follow: a new endpoint, a new timeout.
        acks_before = _metric(http_get(f"{metrics}/metrics")[1].decode(), "meshcp_acks_total")
        apiserver.apply_yaml(MESH.format(ns=ns, timeout="7s"))
        apiserver.kubectl(
            "patch", "endpointslice", "inventory-1", "-n", ns, "--type=json",
            "-p", json.dumps([{"op": "add", "path": "/endpoints/-", "value": {"addresses": ["198.18.5.3"], "conditions": {"ready": True}}}]),
        )  # fmt: skip

        def updated(svc: dict[str, Any]) -> bool:
            return svc["policy"]["timeout"] == 7.0 and "198.18.5.3" in {
                e["address"] for e in svc["endpoints"]
            }

        wait_until(lambda: inventory_everywhere(updated), "both sidecars to get the changes", logs=logs)
        # Every sidecar ACKed what it applied, and nothing was rejected.
        text = http_get(f"{metrics}/metrics")[1].decode()
        assert _metric(text, "meshcp_acks_total") >= acks_before + 2, logs()
        assert _metric(text, "meshcp_nacks_total") == 0, logs()

        # The control plane reported, through the status subresource, with the chart's RBAC only.
        def policy_accepted() -> bool:
            obj = json.loads(
                apiserver.kubectl("get", "trafficpolicy", "inventory", "-n", ns, "-o", "json").stdout
            )
            conds = (obj.get("status") or {}).get("conditions") or []
            return any(
                c["type"] == "Accepted"
                and c["status"] == "True"
                and c.get("observedGeneration") == obj["metadata"]["generation"]
                for c in conds
            )

        def route_accepted() -> bool:
            obj = json.loads(
                apiserver.kubectl("get", "httproute", "inventory-canary", "-n", ns, "-o", "json").stdout
            )
            parents = (obj.get("status") or {}).get("parents") or []
            return any(
                p["controllerName"] == "meshproxy.io/controller"
                and p["parentRef"]["name"] == "inventory"
                and any(c["type"] == "Accepted" and c["status"] == "True" for c in p["conditions"])
                and any(c["type"] == "ResolvedRefs" and c["status"] == "True" for c in p["conditions"])
                for p in parents
            )

        wait_until(policy_accepted, "TrafficPolicy status Accepted=True", logs=logs)
        wait_until(route_accepted, "HTTPRoute parent status Accepted/ResolvedRefs", logs=logs)
        assert cp.popen.poll() is None, logs()
