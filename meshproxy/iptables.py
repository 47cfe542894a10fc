"""``meshproxy iptables install|cleanup``: the pod's transparent traffic interception.

Owns: the nat-table rule set that sends a pod's TCP traffic through its sidecar
(outbound to port 15001, inbound to port 15006), its settings (flags, with
environment variables as fallback, so an init container can be configured either
way), and applying/removing it with ``iptables-restore --noflush`` (and the same
with ``ip6tables-restore`` when the pod has IPv6). With IPv6 it also owns the inbound
passthrough address ``::6/128`` on ``lo``: 127.0.0.6 is local without configuration (all of
127.0.0.0/8 is on ``lo``), ``::6`` is not, so without it the sidecar could not bind the source
that rule 1 exempts (measured: ``EADDRNOTAVAIL``). It is added over netlink (pyroute2), so the
init container needs no iproute2.

The rule set, for IPv4 (IPv6 is the same with ``::1`` and ``::6``)::

    PREROUTING -p tcp -> MESH_INBOUND
      MESH_INBOUND: admin, health, 15001, 15006 and excluded ports RETURN,
                    the rest (or only the listed inbound ports) -> MESH_IN_REDIRECT
    OUTPUT -p tcp -> MESH_OUTPUT
      1. -o lo -s 127.0.0.6            RETURN   proxy's inbound passthrough source
      2. -o lo ! -d 127.0.0.1, proxy UID -> MESH_INBOUND   proxy -> own pod IP (self call)
      3. -o lo, not proxy UID          RETURN   the app talking to itself
      4. proxy UID                     RETURN   the proxy's own upstream traffic
      5. -d 127.0.0.1                  RETURN
      6. excluded ports, excluded CIDRs RETURN
      7. -> MESH_REDIRECT (all, or only the included CIDRs)
    MESH_REDIRECT: REDIRECT --to-ports 15001;  MESH_IN_REDIRECT: REDIRECT --to-ports 15006

docs/interception.md explains each rule and the cases it exists for.

Invariants:
  * ``build_rules`` is pure: the same settings give byte-identical output (golden tests).
  * Only chains named ``MESH_*`` and the jumps to them from PREROUTING/OUTPUT are ever
    touched: ``cleanup`` removes exactly what ``install`` added and nothing else.
  * ``install`` is one ``iptables-restore`` transaction per family: it flushes our chains,
    drops any earlier jumps and adds the new rules, so installing twice leaves one copy
    and a failure leaves the previous state in place.
  * ``cleanup`` on a pod without our rules does nothing and succeeds.
  * ``::6/128`` is added before the IPv6 rules (a failure leaves those rules as they were) and
    removed by ``cleanup`` only together with our IPv6 rules; adding it twice is a no-op.

Concurrency: none; a short-lived command that runs external programs synchronously.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from meshproxy.core.passthrough import INBOUND_SOURCE_V4, INBOUND_SOURCE_V6

CHAIN_PREFIX = "MESH_"
CHAIN_INBOUND = "MESH_INBOUND"
CHAIN_REDIRECT = "MESH_REDIRECT"
CHAIN_IN_REDIRECT = "MESH_IN_REDIRECT"
CHAIN_OUTPUT = "MESH_OUTPUT"
CHAINS = (CHAIN_INBOUND, CHAIN_REDIRECT, CHAIN_IN_REDIRECT, CHAIN_OUTPUT)

DEFAULT_PROXY_UID = 1357
# UIDs other meshes use for their proxies (Istio 1337, Linkerd 2102, Consul 5678 style
# defaults). We never default to them so a pod that somehow carries two meshes' rules
# does not exempt the other proxy's traffic by accident.
FOREIGN_PROXY_UIDS = frozenset({1337, 2102, 5678})

ENV_PREFIX = "MESHPROXY_"


class IptablesError(Exception):
    """Base of this module's errors; ``main`` turns each into a message and exit code."""

    exit_code = 1


class SettingsError(IptablesError):
    """A flag or environment variable has an invalid value. ``name`` says which."""

    exit_code = 2

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name


class ApplyError(IptablesError):
    """An iptables command failed; carries the command and its stderr."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        super().__init__(f"{' '.join(argv)} exited {returncode}: {stderr.strip()}")
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr


@dataclass(frozen=True, slots=True)
class InterceptSettings:
    """What to intercept. ``None`` for a port/CIDR list means ``*`` (everything)."""

    proxy_uid: int = DEFAULT_PROXY_UID
    outbound_port: int = 15001
    inbound_port: int = 15006
    # The admin port serves /ready and /metrics to the kubelet and Prometheus: redirecting
    # it to the inbound listener would send probes through the proxy to the app.
    admin_port: int = 15000
    health_ports: tuple[int, ...] = ()
    inbound_ports: tuple[int, ...] | None = None
    exclude_inbound_ports: tuple[int, ...] = ()
    exclude_outbound_ports: tuple[int, ...] = ()
    exclude_outbound_cidrs: tuple[str, ...] = ()
    include_outbound_cidrs: tuple[str, ...] | None = None
    # Source address of the sidecar's inbound forwarding to a non-loopback app address
    # (``meshproxy.core.passthrough``); rule 1 lets that connection out instead of looping
    # it back to 15006.
    inbound_passthrough_v4: str = INBOUND_SOURCE_V4
    inbound_passthrough_v6: str = INBOUND_SOURCE_V6
    ipv6: bool | None = None  # None: apply IPv6 rules when the pod has IPv6

    @property
    def never_redirected(self) -> tuple[int, ...]:
        """Inbound ports that always reach their listener directly."""
        return tuple(sorted({self.admin_port, self.outbound_port, self.inbound_port, *self.health_ports}))


@dataclass(frozen=True, slots=True)
class Family:
    name: str  # "ipv4" / "ipv6"
    version: int
    loopback: str
    passthrough: str
    restore: str
    save: str


def families(settings: InterceptSettings) -> tuple[Family, Family]:
    return (
        Family(
            "ipv4",
            4,
            "127.0.0.1/32",
            f"{settings.inbound_passthrough_v4}/32",
            "iptables-restore",
            "iptables-save",
        ),
        Family(
            "ipv6",
            6,
            "::1/128",
            f"{settings.inbound_passthrough_v6}/128",
            "ip6tables-restore",
            "ip6tables-save",
        ),
    )


def _cidrs_of(cidrs: Iterable[str], version: int) -> list[str]:
    return [c for c in cidrs if ipaddress.ip_network(c, strict=False).version == version]


def build_rules(settings: InterceptSettings, family: Family, existing_jumps: Sequence[str] = ()) -> str:
    """The ``iptables-restore --noflush`` input that installs interception.

    ``existing_jumps`` are ``-A PREROUTING|OUTPUT ... -j MESH_*`` lines found in the current
    table (see ``find_jumps``); they are deleted in the same transaction so a second install
    does not leave two jumps behind.
    """
    uid = str(settings.proxy_uid)
    lines = ["*nat", *(f":{chain} - [0:0]" for chain in CHAINS)]
    lines += ["-D" + jump[2:] for jump in existing_jumps]
    lines += [
        f"-A {CHAIN_REDIRECT} -p tcp -j REDIRECT --to-ports {settings.outbound_port}",
        f"-A {CHAIN_IN_REDIRECT} -p tcp -j REDIRECT --to-ports {settings.inbound_port}",
        f"-A PREROUTING -p tcp -j {CHAIN_INBOUND}",
    ]
    skip = sorted(set(settings.never_redirected) | set(settings.exclude_inbound_ports))
    if settings.inbound_ports is None:
        lines += [f"-A {CHAIN_INBOUND} -p tcp --dport {p} -j RETURN" for p in skip]
        lines.append(f"-A {CHAIN_INBOUND} -p tcp -j {CHAIN_IN_REDIRECT}")
    else:
        lines += [
            f"-A {CHAIN_INBOUND} -p tcp --dport {p} -j {CHAIN_IN_REDIRECT}"
            for p in sorted(set(settings.inbound_ports) - set(skip))
        ]
    lines += [
        f"-A OUTPUT -p tcp -j {CHAIN_OUTPUT}",
        f"-A {CHAIN_OUTPUT} -o lo -s {family.passthrough} -j RETURN",
        f"-A {CHAIN_OUTPUT} ! -d {family.loopback} -o lo -m owner --uid-owner {uid} -j {CHAIN_INBOUND}",
        f"-A {CHAIN_OUTPUT} -o lo -m owner ! --uid-owner {uid} -j RETURN",
        f"-A {CHAIN_OUTPUT} -m owner --uid-owner {uid} -j RETURN",
        f"-A {CHAIN_OUTPUT} -d {family.loopback} -j RETURN",
    ]
    lines += [
        f"-A {CHAIN_OUTPUT} -p tcp --dport {p} -j RETURN"
        for p in sorted(set(settings.exclude_outbound_ports))
    ]
    lines += [
        f"-A {CHAIN_OUTPUT} -d {c} -j RETURN"
        for c in _cidrs_of(settings.exclude_outbound_cidrs, family.version)
    ]
    if settings.include_outbound_cidrs is None:
        lines.append(f"-A {CHAIN_OUTPUT} -j {CHAIN_REDIRECT}")
    else:
        lines += [
            f"-A {CHAIN_OUTPUT} -d {c} -j {CHAIN_REDIRECT}"
            for c in _cidrs_of(settings.include_outbound_cidrs, family.version)
        ]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def find_jumps(saved: str) -> list[str]:
    """``-A`` lines of PREROUTING/OUTPUT in ``iptables-save -t nat`` output that jump to our chains."""
    jumps = []
    for line in saved.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0] == "-A" and parts[1] in ("PREROUTING", "OUTPUT"):
            target = parts[parts.index("-j") + 1] if "-j" in parts[:-1] else ""
            if target.startswith(CHAIN_PREFIX):
                jumps.append(line.strip())
    return jumps


def find_chains(saved: str) -> list[str]:
    """Our chains declared in ``iptables-save -t nat`` output."""
    return [
        line[1:].split()[0]
        for line in saved.splitlines()
        if line.startswith(":") and line[1:].split()[0].startswith(CHAIN_PREFIX)
    ]


def build_cleanup(saved: str) -> str | None:
    """The restore input that removes our jumps and chains, or None if there is nothing to remove.

    Chains are re-declared first, which flushes them, so ``-X`` finds them empty even when
    they reference each other.
    """
    chains = find_chains(saved)
    jumps = find_jumps(saved)
    if not chains and not jumps:
        return None
    lines = ["*nat", *(f":{chain} - [0:0]" for chain in chains)]
    lines += ["-D" + jump[2:] for jump in jumps]
    lines += [f"-X {chain}" for chain in chains]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


# --- applying -------------------------------------------------------------------------

Runner = Callable[[Sequence[str], str | None], "subprocess.CompletedProcess[str]"]


def run_command(argv: Sequence[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), input=stdin, capture_output=True, text=True, check=False)


def _checked(runner: Runner, argv: Sequence[str], stdin: str | None = None) -> str:
    try:
        done = runner(argv, stdin)
    except FileNotFoundError as exc:
        raise ApplyError(argv, 127, f"{argv[0]} not found (install the iptables package)") from exc
    if done.returncode != 0:
        raise ApplyError(argv, done.returncode, done.stderr)
    return done.stdout


class Loopback(Protocol):
    """Addresses on the pod's ``lo`` (a seam: unit tests pass a fake, pods get netlink)."""

    def add(self, address: str, prefixlen: int) -> bool:
        """Add ``address/prefixlen``; False if it was already there."""

    def remove(self, address: str, prefixlen: int) -> bool:
        """Remove ``address/prefixlen``; False if it was not there."""


_IFA_F_NODAD = 0x02  # linux/if_addr.h: usable at once; nothing else on lo can hold it


class NetlinkLoopback:
    """IPv6 addresses on ``lo`` of the calling process's network namespace, over netlink."""

    def _change(self, command: str, address: str, prefixlen: int, benign: int) -> bool:
        import errno

        # Imported here: only install/cleanup with IPv6 need it, never the sidecar.
        from pyroute2 import IPRoute, NetlinkError  # type: ignore[import-untyped]

        argv = ("netlink", "addr", command, f"{address}/{prefixlen}", "dev", "lo")
        try:
            with IPRoute() as ipr:
                (index,) = ipr.link_lookup(ifname="lo")
                flags = {"flags": _IFA_F_NODAD} if command == "add" else {}
                ipr.addr(command, index=index, address=address, prefixlen=prefixlen, **flags)
        except NetlinkError as exc:
            if exc.code == benign:
                return False
            hint = " (is IPv6 disabled on lo? --ipv6 off)" if exc.code == errno.EACCES else ""
            raise ApplyError(argv, exc.code, f"{errno.errorcode.get(exc.code, exc.code)}{hint}") from exc
        return True

    def add(self, address: str, prefixlen: int) -> bool:
        return self._change("add", address, prefixlen, benign=17)  # EEXIST

    def remove(self, address: str, prefixlen: int) -> bool:
        return self._change("del", address, prefixlen, benign=99)  # EADDRNOTAVAIL


def ipv6_available(runner: Runner, proc: Path = Path("/proc")) -> bool:
    """True when the pod has IPv6 on ``lo`` and the kernel has the ip6tables nat table.

    ``disable_ipv6`` on ``lo`` (some clusters set it for every pod) means no ``::1`` and no
    way to add the passthrough address: such a pod has no IPv6 to intercept.
    """
    if not (proc / "net" / "if_inet6").exists():
        return False
    disabled = proc / "sys" / "net" / "ipv6" / "conf" / "lo" / "disable_ipv6"
    if disabled.exists() and disabled.read_text().strip() == "1":
        return False
    try:
        return runner(["ip6tables-save", "-t", "nat"], None).returncode == 0
    except FileNotFoundError:
        return False


def _active_families(settings: InterceptSettings, runner: Runner) -> list[Family]:
    v4, v6 = families(settings)
    want_v6 = ipv6_available(runner) if settings.ipv6 is None else settings.ipv6
    return [v4, v6] if want_v6 else [v4]


def install(
    settings: InterceptSettings, runner: Runner = run_command, loopback: Loopback | None = None
) -> dict[str, str]:
    """Install (or replace) the rules; returns the restore input applied per family."""
    applied = {}
    for family in _active_families(settings, runner):
        saved = _checked(runner, [family.save, "-t", "nat"])
        rules = build_rules(settings, family, find_jumps(saved))
        if family.version == 6:
            (loopback or NetlinkLoopback()).add(settings.inbound_passthrough_v6, 128)
        _checked(runner, [family.restore, "--noflush"], rules)
        applied[family.name] = rules
    return applied


def cleanup(
    settings: InterceptSettings, runner: Runner = run_command, loopback: Loopback | None = None
) -> dict[str, str]:
    """Remove our rules; returns the restore input applied per family (empty if none were there)."""
    applied = {}
    for family in _active_families(settings, runner):
        saved = _checked(runner, [family.save, "-t", "nat"])
        rules = build_cleanup(saved)
        if rules is not None:
            _checked(runner, [family.restore, "--noflush"], rules)
            if family.version == 6:
                (loopback or NetlinkLoopback()).remove(settings.inbound_passthrough_v6, 128)
            applied[family.name] = rules
    return applied


# --- settings from flags and environment ------------------------------------------------


def _parse_port(name: str, text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise SettingsError(name, f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise SettingsError(name, f"port out of range: {port}")
    return port


def parse_ports(name: str, text: str) -> tuple[int, ...] | None:
    """``"8080, 9090"`` -> (8080, 9090); ``"*"`` -> None (all); ``""`` -> ()."""
    text = text.strip()
    if text == "*":
        return None
    return tuple(sorted({_parse_port(name, p.strip()) for p in text.split(",") if p.strip()}))


def parse_cidrs(name: str, text: str) -> tuple[str, ...] | None:
    """``"10.0.0.0/8,fd00::/8"`` -> normalised CIDRs; ``"*"`` -> None (all); ``""`` -> ()."""
    text = text.strip()
    if text == "*":
        return None
    out = []
    for item in (c.strip() for c in text.split(",")):
        if not item:
            continue
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise SettingsError(name, f"not a CIDR: {item!r}") from None
    return tuple(dict.fromkeys(out))


# flag dest -> (environment variable, help). The webhook passes flags; env vars let the same
# image be configured from a ConfigMap or by hand.
_LIST_SETTINGS: dict[str, tuple[str, str]] = {
    "inbound_ports": (
        "INBOUND_PORTS",
        "inbound ports to intercept, comma separated, or * for all (default *)",
    ),
    "exclude_inbound_ports": ("EXCLUDE_INBOUND_PORTS", "inbound ports never intercepted"),
    "exclude_outbound_ports": ("EXCLUDE_OUTBOUND_PORTS", "outbound destination ports never intercepted"),
    "exclude_outbound_cidrs": ("EXCLUDE_OUTBOUND_CIDRS", "outbound destination CIDRs never intercepted"),
    "include_outbound_cidrs": (
        "INCLUDE_OUTBOUND_CIDRS",
        "only these outbound CIDRs are intercepted, or * for all (default *)",
    ),
    "health_ports": ("HEALTH_PORTS", "extra inbound ports never intercepted (kubelet probes)"),
}
_INT_SETTINGS: dict[str, tuple[str, str]] = {
    "proxy_uid": (
        "PROXY_UID",
        f"UID the sidecar runs as; its traffic is not redirected (default {DEFAULT_PROXY_UID})",
    ),
    "outbound_port": ("OUTBOUND_PORT", "the sidecar's outbound listener (default 15001)"),
    "inbound_port": ("INBOUND_PORT", "the sidecar's inbound listener (default 15006)"),
    "admin_port": ("ADMIN_PORT", "the sidecar's admin port, never intercepted (default 15000)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["install", "cleanup"])
    parser.add_argument(
        "--dry-run", action="store_true", help="print the iptables-restore input, change nothing"
    )
    parser.add_argument(
        "--ipv6",
        choices=["auto", "on", "off"],
        default=None,
        help="apply IPv6 rules too (default auto: when the pod has IPv6); env MESHPROXY_IPV6",
    )
    for dest, (env, text) in {**_INT_SETTINGS, **_LIST_SETTINGS}.items():
        flag = "--" + dest.replace("_", "-")
        parser.add_argument(flag, dest=dest, default=None, help=f"{text}; env {ENV_PREFIX}{env}")


def settings_from(args: argparse.Namespace, env: Mapping[str, str]) -> InterceptSettings:
    """Flags win over ``MESHPROXY_*`` environment variables, which win over defaults."""

    def raw(dest: str, env_name: str) -> tuple[str, str | None]:
        value = getattr(args, dest, None)
        if value is not None:
            return "--" + dest.replace("_", "-"), str(value)
        return ENV_PREFIX + env_name, env.get(ENV_PREFIX + env_name)

    kwargs: dict[str, object] = {}
    for dest, (env_name, _) in _INT_SETTINGS.items():
        name, value = raw(dest, env_name)
        if value is not None:
            if dest == "proxy_uid":
                if not value.strip().isdigit() or int(value) == 0:
                    # UID 0 would exempt every root process (usually the app) from interception.
                    raise SettingsError(name, f"not a non-root UID: {value!r}")
                kwargs[dest] = int(value)
            else:
                kwargs[dest] = _parse_port(name, value)
    for dest, (env_name, _) in _LIST_SETTINGS.items():
        name, value = raw(dest, env_name)
        if value is None:
            continue
        parsed = parse_cidrs(name, value) if dest.endswith("cidrs") else parse_ports(name, value)
        if parsed is None and dest not in ("inbound_ports", "include_outbound_cidrs"):
            raise SettingsError(name, "* is not allowed here")
        kwargs[dest] = parsed
    name, ipv6 = raw("ipv6", "IPV6")
    if ipv6 is not None:
        if ipv6 not in ("auto", "on", "off"):
            raise SettingsError(name, f"expected auto, on or off, got {ipv6!r}")
        kwargs["ipv6"] = {"auto": None, "on": True, "off": False}[ipv6]
    return InterceptSettings(**kwargs)  # type: ignore[arg-type]


def main(args: argparse.Namespace) -> int:
    try:
        settings = settings_from(args, os.environ)
        if args.dry_run:
            for family in families(settings):
                if args.action == "install":
                    if family.version == 6:
                        print(f"# first: {settings.inbound_passthrough_v6}/128 on lo (netlink), if absent")
                    print(f"# {family.restore} --noflush", build_rules(settings, family), sep="\n")
                else:
                    print(
                        f"# {family.restore} --noflush: delete the {CHAIN_PREFIX}* chains and the jumps to them"
                    )
            return 0
        if settings.proxy_uid in FOREIGN_PROXY_UIDS:
            print(
                f"meshproxy iptables: warning: proxy UID {settings.proxy_uid} is another mesh's default",
                file=sys.stderr,
            )
        done = install(settings) if args.action == "install" else cleanup(settings)
    except IptablesError as exc:
        print(f"meshproxy iptables {args.action}: {exc}", file=sys.stderr)
        return exc.exit_code
    what = "installed" if args.action == "install" else ("removed" if done else "nothing to remove")
    print(f"meshproxy iptables {args.action}: {what} ({', '.join(done) or 'no families changed'})")
    return 0


if __name__ == "__main__":  # `python -m meshproxy.iptables install` (init containers, the lab)
    _parser = argparse.ArgumentParser(prog="meshproxy iptables")
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
