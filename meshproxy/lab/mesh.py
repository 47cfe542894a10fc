"""Meshing a lab pod: interception plus a ``meshproxy run`` sidecar from a static snapshot.

Owns: the few steps every lab user (demo, integration tests, benchmarks) repeats to put a
pod in the mesh, the same way the injected init container and sidecar do in a cluster:
``intercept`` (``meshproxy iptables install`` in the pod), ``start_sidecar`` (write the
snapshot as YAML, run the sidecar as the proxy UID, wait for its listeners), and
``admin_get`` (read the sidecar's admin API from inside the pod).

Invariants: the sidecar always runs as ``proxy_uid`` and interception is installed for the
same UID, or the sidecar's own traffic would be redirected back to itself. Configs are
written with only non-default fields (``compact``) and load back to the same snapshot.

Concurrency: synchronous helpers over ``meshproxy.lab.netns.Lab``.
"""

from __future__ import annotations

import dataclasses
import enum
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from meshproxy.config.model import Snapshot
from meshproxy.lab.netns import Lab, LabProcess, Pod

PROXY_UID = 1357
OUTBOUND_PORT, INBOUND_PORT, ADMIN_PORT = 15001, 15006, 15000


def compact(value: Any) -> Any:
    """Plain data for YAML with every field left at its default omitted (``load_dict`` fills them)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if f.name == "version":
                continue
            if f.default is not dataclasses.MISSING and v == f.default:
                continue
            if f.default_factory is not dataclasses.MISSING and v == f.default_factory():
                continue
            out[f.name] = compact(v)
        return out
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list | frozenset):
        return [compact(v) for v in (sorted(value) if isinstance(value, frozenset) else value)]
    return value


def config_yaml(snapshot: Snapshot) -> str:
    return yaml.safe_dump(compact(snapshot), sort_keys=False)


def intercept(lab: Lab, pod: Pod, *flags: str, proxy_uid: int = PROXY_UID) -> None:
    """Install the pod's interception rules (what the init container does)."""
    argv = [sys.executable, "-m", "meshproxy.iptables", "install", "--proxy-uid", str(proxy_uid), *flags]
    lab.exec(pod, argv)


def start_sidecar(
    lab: Lab,
    pod: Pod,
    snapshot: Snapshot,
    *,
    proxy_uid: int = PROXY_UID,
    extra_args: Sequence[str] = (),
    timeout: float = 20.0,
    wait: bool = True,
) -> LabProcess:
    """Write ``snapshot`` next to the lab's logs and run ``meshproxy run --config`` in ``pod``.

    With ``wait`` (default) return once its listeners are up; otherwise call ``wait_sidecar``
    later (to start several sidecars in parallel).
    """
    config = lab.logdir / f"{pod.name}.sidecar.yaml"
    config.write_text(config_yaml(snapshot))
    argv = [sys.executable, "-m", "meshproxy", "run", "--config", str(config), "--pod-ip", pod.ip]
    sidecar = lab.spawn(
        pod, [*argv, "--pod-name", f"{pod.name}-0", *extra_args], name="sidecar", uid=proxy_uid
    )
    if wait:
        wait_sidecar(lab, sidecar, timeout)
    return sidecar


def wait_sidecar(lab: Lab, sidecar: LabProcess, timeout: float = 20.0) -> None:
    """Wait until the sidecar's three listeners accept; fail with its log if it exits first."""
    for port in (OUTBOUND_PORT, INBOUND_PORT, ADMIN_PORT):
        lab.wait_listening(sidecar.pod, port, timeout=timeout, proc=sidecar)


def admin_get(lab: Lab, pod: Pod, path: str, port: int = ADMIN_PORT) -> str:
    """GET the sidecar's admin API from inside ``pod`` (it listens on 127.0.0.1 there)."""
    script = (
        "import sys,urllib.request;"
        f"sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:{port}{path}', timeout=5).read().decode())"
    )
    return lab.exec(pod, [sys.executable, "-c", script]).stdout
