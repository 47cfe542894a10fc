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

import pytest

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a network namespace"),
]

PROBE = """
import socket
from meshproxy.io.sockopt import original_dst
with socket.socket() as srv:
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    with socket.create_connection(srv.getsockname()) as c:
        conn, _ = srv.accept()
        with conn:
            print(original_dst(conn), original_dst(c))
"""


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
        out = subprocess.run([*run, sys.executable, "-c", PROBE], check=True, capture_output=True, text=True)
        assert out.stdout.split() == ["None", "None"], out.stdout
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
