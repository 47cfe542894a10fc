"""Response flags: why the proxy answered a request itself (or why it failed).

Owns: the vocabulary of Envoy-like short codes, and in ONE table (``FLAGS``)
for each flag the HTTP status of the local reply, the gRPC status used when the
request was gRPC (HTTP 200 + ``grpc-status`` in a trailers-only response), and
a human reason. Every local reply the proxy sends is built here
(``local_reply`` / ``grpc_local_reply``), so access logs, metrics labels
(``response_flags``) and replies agree.

API:
    Flag                         enum of codes (``Flag.NR.value == "NR"``)
    FLAGS[flag] -> FlagInfo       (status, grpc_status, reason)
    local_reply(flag, detail="", status=None) -> LocalReply(status, headers, body)
    grpc_local_reply(flag, detail="", status=None) -> LocalReply   (HTTP 200, trailers-only)
    grpc_status_for_http(status) -> int                            (gRPC spec mapping)

Invariants:
  * Every reply carries ``x-meshproxy-flag: <FLAG>`` and ``x-meshproxy-reason:
    <reason[: detail]>``; header values are single-line latin-1 (CR/LF and
    non-latin-1 characters are replaced), so a detail can never inject headers.
  * ``status`` overrides the table's status only for flags whose status is
    decided at run time: FI (the configured abort status) and URX (the last
    upstream status); for other flags the table wins.

Concurrency: none; constants and pure functions.
"""

from __future__ import annotations

import enum
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

from meshproxy.core.http import Headers


class Flag(enum.Enum):
    NR = "NR"  # no route
    UH = "UH"  # no healthy upstream
    UF = "UF"  # upstream connect failure
    UO = "UO"  # upstream overflow (circuit-breaker limit)
    CO = "CO"  # circuit open (failure accrual)
    URX = "URX"  # retries exhausted / retry budget exhausted
    UT = "UT"  # upstream request timeout
    UR = "UR"  # upstream reset before a response
    UC = "UC"  # upstream connection termination
    RL = "RL"  # rate limited (local token bucket)
    FI = "FI"  # fault-injected abort
    DI = "DI"  # fault-injected delay (informational, added to the log; no reply of its own)
    DPE = "DPE"  # downstream protocol error
    DC = "DC"  # downstream connection termination (log only: nobody left to answer)
    SI = "SI"  # stream idle timeout: a request or response body moved no byte for too long
    NC = "NC"  # no config yet


# gRPC status codes used below (https://grpc.github.io/grpc/core/md_doc_statuscodes.html).
GRPC_OK = 0
GRPC_CANCELLED = 1
GRPC_UNKNOWN = 2
GRPC_DEADLINE_EXCEEDED = 4
GRPC_RESOURCE_EXHAUSTED = 8
GRPC_UNIMPLEMENTED = 12
GRPC_INTERNAL = 13
GRPC_UNAVAILABLE = 14
GRPC_UNAUTHENTICATED = 16
GRPC_PERMISSION_DENIED = 7


@dataclass(frozen=True, slots=True)
class FlagInfo:
    status: int  # HTTP status of the local reply
    grpc_status: int  # grpc-status when the request was gRPC
    reason: str  # human text, first part of x-meshproxy-reason


# The one table. gRPC codes follow the gRPC HTTP-to-gRPC mapping (everything the
# client may retry is UNAVAILABLE) except where a more precise code tells the
# caller more: UT is DEADLINE_EXCEEDED, RL is RESOURCE_EXHAUSTED (clients
# must not blindly retry into a rate limit), NR is UNIMPLEMENTED (as 404 maps).
FLAGS: Mapping[Flag, FlagInfo] = MappingProxyType(
    {
        Flag.NR: FlagInfo(404, GRPC_UNIMPLEMENTED, "no route matched the request"),
        Flag.UH: FlagInfo(503, GRPC_UNAVAILABLE, "no healthy upstream endpoint"),
        Flag.UF: FlagInfo(503, GRPC_UNAVAILABLE, "upstream connect failure"),
        Flag.UO: FlagInfo(503, GRPC_UNAVAILABLE, "upstream overflow (circuit breaker limit reached)"),
        Flag.CO: FlagInfo(503, GRPC_UNAVAILABLE, "circuit open (too many consecutive failures)"),
        Flag.URX: FlagInfo(503, GRPC_UNAVAILABLE, "retries exhausted"),
        Flag.UT: FlagInfo(504, GRPC_DEADLINE_EXCEEDED, "upstream request timeout"),
        Flag.UR: FlagInfo(502, GRPC_UNAVAILABLE, "upstream reset before response"),
        Flag.UC: FlagInfo(503, GRPC_UNAVAILABLE, "upstream connection terminated"),
        Flag.RL: FlagInfo(429, GRPC_RESOURCE_EXHAUSTED, "rate limited"),
        Flag.FI: FlagInfo(503, GRPC_UNAVAILABLE, "fault injected abort"),
        Flag.DI: FlagInfo(200, GRPC_OK, "fault injected delay"),
        Flag.DPE: FlagInfo(400, GRPC_INTERNAL, "downstream protocol error"),
        Flag.DC: FlagInfo(499, GRPC_CANCELLED, "downstream connection terminated"),
        # 408: the request did not arrive in time (a request body stalled before the response
        # head, as Envoy answers a stream idle timeout then, envoyproxy/envoy#3841); the
        # client's side stalled, not the upstream. Once the response streams, SI is a reset.
        Flag.SI: FlagInfo(408, GRPC_DEADLINE_EXCEEDED, "stream idle timeout"),
        Flag.NC: FlagInfo(503, GRPC_UNAVAILABLE, "no configuration received yet"),
    }
)

# Flags whose status is only known at run time; ``status=`` may override the table for these.
_RUNTIME_STATUS = frozenset({Flag.FI, Flag.URX})

FLAG_HEADER = "x-meshproxy-flag"
# grpc-message: every printable ASCII character except "%" is sent as is.
_GRPC_MESSAGE_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")
REASON_HEADER = "x-meshproxy-reason"


class LocalReply(NamedTuple):
    status: int
    headers: Headers
    body: bytes


def grpc_status_for_http(status: int) -> int:
    """The gRPC spec's mapping of an HTTP status to a gRPC status (for FI aborts, URX)."""
    if status == 200:
        return GRPC_UNKNOWN  # an HTTP 200 that is not a gRPC response is an error all the same
    return {
        400: GRPC_INTERNAL,
        401: GRPC_UNAUTHENTICATED,
        403: GRPC_PERMISSION_DENIED,
        404: GRPC_UNIMPLEMENTED,
        429: GRPC_UNAVAILABLE,
        502: GRPC_UNAVAILABLE,
        503: GRPC_UNAVAILABLE,
        504: GRPC_UNAVAILABLE,
    }.get(status, GRPC_UNKNOWN)


def _header_safe(text: str) -> str:
    # One line of latin-1: a reason must never split into a second header.
    one_line = " ".join(text.split())
    return one_line.encode("latin-1", "replace").decode("latin-1")


def reason_text(flag: Flag, detail: str = "") -> str:
    info = FLAGS[flag]
    return _header_safe(f"{info.reason}: {detail}" if detail else info.reason)


def _status_for(flag: Flag, status: int | None) -> int:
    if status is not None and flag in _RUNTIME_STATUS:
        return status
    return FLAGS[flag].status


def local_reply(flag: Flag, detail: str = "", status: int | None = None) -> LocalReply:
    """An HTTP local reply for ``flag``; ``detail`` says which service / limit / endpoint."""
    reason = reason_text(flag, detail)
    body = f"{flag.value}: {reason}\n".encode("latin-1")
    headers: Headers = (
        ("content-type", "text/plain; charset=utf-8"),
        ("content-length", str(len(body))),
        (FLAG_HEADER, flag.value),
        (REASON_HEADER, reason),
    )
    return LocalReply(_status_for(flag, status), headers, body)


def grpc_local_reply(flag: Flag, detail: str = "", status: int | None = None) -> LocalReply:
    """A gRPC trailers-only local reply: HTTP 200 with grpc-status/grpc-message in the head.

    ``status`` (FI / URX only) is an HTTP status and is mapped with ``grpc_status_for_http``.
    """
    reason = reason_text(flag, detail)
    if status is not None and flag in _RUNTIME_STATUS:
        grpc_status = grpc_status_for_http(status)
    else:
        grpc_status = FLAGS[flag].grpc_status
    # grpc-message is percent-encoded (gRPC over HTTP/2 spec), so any text is safe.
    message = urllib.parse.quote(f"{flag.value}: {reason}", safe=_GRPC_MESSAGE_SAFE)
    headers: Headers = (
        ("content-type", "application/grpc"),
        ("grpc-status", str(grpc_status)),
        ("grpc-message", message),
        (FLAG_HEADER, flag.value),
        (REASON_HEADER, reason),
    )
    return LocalReply(200, headers, b"")
