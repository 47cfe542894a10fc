"""The network-namespace lab itself: isolation, names, processes, teardown and crash leftovers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from meshproxy.lab.netns import NETNS_ETC, PREFIX, Lab, cleanup_stale, stale_namespaces, wait_until
from tests.support.require import require_lab

pytestmark = pytest.mark.netns


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_pods_reach_each_other_and_nothing_else(lab: Lab) -> None:
    a, b = lab.add_pod("a"), lab.add_pod("b")
    assert a.ip != b.ip and a.ip.startswith("198.18.0.") and b.ip.startswith("198.18.0.")
    server = lab.spawn(b, [sys.executable, "-m", "meshproxy.lab.probe", "serve", "--name", "b", "8080"])
    lab.wait_listening(b, 8080, proc=server)
    reply = lab.exec(a, [sys.executable, "-m", "meshproxy.lab.probe", "connect", b.ip, "8080"]).stdout
    assert '"name": "b"' in reply and f'"{a.ip}"' in reply
    # No default route: an address outside the lab is unroutable (no packet is sent).
    route = lab.exec(a, ["ip", "route", "get", "192.0.2.1"], check=False)
    assert route.returncode != 0 and "unreachable" in route.stderr
    # Service VIPs are routed to eth0 so that the OUTPUT nat rules can catch connects to them.
    assert "dev eth0" in lab.exec(a, ["ip", "route", "get", "198.19.0.10"]).stdout


def test_hosts_file_and_uid_inside_a_pod(lab: Lab) -> None:
    pod = lab.add_pod("client", hosts={"198.19.0.7": ["catalog.demo", "catalog.demo.svc.cluster.local"]})
    assert (
        lab.exec(pod, ["getent", "hosts", "catalog.demo.svc.cluster.local"]).stdout.split()[0] == "198.19.0.7"
    )
    assert lab.exec(pod, ["id", "-u"], uid=1357).stdout.strip() == "1357"
    # The host's own /etc/hosts is untouched.
    assert "catalog.demo" not in Path("/etc/hosts").read_text()


def test_spawned_process_output_goes_to_its_log(lab: Lab) -> None:
    pod = lab.add_pod("p")
    proc = lab.spawn(
        pod, ["sh", "-c", "echo hello from $(cat /proc/self/net/dev | grep -c eth0)"], name="hello"
    )
    wait_until(lambda: not proc.running(), 10, "the process to exit")
    assert proc.output().strip() == "hello from 1"
    assert proc.log.parent == lab.logdir


def test_close_kills_processes_and_removes_everything(tmp_path: Path) -> None:
    require_lab()
    lab = Lab(workdir=tmp_path / "lab")
    pod = lab.add_pod("p", hosts={"198.19.0.1": ["x.demo"]})
    # A process that ignores SIGTERM and a stray one outside our process group.
    stubborn = lab.spawn(
        pod, ["sh", "-c", "trap '' TERM; echo armed; while :; do sleep 0.1; done"], name="stubborn"
    )
    wait_until(lambda: "armed" in stubborn.output(), 10, "the TERM trap to be set")
    stray = subprocess.Popen(lab.command(pod, ["sleep", "300"]), start_new_session=True)
    ours = {lab.router, pod.netns}
    assert ours <= netns_names()
    lab.close()
    assert stubborn.popen.returncode == -9  # needed the SIGKILL after the grace period
    assert stray.wait(5) is not None
    assert not ours & netns_names()
    assert not (NETNS_ETC / pod.netns).exists()
    lab.close()  # idempotent


def test_parallel_labs_do_not_collide(lab: Lab, tmp_path: Path) -> None:
    with Lab(workdir=tmp_path / "other") as other:
        a1, a2 = lab.add_pod("a"), other.add_pod("a")
        assert a1.netns != a2.netns and a1.ip == a2.ip  # same addresses, separate worlds
        for one in (lab, other):
            one.exec(one.pods["a"], ["ip", "addr", "show", "eth0"])


def test_cleanup_stale_removes_only_dead_runs(lab: Lab) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = f"{PREFIX}{dead.pid}-dead00-router"
    subprocess.run(["ip", "netns", "add", leftover], check=True)
    try:
        assert stale_namespaces([leftover, lab.router, "unrelated"]) == [leftover]
        removed = cleanup_stale()
        assert leftover in removed and lab.router not in removed
        assert leftover not in netns_names() and lab.router in netns_names()
    finally:
        subprocess.run(["ip", "netns", "del", leftover], capture_output=True, check=False)
