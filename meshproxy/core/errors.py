"""The proxy's typed error hierarchy.

Owns: the exceptions raised below the pipeline. Each carries the response flag
(see ``meshproxy.core.flags``) that the pipeline turns into a local reply, in
one place (``meshproxy.io.proxy``), so a user can tell "circuit open" from
"no healthy endpoint" from "upstream reset".
"""

from __future__ import annotations


class ProxyError(Exception):
    """Base of every error the proxy turns into a local reply."""

    flag = "UNKNOWN"


class ConfigError(ProxyError):
    """A config snapshot or file is invalid. ``path`` names the field, e.g. ``services[2].port``."""

    flag = "CONFIG"

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


class UpstreamConnectError(ProxyError):
    flag = "UF"


class UpstreamResetError(ProxyError):
    flag = "UR"


class UpstreamTimeoutError(ProxyError):
    flag = "UT"


class UpstreamOverflowError(ProxyError):
    """A circuit-breaker limit refused the request (``max_connections``/``max_pending_requests``)."""

    flag = "UO"


class ProtocolError(ProxyError):
    """Malformed message from a peer. ``status`` is the reply a server should send."""

    flag = "DPE"

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
