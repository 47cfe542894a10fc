"""The container image: built with buildah from the working tree, then run.

Builds ``localhost/meshproxy:<version>`` with scripts/build-images.sh (which makes the
Debian base image first if needed: a minute or two), then runs its entry points with
``buildah run`` and runs the init container's exact command, as the webhook injects
it, inside a throwaway network namespace, checking the nat rules it leaves there.
Needs root and buildah; skipped without them, except under CI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane import inject
from tests.support.require import missing

REPO = Path(__file__).resolve().parents[2]
# The first test's setup builds the image; on a fresh machine that is two debootstraps
# (base and build image), a pip install and the mypyc compile inside the build stage:
# well over the suite's 5-minute default, so these tests get the build's own budget (plus
# system-deps.sh, which _unavailable may run first).
BUILD_TIMEOUT = 1800
pytestmark = [pytest.mark.slow, pytest.mark.timeout(BUILD_TIMEOUT + 900)]


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (buildah storage, network namespaces)"
    if shutil.which("buildah") is None or shutil.which("debootstrap") is None:
        # The test installs what it needs, like every make target (idempotent apt-get).
        subprocess.run([str(REPO / "scripts" / "system-deps.sh"), "--k8s"], check=False, timeout=900)
    for tool in ("buildah", "debootstrap", "ip"):
        if shutil.which(tool) is None:
            return f"needs {tool} (scripts/system-deps.sh --k8s)"
    return None


def run(*argv: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def image() -> str:
    reason = _unavailable()
    if reason:
        missing(reason)
    proc = run(str(REPO / "scripts" / "build-images.sh"), timeout=BUILD_TIMEOUT)
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture
def container(image: str) -> Iterator[str]:
    name = run("buildah", "from", "--quiet", "--pull-never", image).stdout.strip()
    try:
        yield name
    finally:
        run("buildah", "rm", name, check=False)


def in_container(
    container: str, *argv: str, network: str = "none", root: bool = False
) -> subprocess.CompletedProcess[str]:
    extra = ["--user", "0:0", "--cap-add", "CAP_NET_ADMIN,CAP_NET_RAW"] if root else []
    return run("buildah", "run", "--network", network, *extra, container, "--", *argv, check=False)


@pytest.mark.parametrize("entry_point", ["meshproxy", "controlplane", "meshctl"])
def test_entry_points_run(container: str, entry_point: str) -> None:
    proc = in_container(container, entry_point, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout


def test_runs_as_the_proxy_uid_by_default(container: str) -> None:
    assert in_container(container, "id", "-u").stdout.strip() == "1357"


def test_demo_apps_are_in_the_image(container: str) -> None:
    proc = in_container(
        container,
        "python3",
        "-c",
        "import meshdemo.frontend, meshdemo.catalog, meshdemo.inventory; print('ok')",
    )
    assert proc.stdout.strip() == "ok", proc.stderr


def test_iptables_dry_run(container: str) -> None:
    proc = in_container(container, "meshproxy", "iptables", "install", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "-j REDIRECT --to-ports 15001" in proc.stdout
    assert "--uid-owner 1357" in proc.stdout


@pytest.fixture
def netns() -> Iterator[str]:
    """A network namespace with no interfaces but lo: no route anywhere. Always deleted."""
    name = f"mp-img-{uuid.uuid4().hex[:8]}"
    run("ip", "netns", "add", name)
    try:
        yield name
    finally:
        run("ip", "netns", "delete", name, check=False)


def test_injected_init_container_installs_interception_in_a_pod_namespace(container: str, netns: str) -> None:
    # The exact command the webhook injects (with an exclusion annotation), not a hand-written one.
    review = json.loads((REPO / "tests" / "unit" / "webhook" / "cases" / "native_sidecar.json").read_text())
    pod = review["review"]["request"]["object"]
    pod["metadata"]["annotations"]["meshproxy.io/exclude-outbound-ports"] = "5432"
    template = inject.InjectionTemplate.from_json({"image": "localhost/meshproxy:test"})
    patch = inject.build_patch(pod, template, inject.ClusterInfo((1, 30)))
    init = next(op for op in patch if op["path"] == "/spec/initContainers")["value"][0]
    assert init["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW"]

    # Without the capabilities the init step must fail (and change nothing)...
    denied = run(
        "buildah", "run", "--network", f"ns:/run/netns/{netns}", "--user", "0:0", "--cap-drop", "ALL",
        container, "--", *init["command"], *init["args"], check=False,
    )  # fmt: skip
    assert denied.returncode != 0
    assert "MESH_" not in run("ip", "netns", "exec", netns, "iptables-save", "-t", "nat").stdout

    # ...and with exactly NET_ADMIN + NET_RAW as root it installs the rules.
    proc = in_container(
        container, *init["command"], *init["args"], network=f"ns:/run/netns/{netns}", root=True
    )
    assert proc.returncode == 0, proc.stderr
    rules = run("ip", "netns", "exec", netns, "iptables-save", "-t", "nat").stdout
    assert "-A OUTPUT -p tcp -j MESH_OUTPUT" in rules
    assert "-A PREROUTING -p tcp -j MESH_INBOUND" in rules
    assert "--uid-owner 1357" in rules
    assert "REDIRECT --to-ports 15001" in rules and "REDIRECT --to-ports 15006" in rules
    assert "--dport 5432 -j RETURN" in rules
