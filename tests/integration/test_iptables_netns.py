"""``meshproxy iptables`` rules on a real kernel, in lab pods, checked with the probe server.

Each pod runs two probe servers standing in for the real processes: the "app" (root) on
its app ports and the "proxy" (the proxy UID) on 15001/15006. Every connection is answered
with the listener that accepted it and its SO_ORIGINAL_DST, so a test sees exactly which
process a connection reached and where the app meant it to go.
"""

from __future__ import annotations

import ipaddress
import json
import sys
from dataclasses import dataclass
from typing import Any

import pytest

from meshproxy.lab.netns import Lab, Pod

pytestmark = [pytest.mark.netns, pytest.mark.usefixtures("iptables_available")]

PROXY_UID = 1357
APP_PORT = 8080
SIDE_PORT = 9090  # a second app port, used for exclusions
VIP = "198.19.0.10"


@dataclass
class Pair:
    lab: Lab
    a: Pod
    b: Pod

    def install(self, pod: Pod, *flags: str) -> None:
        self.lab.exec(pod, [sys.executable, "-m", "meshproxy.iptables", "install", *flags])

    def connect(
        self, pod: Pod, host: str, port: int, *, uid: int | None = None, source: str | None = None
    ) -> Any:
        argv = [sys.executable, "-m", "meshproxy.lab.probe", "connect", host, str(port), "--timeout", "2"]
        if source:
            argv += ["--source", source]
        done = self.lab.exec(pod, argv, uid=uid, check=False)
        return json.loads(done.stdout)


def _start_probes(lab: Lab, pod: Pod) -> None:
    app = lab.spawn(
        pod,
        [sys.executable, "-m", "meshproxy.lab.probe", "serve", "--name", f"{pod.name}-app", "8080", "9090"],
        name="app",
    )
    admin = lab.spawn(
        pod,
        [sys.executable, "-m", "meshproxy.lab.probe", "serve", "--name", f"{pod.name}-admin", "15000"],
        name="admin",
        uid=PROXY_UID,
    )
    proxy = lab.spawn(
        pod,
        [
            sys.executable,
            "-m",
            "meshproxy.lab.probe",
            "serve",
            "--name",
            f"{pod.name}-proxy",
            "15001",
            "15006",
        ],
        name="proxy",
        uid=PROXY_UID,
    )
    for port, proc in ((APP_PORT, app), (SIDE_PORT, app), (15000, admin), (15001, proxy), (15006, proxy)):
        lab.wait_listening(pod, port, proc=proc)


@pytest.fixture
def pair(lab: Lab) -> Pair:
    a, b = lab.add_pod("a"), lab.add_pod("b")
    for pod in (a, b):
        _start_probes(lab, pod)
    p = Pair(lab, a, b)
    p.install(a)
    p.install(b, "--exclude-inbound-ports", str(SIDE_PORT))
    return p


def reached(reply: Any) -> tuple[str, int, tuple[str, int] | None]:
    """(who answered, on which listener, original destination if REDIRECT rewrote it else None)."""
    assert "error" not in reply, reply
    dst = reply["original_dst"]
    rewritten = dst is not None and dst != reply["local"]
    return reply["name"], reply["listener"], (dst[0], dst[1]) if rewritten else None


def test_app_outbound_lands_on_15001_with_original_destination(pair: Pair) -> None:
    a, b = pair.a, pair.b
    assert reached(pair.connect(a, b.ip, APP_PORT)) == ("a-proxy", 15001, (b.ip, APP_PORT))
    # A service VIP: nothing owns it, the OUTPUT rule catches the connect before routing matters.
    assert reached(pair.connect(a, VIP, 80)) == ("a-proxy", 15001, (VIP, 80))


def test_proxy_uid_is_not_redirected_and_peer_inbound_lands_on_15006(pair: Pair) -> None:
    a, b = pair.a, pair.b
    # The proxy's upstream connection leaves pod A untouched and is caught by B's inbound rules.
    reply = pair.connect(a, b.ip, APP_PORT, uid=PROXY_UID)
    assert reached(reply) == ("b-proxy", 15006, (b.ip, APP_PORT))
    assert reply["peer"][0] == a.ip


def test_admin_and_excluded_inbound_ports_reach_their_listener_directly(pair: Pair) -> None:
    a, b = pair.a, pair.b
    assert reached(pair.connect(a, b.ip, 15000, uid=PROXY_UID)) == ("b-admin", 15000, None)
    assert reached(pair.connect(a, b.ip, SIDE_PORT, uid=PROXY_UID)) == ("b-app", SIDE_PORT, None)


def test_excluded_outbound_ports_and_cidrs_bypass_the_proxy(pair: Pair) -> None:
    a, b = pair.a, pair.b
    pair.install(a, "--exclude-outbound-ports", str(SIDE_PORT), "--exclude-outbound-cidrs", f"{b.ip}/32")
    # Excluded port: straight to B's app (9090 is also excluded inbound on B).
    assert reached(pair.connect(a, b.ip, SIDE_PORT)) == ("b-app", SIDE_PORT, None)
    # Excluded CIDR: leaves A unredirected, so B's inbound interception is what answers.
    assert reached(pair.connect(a, b.ip, APP_PORT)) == ("b-proxy", 15006, (b.ip, APP_PORT))
    # Other destinations are still intercepted.
    assert reached(pair.connect(a, VIP, 80)) == ("a-proxy", 15001, (VIP, 80))


def test_include_outbound_cidrs_limits_interception(pair: Pair) -> None:
    a, b = pair.a, pair.b
    pair.install(a, "--include-outbound-cidrs", "198.19.0.0/24")
    assert reached(pair.connect(a, VIP, 80)) == ("a-proxy", 15001, (VIP, 80))
    assert reached(pair.connect(a, b.ip, APP_PORT)) == ("b-proxy", 15006, (b.ip, APP_PORT))


def test_loopback_and_self_calls(pair: Pair) -> None:
    b = pair.b
    # The app talking to itself, on localhost or on its own pod IP, is left alone.
    assert reached(pair.connect(b, "127.0.0.1", APP_PORT)) == ("b-app", APP_PORT, None)
    assert reached(pair.connect(b, b.ip, APP_PORT)) == ("b-app", APP_PORT, None)
    # The proxy forwarding inbound traffic to the app over 127.0.0.1 is not looped back.
    assert reached(pair.connect(b, "127.0.0.1", APP_PORT, uid=PROXY_UID)) == ("b-app", APP_PORT, None)
    # App -> own service VIP goes to the outbound listener; the proxy then picks this pod's
    # own IP as the endpoint, and that hop must enter the inbound side like any peer's would.
    assert reached(pair.connect(b, VIP, 80)) == ("b-proxy", 15001, (VIP, 80))
    assert reached(pair.connect(b, b.ip, APP_PORT, uid=PROXY_UID)) == ("b-proxy", 15006, (b.ip, APP_PORT))
    # ... except from the inbound passthrough source, which forwards to a non-loopback app address.
    assert reached(pair.connect(b, b.ip, APP_PORT, uid=PROXY_UID, source="127.0.0.6")) == (
        "b-app",
        APP_PORT,
        None,
    )
    # Excluded inbound ports stay excluded on the self-call path too.
    assert reached(pair.connect(b, b.ip, SIDE_PORT, uid=PROXY_UID)) == ("b-app", SIDE_PORT, None)


def _nat_rules(lab: Lab, pod: Pod, tool: str = "iptables-save") -> list[str]:
    return [
        line
        for line in lab.exec(pod, [tool, "-t", "nat"]).stdout.splitlines()
        if line.startswith(("-A", ":MESH"))
    ]


def test_install_twice_then_cleanup_restores_direct_connectivity(pair: Pair) -> None:
    a, b = pair.a, pair.b
    once = _nat_rules(pair.lab, a)
    pair.install(a)
    assert _nat_rules(pair.lab, a) == once  # no duplicate jumps or rules
    assert any("MESH_OUTPUT" in line for line in _nat_rules(pair.lab, a, "ip6tables-save"))

    for pod in (a, b):
        pair.lab.exec(pod, [sys.executable, "-m", "meshproxy.iptables", "cleanup"])
        assert not [line for line in _nat_rules(pair.lab, pod) if "MESH" in line]
        assert not [line for line in _nat_rules(pair.lab, pod, "ip6tables-save") if "MESH" in line]
    assert reached(pair.connect(a, b.ip, APP_PORT)) == ("b-app", APP_PORT, None)
    done = pair.lab.exec(a, [sys.executable, "-m", "meshproxy.iptables", "cleanup"])
    assert "nothing to remove" in done.stdout


def test_ipv6_is_intercepted_like_ipv4(pair: Pair) -> None:
    a, b = pair.a, pair.b
    if not b.ip6:
        pytest.skip("the kernel has no IPv6")
    vip6 = "2001:2:0:1::10"
    assert reached(pair.connect(a, b.ip6, APP_PORT)) == ("a-proxy", 15001, (b.ip6, APP_PORT))
    assert reached(pair.connect(a, vip6, 80)) == ("a-proxy", 15001, (vip6, 80))
    assert reached(pair.connect(a, b.ip6, APP_PORT, uid=PROXY_UID)) == ("b-proxy", 15006, (b.ip6, APP_PORT))
    assert reached(pair.connect(a, b.ip6, 15000, uid=PROXY_UID)) == ("b-admin", 15000, None)
    assert reached(pair.connect(b, "::1", APP_PORT)) == ("b-app", APP_PORT, None)
    assert reached(pair.connect(b, "::1", APP_PORT, uid=PROXY_UID)) == ("b-app", APP_PORT, None)
    assert reached(pair.connect(b, b.ip6, APP_PORT, uid=PROXY_UID)) == ("b-proxy", 15006, (b.ip6, APP_PORT))
    pair.install(a, "--exclude-outbound-cidrs", "2001:2::/64")
    assert reached(pair.connect(a, b.ip6, APP_PORT)) == ("b-proxy", 15006, (b.ip6, APP_PORT))
    assert reached(pair.connect(a, vip6, 80)) == ("a-proxy", 15001, (vip6, 80))


def _lo_addresses6(lab: Lab, pod: Pod) -> list[str]:
    out = lab.exec(pod, ["ip", "-6", "-o", "addr", "show", "dev", "lo"]).stdout
    return [line.split()[3] for line in out.splitlines()]


def test_ipv6_inbound_passthrough_source_reaches_the_app_directly(pair: Pair) -> None:
    a, b = pair.a, pair.b
    if not b.ip6:
        pytest.skip("the kernel has no IPv6")
    # The pod address is from the RFC 5180 benchmarking range: nothing outside answers it.
    assert ipaddress.ip_address(b.ip6) in ipaddress.ip_network("2001:2::/48")
    # The sidecar forwarding inbound traffic to the app's pod address: from ::6 it goes straight
    # to the app (rule 1) ...
    assert reached(pair.connect(b, b.ip6, APP_PORT, uid=PROXY_UID, source="::6")) == ("b-app", APP_PORT, None)
    # ... which it can bind because install put ::6 on lo (unlike 127.0.0.6, not local by itself).
    assert "::6/128" in _lo_addresses6(pair.lab, b)
    # ... while from any other source the same connection is a self call and enters inbound.
    assert reached(pair.connect(b, b.ip6, APP_PORT, uid=PROXY_UID)) == ("b-proxy", 15006, (b.ip6, APP_PORT))
    # Interception around it is unchanged: A's app still goes out through A's sidecar, and
    # A's proxy UID lands on B's inbound listener.
    assert reached(pair.connect(a, b.ip6, APP_PORT)) == ("a-proxy", 15001, (b.ip6, APP_PORT))
    assert reached(pair.connect(a, b.ip6, APP_PORT, uid=PROXY_UID)) == ("b-proxy", 15006, (b.ip6, APP_PORT))


def test_ipv6_cleanup_removes_the_passthrough_address_and_only_with_our_rules(pair: Pair) -> None:
    b = pair.b
    if not b.ip6:
        pytest.skip("the kernel has no IPv6")
    pair.install(b)  # a second install finds ::6 already there and keeps one copy
    assert _lo_addresses6(pair.lab, b).count("::6/128") == 1
    pair.lab.exec(b, [sys.executable, "-m", "meshproxy.iptables", "cleanup"])
    assert "::6/128" not in _lo_addresses6(pair.lab, b)
    assert not [line for line in _nat_rules(pair.lab, b, "ip6tables-save") if "MESH" in line]
    # Without our rules, cleanup leaves an address someone else put on lo alone.
    pair.lab.exec(b, ["ip", "-6", "addr", "add", "::6/128", "dev", "lo", "nodad"])
    done = pair.lab.exec(b, [sys.executable, "-m", "meshproxy.iptables", "cleanup"])
    assert "nothing to remove" in done.stdout
    assert "::6/128" in _lo_addresses6(pair.lab, b)


def test_a_pod_with_ipv6_disabled_on_lo_gets_ipv4_rules_only(pair: Pair) -> None:
    b = pair.b
    if not b.ip6:
        pytest.skip("the kernel has no IPv6")
    iptables = [sys.executable, "-m", "meshproxy.iptables"]
    pair.lab.exec(b, [*iptables, "cleanup"])
    # Some clusters disable IPv6 in every pod; there is then no IPv6 to intercept (no ::1 either).
    pair.lab.exec(b, ["sysctl", "-q", "-w", "net.ipv6.conf.lo.disable_ipv6=1"])
    done = pair.lab.exec(b, [*iptables, "install"])
    assert "installed (ipv4)" in done.stdout
    assert not [line for line in _nat_rules(pair.lab, b, "ip6tables-save") if "MESH" in line]
    assert reached(pair.connect(b, b.ip, APP_PORT, uid=PROXY_UID)) == ("b-proxy", 15006, (b.ip, APP_PORT))
    # Asked for IPv6 explicitly, install says why it cannot, and exits 1.
    done = pair.lab.exec(b, [*iptables, "install", "--ipv6", "on"], check=False)
    assert done.returncode == 1
    assert "::6/128" in done.stderr
