"""Sans-io protocol detection from the first bytes a client sends.

Owns: ``detect(prefix)``, deciding whether a connection speaks HTTP/2 with prior
knowledge (the client preface), HTTP/1.x (a request line with a known method),
or something else that is proxied as opaque TCP.

API:
    Detected        HTTP1 | HTTP2 | TCP | NEED_MORE
    detect(prefix: bytes, max_bytes: int = MAX_PREFIX) -> Detected
    H2_PREFACE, MAX_PREFIX, METHODS

Invariants:
  * Decides as early as the bytes allow: TCP as soon as the prefix can no
    longer become the HTTP/2 preface or a ``METHOD SP target`` request line.
  * HTTP/1 needs ``METHOD SP`` plus a plausible request-target start ("/", "*",
    or a letter for absolute/authority form). If the whole request line is
    already in the prefix, its version must be ``HTTP/1.0`` or ``HTTP/1.1``.
  * At most ``max_bytes`` are examined; with that many bytes and no decision
    the answer is TCP, so NEED_MORE is never returned for ``len(prefix) >= max_bytes``.
  * Detection never consumes bytes: the shell replays the prefix to the chosen codec.

Time bound: server-first protocols (MySQL, SMTP, ...) send nothing; the asyncio
shell treats "no bytes within ~100 ms" as TCP. This module has no clock.

Concurrency: none; pure function.
"""

from __future__ import annotations

import enum
import re

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

METHODS: frozenset[bytes] = frozenset(
    {b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH"}
)

# Long enough for the preface and a request line with a modest URL; a longer
# line that started like HTTP is accepted as HTTP/1 once this many bytes arrived.
MAX_PREFIX = 1024

_MAX_METHOD = max(len(m) for m in METHODS)
_REQUEST_LINE = re.compile(rb"[A-Z]+ [^ \r\n]+ HTTP/1\.[01]\r?\n")


class Detected(enum.Enum):
    HTTP1 = "http1"
    HTTP2 = "http2"
    TCP = "tcp"
    NEED_MORE = "need_more"


def _http1(prefix: bytes) -> Detected:
    sp = prefix.find(b" ", 0, _MAX_METHOD + 1)
    if sp < 0:
        if len(prefix) <= _MAX_METHOD and any(m.startswith(prefix) for m in METHODS):
            return Detected.NEED_MORE
        return Detected.TCP
    if prefix[:sp] not in METHODS:
        return Detected.TCP
    if len(prefix) == sp + 1:
        return Detected.NEED_MORE
    first = prefix[sp + 1 : sp + 2]
    if not (first in (b"/", b"*") or first.isalpha()):
        return Detected.TCP
    eol = prefix.find(b"\n")
    if eol >= 0 and not _REQUEST_LINE.fullmatch(prefix, 0, eol + 1):
        return Detected.TCP
    return Detected.HTTP1


def detect(prefix: bytes, max_bytes: int = MAX_PREFIX) -> Detected:
    """Classify a connection from the first bytes the client sent (see module doc)."""
    data = prefix[:max_bytes]
    if not data:
        return Detected.NEED_MORE
    if data.startswith(H2_PREFACE):
        return Detected.HTTP2
    if H2_PREFACE.startswith(data):
        # "PRI" is not an HTTP/1 method we accept, so only the preface can follow.
        return Detected.NEED_MORE if len(data) < max_bytes else Detected.TCP
    result = _http1(data)
    if result is Detected.NEED_MORE and len(data) >= max_bytes:
        return Detected.TCP
    return result
