"""A connection that was not redirected has no original destination, even where conntrack
tracks it: any nat rule in a namespace (a container tool's port-forwarding chains, say)
turns conntrack on there, and the kernel then answers ``SO_ORIGINAL_DST`` for every
connection with its own destination. The sidecar took that for "redirected to myself" and
closed the connection (a loop guard); ``original_dst`` now says None."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a network namespace"),
]

ROOT = Path(__file__).resolve().parents[2]
UNIT = "tests/unit/io/test_dp_units.py::test_original_dst_is_none_without_a_redirect"


def test_not_redirected_is_none_with_conntrack_active_in_the_namespace() -> None:
    ns = f"mp-ct-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        run = ["ip", "netns", "exec", ns]
        subprocess.run([*run, "ip", "link", "set", "lo", "up"], check=True)
        # A DNAT rule for an address nothing here uses (198.18.0.0/15, never routed): with a
        # nat target in the table, every connection gets a nat entry (a RETURN rule is not enough).
        rule = [
            "iptables", "-t", "nat", "-A", "OUTPUT", "-d", "198.19.255.254",
            "-j", "DNAT", "--to-destination", "198.19.255.253",
        ]  # fmt: skip
        subprocess.run([*run, *rule], check=True)
        # The unit test's own check (a loopback connection, accepted and connecting ends), here.
        out = subprocess.run(
            [*run, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", UNIT],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stdout[-2000:]
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
