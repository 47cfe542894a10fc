"""A network-namespace lab: "pods" joined by a bridge, for integration tests, benchmarks and the demo.

Owns: creating and tearing down the namespaces, links, addresses, routes and per-namespace
``/etc/hosts`` of one lab, and the processes it runs inside its pods.

Topology (everything lives in namespaces this lab created; the host's interfaces, routes
and iptables are never touched)::

    netns <prefix>-router:  br0 198.18.0.1/24  ── v1 ─┐  ── v2 ─┐ ...
    netns <prefix>-<pod>:   eth0 198.18.0.N/24 ◀──────┘         (veth pair, peer in the router ns)
                            lo up; routes: 198.18.0.0/24 (connected) and the service VIP range
                            198.19.0.0/24 via eth0; no default route, so nothing leaves the lab.
                            IPv6 likewise, when the kernel has it: 2001:2::N/64, VIPs 2001:2:0:1::/64.

The VIP route exists only so that ``connect()`` to a service VIP finds a route: the pod's
OUTPUT nat rules then REDIRECT it to the sidecar before a packet is ever sent. A VIP that is
not intercepted goes nowhere (no host answers it), which is what a test of "bypass" expects.

Invariants:
  * Every name this lab creates starts with ``mplab-<pid>-<random>-``, so parallel runs never
    collide and leftovers of a crashed run can be found and removed (``cleanup_stale``).
    Interface names need no prefix: they live inside the lab's own namespaces.
  * ``Lab.close`` is idempotent, runs at interpreter exit too, and tolerates half-built labs;
    it kills the lab's processes (process groups, then anything left in its namespaces)
    before deleting the namespaces.
  * Addresses come from 198.18.0.0/15 (RFC 2544 benchmarking range), never routable outside.

Concurrency: synchronous, for one thread; external commands (``ip``, ``setpriv``) run to
completion. Processes started with ``spawn`` run concurrently and are owned by the lab.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "mplab-"
NETNS_ETC = Path("/etc/netns")  # `ip netns exec` bind-mounts files from here over /etc
DEFAULT_POD_SUBNET = "198.18.0.0/24"
DEFAULT_VIP_SUBNET = "198.19.0.0/24"
# IPv6 twins from the RFC 5180 benchmarking range (2001:2::/48), same roles as above.
DEFAULT_POD_SUBNET6 = "2001:2::/64"
DEFAULT_VIP_SUBNET6 = "2001:2:0:1::/64"


class LabError(Exception):
    """Base of the lab's errors."""


class LabUnavailableError(LabError):
    """The machine cannot host a lab (not root, no ``ip netns``). ``reason`` is for a skip message."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CommandError(LabError):
    def __init__(self, argv: Sequence[str], returncode: int, output: str) -> None:
        super().__init__(f"{' '.join(argv)} exited {returncode}: {output.strip()}")
        self.argv = tuple(argv)
        self.returncode = returncode
        self.output = output


def unavailable_reason() -> str | None:
    """Why a lab cannot be built here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth, iptables)"
    if shutil.which("ip") is None:
        return "needs iproute2 (`ip`)"
    if subprocess.run(["ip", "netns", "list"], capture_output=True, check=False).returncode != 0:
        return "`ip netns` is not usable here"
    if shutil.which("setpriv") is None:
        return "needs setpriv (util-linux) to run processes as another UID"
    return None


def _run(
    argv: Sequence[str], *, check: bool = True, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise CommandError(argv, done.returncode, done.stderr + done.stdout)
    return done


def wait_until(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``condition`` until true; raise ``TimeoutError`` naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


@dataclass(frozen=True, slots=True)
class Pod:
    name: str  # short name, e.g. "frontend"
    netns: str  # the namespace's full name
    ip: str
    index: int
    ip6: str = ""  # empty when the lab has no IPv6


@dataclass(slots=True)
class LabProcess:
    """A process running in a pod, owned by the lab; its stdout+stderr go to ``log``."""

    name: str
    pod: Pod
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, timeout: float = 3.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after ``timeout``; returns the exit code."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout)
        return self.popen.returncode


@dataclass
class Lab:
    """One lab: a router namespace with a bridge and any number of pods. Use as a context manager."""

    workdir: Path | None = None
    pod_subnet: str = DEFAULT_POD_SUBNET
    vip_subnet: str = DEFAULT_VIP_SUBNET
    pod_subnet6: str | None = DEFAULT_POD_SUBNET6  # None: IPv4 only
    vip_subnet6: str = DEFAULT_VIP_SUBNET6
    run_id: str = field(default_factory=lambda: f"{os.getpid()}-{secrets.token_hex(3)}")
    pods: dict[str, Pod] = field(default_factory=dict)
    processes: list[LabProcess] = field(default_factory=list)
    _created: list[str] = field(default_factory=list)  # namespaces, in creation order
    _closed: bool = False
    _own_workdir: bool = False

    def __post_init__(self) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise LabUnavailableError(reason)
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{self.run_id}-"))
            self._own_workdir = True
        # Processes may run as the proxy UID and must read configs written here.
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o755)
        self._net = ipaddress.ip_network(self.pod_subnet)
        self._net6 = ipaddress.ip_network(self.pod_subnet6) if self.pod_subnet6 and _ipv6_enabled() else None
        atexit.register(self.close)
        try:
            self._create_router()
        except BaseException:
            self.close()
            raise

    # --- names and topology ---------------------------------------------------------

    @property
    def prefix(self) -> str:
        return f"{PREFIX}{self.run_id}-"

    @property
    def router(self) -> str:
        return self.prefix + "router"

    @property
    def gateway(self) -> str:
        return str(self._net.network_address + 1)

    @property
    def logdir(self) -> Path:
        assert self.workdir is not None
        return self.workdir

    def _add_netns(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self._created.append(name)
        _run(["ip", "-n", name, "link", "set", "lo", "up"])

    def _create_router(self) -> None:
        self._add_netns(self.router)
        r = ["ip", "-n", self.router]
        _run([*r, "link", "add", "br0", "type", "bridge"])
        _run([*r, "addr", "add", f"{self.gateway}/{self._net.prefixlen}", "dev", "br0"])
        if self._net6 is not None:
            # nodad: usable at once, no duplicate-address-detection wait (nothing else is on this bridge).
            _run(
                [
                    *r,
                    "addr",
                    "add",
                    f"{self._net6.network_address + 1}/{self._net6.prefixlen}",
                    "dev",
                    "br0",
                    "nodad",
                ]
            )
        _run([*r, "link", "set", "br0", "up"])

    def add_pod(self, name: str, hosts: Mapping[str, Iterable[str]] | None = None) -> Pod:
        """A namespace ``<prefix><name>`` with eth0 on the bridge, the next free pod address,
        and routes for the pod subnet and the VIP range only."""
        if name in self.pods:
            raise LabError(f"pod {name!r} already exists")
        index = len(self.pods) + 2  # .1 is the router
        ip = str(self._net.network_address + index)
        ip6 = str(self._net6.network_address + index) if self._net6 is not None else ""
        pod = Pod(name=name, netns=self.prefix + name, ip=ip, index=index, ip6=ip6)
        self._add_netns(pod.netns)
        veth = f"v{index}"
        r = ["ip", "-n", self.router]
        _run([*r, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", pod.netns])
        _run([*r, "link", "set", veth, "master", "br0", "up"])
        p = ["ip", "-n", pod.netns]
        _run([*p, "addr", "add", f"{ip}/{self._net.prefixlen}", "dev", "eth0"])
        _run([*p, "link", "set", "eth0", "up"])
        _run([*p, "route", "add", self.vip_subnet, "dev", "eth0"])
        if self._net6 is not None:
            _run([*p, "addr", "add", f"{ip6}/{self._net6.prefixlen}", "dev", "eth0", "nodad"])
            _run([*p, "-6", "route", "add", self.vip_subnet6, "dev", "eth0"])
        self.pods[name] = pod
        if hosts is not None:
            self.set_hosts(pod, hosts)
        return pod

    def set_hosts(self, pod: Pod, hosts: Mapping[str, Iterable[str]]) -> None:
        """Write ``/etc/hosts`` as processes in this pod see it: ``{address: [names...]}``."""
        etc = NETNS_ETC / pod.netns
        etc.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost", f"{pod.ip} {pod.name}"]
        lines += [f"{addr} {' '.join(names)}" for addr, names in hosts.items()]
        (etc / "hosts").write_text("\n".join(lines) + "\n")

    # --- processes ------------------------------------------------------------------

    def command(self, pod: Pod, argv: Sequence[str], uid: int | None = None) -> list[str]:
        """The argv that runs ``argv`` inside ``pod`` (as ``uid`` if given)."""
        prefix = ["ip", "netns", "exec", pod.netns]
        if uid is not None:
            # CAP_DAC_READ_SEARCH (read-only) lets the process read the interpreter and code where
            # they live on a developer machine (e.g. pyenv under a 0700 /root); without it the
            # interpreter silently falls back to the system's stdlib. Only file reads are widened:
            # the iptables owner match still sees ``uid``.
            prefix += [
                "setpriv",
                f"--reuid={uid}",
                f"--regid={uid}",
                "--clear-groups",
                "--inh-caps=+dac_read_search",
                "--ambient-caps=+dac_read_search",
            ]
        return [*prefix, *argv]

    def exec(
        self,
        pod: Pod,
        argv: Sequence[str],
        *,
        uid: int | None = None,
        stdin: str | None = None,
        timeout: float = 30.0,
        check: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in ``pod`` to completion; stdout and stderr are captured."""
        cmd = self.command(pod, argv, uid)
        done = subprocess.run(
            cmd,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=None if env is None else {**os.environ, **env},
        )
        if check and done.returncode != 0:
            raise CommandError(cmd, done.returncode, done.stderr + done.stdout)
        return done

    def spawn(
        self,
        pod: Pod,
        argv: Sequence[str],
        *,
        name: str | None = None,
        uid: int | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> LabProcess:
        """Start a long-running process in ``pod``; output goes to ``<workdir>/<pod>.<name>.log``."""
        label = name or Path(argv[0]).name
        log = self.logdir / f"{pod.name}.{label}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                self.command(pod, argv, uid),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() kills children too
                env=None if env is None else {**os.environ, **env},
                cwd=cwd,
            )
        proc = LabProcess(name=label, pod=pod, popen=popen, log=log)
        self.processes.append(proc)
        return proc

    def listening(self, pod: Pod, port: int) -> bool:
        """True when something in ``pod`` listens on TCP ``port``."""
        done = self.exec(pod, ["ss", "-Hltn", f"sport = :{port}"], check=False)
        return done.returncode == 0 and bool(done.stdout.strip())

    def wait_listening(
        self, pod: Pod, port: int, timeout: float = 10.0, proc: LabProcess | None = None
    ) -> None:
        """Wait for a listener on ``port`` in ``pod``; fail early (with its log) if ``proc`` exits."""

        def ready() -> bool:
            if proc is not None and not proc.running():
                raise LabError(
                    f"{proc.name} in {pod.name} exited {proc.popen.returncode}:\n{proc.output()[-2000:]}"
                )
            return self.listening(pod, port)

        wait_until(ready, timeout, f"port {port} in pod {pod.name}")

    # --- teardown -------------------------------------------------------------------

    def close(self) -> None:
        """Kill the lab's processes and delete its namespaces. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        for proc in reversed(self.processes):
            proc.stop()
        for netns in reversed(self._created):
            _delete_netns(netns)
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _delete_netns(netns: str) -> None:
    """Kill whatever still runs in ``netns``, delete it (its veths go with it) and its /etc files."""
    pids = _run(["ip", "netns", "pids", netns], check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    _run(["ip", "netns", "del", netns], check=False)
    shutil.rmtree(NETNS_ETC / netns, ignore_errors=True)


def _ipv6_enabled() -> bool:
    return Path("/proc/net/if_inet6").exists()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_namespaces(names: Iterable[str]) -> list[str]:
    """Lab namespaces among ``names`` whose creating process is gone."""
    stale = []
    for name in names:
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or not _pid_alive(int(pid)):
            stale.append(name)
    return stale


def cleanup_stale() -> list[str]:
    """Remove namespaces (and /etc/netns dirs) left by lab runs whose process died; returns their names."""
    listed = _run(["ip", "netns", "list"], check=False).stdout.splitlines()
    names = {line.split()[0] for line in listed if line.strip()}
    if NETNS_ETC.is_dir():
        names |= {p.name for p in NETNS_ETC.iterdir() if p.name.startswith(PREFIX)}
    removed = stale_namespaces(sorted(names))
    for name in removed:
        _delete_netns(name)
    return removed
