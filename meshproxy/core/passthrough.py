"""The source address of the sidecar's own connections to its app (inbound passthrough).

Owns: the passthrough addresses ``INBOUND_SOURCE_V4``/``INBOUND_SOURCE_V6`` and
``source_for``, the local address an inbound connection to the app is bound to.

Why: the OUTPUT rules ``meshproxy iptables install`` writes send a connection the proxy
opens to its own pod IP back to the inbound listener (rule 2: a meshed call to a service on
this very pod must get inbound policy too). The proxy's forwarding of an inbound request to
an app listening on the pod IP (``inbound.app_address``, for apps that do not listen on
loopback) is such a connection: left alone it is redirected to 15006 again, forever. Rule 1
lets a connection out on ``lo`` untouched when it comes from these addresses, so the proxy
binds them for exactly those connections (Istio uses the same 127.0.0.6). A loopback app
address needs no bind: rule 5 already lets 127.0.0.1 through, and ::1 likewise.

Invariants: pure; ``source_for`` returns None for loopback and unparsable addresses (the
connect then fails or succeeds exactly as it did without a bind).
"""

from __future__ import annotations

import ipaddress

INBOUND_SOURCE_V4 = "127.0.0.6"
INBOUND_SOURCE_V6 = "::6"  # put on ``lo`` by ``meshproxy iptables install`` (not local by default)


def source_for(app_address: str) -> tuple[str, int] | None:
    """``(address, 0)`` to bind for a connection to the app at ``app_address``, or None."""
    try:
        ip = ipaddress.ip_address(app_address)
    except ValueError:
        return None
    if ip.is_loopback:
        return None
    return (INBOUND_SOURCE_V4, 0) if ip.version == 4 else (INBOUND_SOURCE_V6, 0)
