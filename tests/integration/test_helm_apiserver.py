"""The chart against a real kube-apiserver: install, inject, upgrade, restart, uninstall.

A throwaway etcd + kube-apiserver on loopback (tests/support/apiserver.py). The chart is
installed with ``webhook.url`` pointing at 127.0.0.1 (there is no cluster network to
reach a Service), and the real ``controlplane run`` process serves the webhook with the
chart's ServiceAccount token, the chart's Secret and the chart's injection ConfigMap
(written to files as kubelet would mount them). So a missing RBAC rule, a certificate
the API server does not trust or a template the webhook rejects fails this test.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_helm_chart import CHART, DEMO, helm

from tests.support.apiserver import ApiServer, free_port, locate_binaries
from tests.support.require import missing

pytestmark = [pytest.mark.apiserver, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
MESH_NS = "meshproxy-system"
RELEASE = "meshproxy"
SA = "meshproxy-controlplane"


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def apiserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    bins, reason = locate_binaries()
    if bins is None:
        missing(reason)
    with ApiServer(bins, tmp_path_factory.mktemp("apiserver")) as server:
        server.install_crds(gateway_api=True, mesh=False)  # the chart brings the mesh CRD
        yield server


class ControlPlane:
    """``controlplane run`` as a child process, configured like the chart's Deployment."""

    def __init__(self, server: ApiServer, workdir: Path, webhook_port: int) -> None:
        self.server = server
        self.workdir = workdir
        self.webhook_port = webhook_port
        self.proc: subprocess.Popen[str] | None = None
        self.metrics_port = 0

    def mount_chart_files(self) -> None:
        """Write the Secret and ConfigMap the chart made, as kubelet's volume mounts would."""
        secret = json.loads(
            self.server.kubectl("get", "secret", "-n", MESH_NS, f"{RELEASE}-webhook-tls", "-o", "json").stdout
        )
        tls = self.workdir / "webhook-tls"
        tls.mkdir(parents=True, exist_ok=True)
        for key in ("tls.crt", "tls.key"):
            (tls / key).write_bytes(base64.b64decode(secret["data"][key]))
        cm = json.loads(
            self.server.kubectl(
                "get", "configmap", "-n", MESH_NS, f"{RELEASE}-injection", "-o", "json"
            ).stdout
        )
        injection = self.workdir / "injection"
        injection.mkdir(parents=True, exist_ok=True)
        (injection / "template.json").write_text(cm["data"]["template.json"])

    def start(self) -> None:
        kubeconfig = self.server.serviceaccount_kubeconfig(MESH_NS, SA)
        log = open(self.workdir / "controlplane.log", "a")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "controlplane"),
                "run",
                f"--kubeconfig={kubeconfig}",
                "--listen-address=127.0.0.1",
                "--grpc-port=0",
                "--metrics-port=0",
                f"--webhook-port={self.webhook_port}",
                f"--webhook-cert-file={self.workdir / 'webhook-tls' / 'tls.crt'}",
                f"--webhook-key-file={self.workdir / 'webhook-tls' / 'tls.key'}",
                f"--webhook-template-file={self.workdir / 'injection' / 'template.json'}",
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        log.close()
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "listening grpc=HOST:PORT metrics=HOST:PORT"
        assert line.startswith("listening"), f"control plane did not start: {self.log_tail()}"
        self.metrics_port = int(line.split("metrics=")[1].split(":")[-1])
        # /ready needs every kind listed once: fails if the chart's RBAC misses a rule.
        wait_for(self.ready, f"control plane /ready (RBAC?): {self.log_tail()}", timeout=60)

    def ready(self) -> bool:
        assert self.proc is not None
        assert self.proc.poll() is None, f"control plane exited: {self.log_tail()}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/ready", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None

    def log_tail(self) -> str:
        path = self.workdir / "controlplane.log"
        return "\n".join(path.read_text().splitlines()[-30:]) if path.exists() else ""


def make_namespace(server: ApiServer, *, label: bool = False, annotation: bool = False) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    meta: dict[str, Any] = {"name": name}
    if label:
        meta["labels"] = {"meshproxy.io/inject": "enabled"}
    if annotation:
        meta["annotations"] = {"meshproxy.io/inject": "enabled"}
    server.apply_yaml(json.dumps({"apiVersion": "v1", "kind": "Namespace", "metadata": meta}))
    # No controller-manager here: create the default ServiceAccount pod admission wants.
    server.kubectl("create", "serviceaccount", "default", "-n", name)
    return name


def create_pod(
    server: ApiServer, namespace: str, annotations: dict[str, str] | None = None
) -> tuple[dict[str, Any], str]:
    """Create a pod; returns it as stored by the API server, and kubectl's stderr (warnings)."""
    name = f"p-{uuid.uuid4().hex[:8]}"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "annotations": annotations or {}},
        "spec": {
            "containers": [
                {
                    "name": "app",
                    "image": "localhost/meshproxy:0.1.0",
                    "command": ["python3", "-m", "meshdemo.inventory"],
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}},
                }
            ]
        },
    }
    proc = server.kubectl("create", "-f", "-", input=json.dumps(pod))
    stored = json.loads(server.kubectl("get", "pod", "-n", namespace, name, "-o", "json").stdout)
    return stored, proc.stderr


def injected(pod: dict[str, Any]) -> bool:
    return "meshproxy.io/status" in (pod["metadata"].get("annotations") or {})


def sidecar_env(pod: dict[str, Any]) -> dict[str, str]:
    sidecar = next(c for c in pod["spec"]["initContainers"] if c["name"] == "meshproxy")
    return {e["name"]: e.get("value", "") for e in sidecar["env"]}


def install_args(webhook_port: int, *extra: str) -> list[str]:
    return [
        RELEASE,
        str(CHART),
        "--namespace",
        MESH_NS,
        "--set",
        f"webhook.url=https://127.0.0.1:{webhook_port}/inject",
        "--set",
        "webhook.certIPs={127.0.0.1}",
        *extra,
    ]


def test_install_inject_upgrade_restart_uninstall(apiserver: ApiServer, tmp_path: Path) -> None:
    kube = ["--kubeconfig", str(apiserver.kubeconfig)]
    port = free_port()
    cp = ControlPlane(apiserver, tmp_path, port)
    try:
        # ---- install: CRDs, RBAC, webhook configuration, control-plane objects ----
        extra_env = [
            {"name": "OTEL_BSP_SCHEDULE_DELAY", "value": "2000"},
            {"name": "OTEL_SERVICE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ]
        helm(
            "install",
            *install_args(port, "--set-json", f"sidecar.extraEnv={json.dumps(extra_env)}"),
            "--create-namespace",
            *kube,
        )
        apiserver.kubectl(
            "wait", "--for=condition=Established", "--timeout=60s", "crd/trafficpolicies.policy.meshproxy.io"
        )
        for kind, name, ns in [
            ("clusterrole", SA, None),
            ("clusterrolebinding", SA, None),
            ("mutatingwebhookconfiguration", f"{RELEASE}-sidecar-injector", None),
            ("serviceaccount", SA, MESH_NS),
            ("deployment", SA, MESH_NS),
            ("service", SA, MESH_NS),
            ("poddisruptionbudget", SA, MESH_NS),
        ]:
            apiserver.kubectl("get", kind, name, *(["-n", ns] if ns else []))

        # ---- least privilege, as the API server sees it ----
        sa_kubeconfig = apiserver.serviceaccount_kubeconfig(MESH_NS, SA)

        def can(*args: str) -> bool:
            return (
                apiserver.kubectl("auth", "can-i", *args, check=False, kubeconfig=sa_kubeconfig).returncode
                == 0
            )

        assert can("watch", "endpointslices.discovery.k8s.io", "--all-namespaces")
        assert can("patch", "trafficpolicies.policy.meshproxy.io", "--subresource=status", "-n", "default")
        assert can("update", "httproutes.gateway.networking.k8s.io", "--subresource=status", "-n", "default")
        assert not can("get", "secrets", "-n", MESH_NS)
        assert not can("create", "pods", "-n", "default")
        assert not can("patch", "trafficpolicies.policy.meshproxy.io", "-n", "default")
        assert not can("patch", "mutatingwebhookconfigurations.admissionregistration.k8s.io")

        # ---- the control plane with the chart's token serves the webhook ----
        cp.mount_chart_files()
        cp.start()
        annotated = make_namespace(apiserver, annotation=True)
        labeled = make_namespace(apiserver, label=True)
        plain = make_namespace(apiserver)

        pod, _ = create_pod(apiserver, annotated)
        assert injected(pod)
        # The test API server is 1.34: native sidecar right after the init step.
        assert [c["name"] for c in pod["spec"]["initContainers"]] == ["meshproxy-init", "meshproxy"]
        assert pod["spec"]["initContainers"][1]["restartPolicy"] == "Always"
        assert pod["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/app-health/app/readyz"
        assert sidecar_env(pod)["MESHPROXY_LOG_LEVEL"] == "info"
        assert sidecar_env(pod)["MESHPROXY_CONTROL_PLANE"] == f"{SA}.{MESH_NS}.svc:15010"
        # sidecar.extraEnv: after the injector's variables, as stored by the API server
        # (which defaults fieldRef.apiVersion).
        sidecar = next(c for c in pod["spec"]["initContainers"] if c["name"] == "meshproxy")
        assert sidecar["env"][-2:] == [
            extra_env[0],
            {
                "name": "OTEL_SERVICE_NAME",
                "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}},
            },
        ]

        assert injected(create_pod(apiserver, labeled)[0])
        assert not injected(create_pod(apiserver, plain)[0])
        assert not injected(create_pod(apiserver, annotated, {"meshproxy.io/inject": "disabled"})[0])
        pod, warnings = create_pod(apiserver, annotated, {"meshproxy.io/exclude-inbound-ports": "http"})
        assert not injected(pod)
        assert "meshproxy: sidecar not injected: meshproxy.io/exclude-inbound-ports" in warnings

        # ---- the demo manifests apply (CRD CEL rules included) and their pods get injected ----
        apiserver.apply_yaml(DEMO)  # what `kubectl apply -f deploy/demo/k8s/` does
        dep = json.loads(
            apiserver.kubectl("get", "deployment", "-n", "demo", "inventory-v2", "-o", "json").stdout
        )
        template = dep["spec"]["template"]
        demo_pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "inventory-v2-test",
                "namespace": "demo",
                "labels": template["metadata"]["labels"],
            },
            "spec": template["spec"],
        }
        apiserver.kubectl("create", "-f", "-", input=json.dumps(demo_pod))
        pod = json.loads(
            apiserver.kubectl("get", "pod", "-n", "demo", "inventory-v2-test", "-o", "json").stdout
        )
        assert injected(pod)
        app = next(c for c in pod["spec"]["containers"] if c["name"] == "inventory")
        assert app["livenessProbe"]["httpGet"]["path"] == "/app-health/inventory/livez"
        assert pod["spec"]["securityContext"]["runAsUser"] != 1357  # the app is intercepted

        # ---- upgrade with changed values: same certificate, webhook keeps serving ----
        def tls_state() -> tuple[str, str]:
            secret = json.loads(
                apiserver.kubectl(
                    "get", "secret", "-n", MESH_NS, f"{RELEASE}-webhook-tls", "-o", "json"
                ).stdout
            )
            hook = json.loads(
                apiserver.kubectl(
                    "get", "mutatingwebhookconfiguration", f"{RELEASE}-sidecar-injector", "-o", "json"
                ).stdout
            )
            return secret["data"]["tls.crt"], hook["webhooks"][0]["clientConfig"]["caBundle"]

        before = tls_state()
        helm(
            "upgrade",
            *install_args(port, "--set", "sidecar.logLevel=debug", "--set-json", "tracing.sampling=0.5"),
            *kube,
        )
        assert tls_state() == before
        assert injected(create_pod(apiserver, annotated)[0])  # served right through the upgrade
        cp.mount_chart_files()  # kubelet refreshes the ConfigMap volume; the webhook re-reads it

        def new_template_served() -> bool:
            env = sidecar_env(create_pod(apiserver, annotated)[0])
            return env["MESHPROXY_LOG_LEVEL"] == "debug" and env["MESHPROXY_TRACING_SAMPLING"] == "0.5"

        wait_for(new_template_served, "the upgraded injection template", timeout=30)

        # ---- control-plane restart: the kept Secret still matches the caBundle ----
        cp.stop()
        pod, _ = create_pod(apiserver, annotated)
        assert not injected(pod)  # webhook down: failurePolicy Ignore, the pod is still created
        cp.start()
        assert injected(create_pod(apiserver, annotated)[0])

        # ---- uninstall: nothing left that could block or mutate pod creation ----
        cp.stop()
        helm("uninstall", RELEASE, "--namespace", MESH_NS, "--wait", *kube)
        hooks = json.loads(apiserver.kubectl("get", "mutatingwebhookconfigurations", "-o", "json").stdout)[
            "items"
        ]
        assert [h["metadata"]["name"] for h in hooks if "meshproxy" in h["metadata"]["name"]] == []
        assert apiserver.kubectl("get", "clusterrole", SA, check=False).returncode != 0
        pod, warnings = create_pod(apiserver, annotated)
        assert not injected(pod) and "meshproxy" not in warnings
    finally:
        cp.stop()
        helm("uninstall", RELEASE, "--namespace", MESH_NS, *kube, check=False)
