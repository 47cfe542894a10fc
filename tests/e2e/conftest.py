"""The e2e cluster as a pytest fixture, and small helpers to talk to it.

Owns: reading the cluster that ``scripts/e2e/cluster-up.sh`` brought up (its
``$RUN/env`` file), running ``kubectl``/``helm`` against it, and reaching the
backends that ``scripts/e2e/addons.sh`` runs next to it (Jaeger, Prometheus) at the
node's address. It never starts or stops the cluster: ``scripts/e2e/run.sh`` does.

Invariants: every address used is the node's (198.18.200.2, inside the network
namespace the scripts made) or a pod's, reached from inside the cluster; nothing
else is contacted. Without a cluster the tests skip, except under ``make e2e``
(``MESHPROXY_E2E_REQUIRED=1``), where a missing cluster is a failure.

Concurrency: synchronous helpers; each call blocks with a timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

REPO = Path(__file__).resolve().parents[2]
DEFAULT_ENV = Path(os.environ.get("MESHPROXY_E2E_RUN", "/var/lib/meshproxy-e2e")) / "env"
T = TypeVar("T")


class E2EError(AssertionError):
    """A step of the journey did not reach its expected state in time."""


def wait_for(probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.5) -> T:
    """Poll ``probe`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = probe()
        except (OSError, subprocess.SubprocessError, ValueError, KeyError) as exc:
            value, last = None, exc
        if value:
            return value
        if time.monotonic() > deadline:
            raise E2EError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last!r})")
        time.sleep(interval)


@dataclass(frozen=True, slots=True)
class Cluster:
    kubeconfig: Path
    kubectl_bin: Path
    helm_bin: Path
    node_ip: str
    netns: str
    gateway_api_crds: Path
    run_dir: Path

    @classmethod
    def from_env_file(cls, path: Path) -> Cluster:
        env = dict(
            line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and line[0] != "#"
        )
        return cls(
            kubeconfig=Path(env["KUBECONFIG"]),
            kubectl_bin=Path(env["KUBECTL"]),
            helm_bin=Path(env["HELM"]),
            node_ip=env["NODE_IP"],
            netns=env["NETNS"],
            gateway_api_crds=Path(env["GATEWAY_API_CRDS"]),
            run_dir=Path(env["E2E_RUN"]),
        )

    # -- kubectl / helm --

    def _env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def kubectl(
        self, *args: str, stdin: str | None = None, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(self.kubectl_bin), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self._env(),
        )
        if check and proc.returncode != 0:
            raise E2EError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def kubectl_popen(self, *args: str, stdin: Path) -> subprocess.Popen[str]:
        """kubectl in the background, its standard input read from the file ``stdin``."""
        with stdin.open() as f:
            return subprocess.Popen(
                [str(self.kubectl_bin), *args],
                stdin=f,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=self._env(),
            )

    def get_json(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def apply(self, manifest: str) -> None:
        self.kubectl("apply", "-f", "-", stdin=manifest)

    def helm(self, *args: str, timeout: float = 300) -> str:
        proc = subprocess.run(
            [str(self.helm_bin), *args], capture_output=True, text=True, timeout=timeout, env=self._env()
        )
        if proc.returncode != 0:
            raise E2EError(f"helm {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def in_node(self, argv: Sequence[str], timeout: float = 30) -> str:
        """Run a command in the node's network namespace (e.g. curl a pod IP)."""
        proc = subprocess.run(
            ["nsenter", f"--net=/run/netns/{self.netns}", "--", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
        return proc.stdout

    # -- backends next to the cluster --

    def http_json(self, port: int, path: str, params: dict[str, str] | None = None) -> Any:
        url = f"http://{self.node_ip}:{port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.loads(resp.read())

    def promql(self, query: str) -> list[dict[str, Any]]:
        """An instant PromQL query's result vector."""
        body = self.http_json(9090, "/api/v1/query", {"query": query})
        if body.get("status") != "success":
            raise E2EError(f"Prometheus query {query!r} failed: {body}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def jaeger_trace(self, trace_id: str) -> dict[str, Any] | None:
        try:
            body = self.http_json(16686, f"/api/traces/{trace_id}")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise
        data = body.get("data") or []
        return data[0] if data else None


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    env_file = Path(os.environ.get("MESHPROXY_E2E_ENV", str(DEFAULT_ENV)))
    if not env_file.exists():
        reason = f"no e2e cluster ({env_file} missing): run `make e2e` (root)"
        if os.environ.get("MESHPROXY_E2E_REQUIRED") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    c = Cluster.from_env_file(env_file)
    c.kubectl("get", "--raw", "/readyz")
    yield c
