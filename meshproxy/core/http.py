"""One HTTP message model for HTTP/1.1 and HTTP/2 (gRPC is HTTP/2 plus trailers).

Owns: the request/response head types every layer above the codecs uses
(routing, retries, telemetry), and hop-by-hop header handling. The heads are
immutable values: frozen to the type checker (``mypy --strict`` refuses any
assignment to a field), plain slotted classes at run time, because they are
built on every hop (see ``meshproxy.core.frozen``).

Invariants:
  * Header names are lower-case ``str``; values are ``str`` (latin-1 decoded
    from the wire, so bytes round-trip exactly). Order and repeats are kept.
  * ``authority`` is the HTTP/1 ``Host`` header or the HTTP/2 ``:authority``
    pseudo-header; ``headers`` never contains pseudo-headers or ``host``.
  * Hop-by-hop headers (RFC 9110 7.6.1 and those named in ``Connection``) are
    stripped by ``end_to_end`` before a message is forwarded; codecs add their
    own framing headers (``content-length``/``transfer-encoding``) as needed.

Concurrency: none; plain data.
"""

from __future__ import annotations

from collections.abc import Sequence

from meshproxy.core.frozen import frozen_to_mypy

Headers = tuple[tuple[str, str], ...]

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "http2-settings",
    }
)


@frozen_to_mypy
class RequestHead:
    method: str
    path: str  # origin-form, with query string
    authority: str  # host[:port]
    headers: Headers
    scheme: str = "http"
    version: str = "1.1"  # "1.0", "1.1" or "2"

    def header(self, name: str) -> str | None:
        return get_header(self.headers, name)

    def with_headers(self, headers: Headers) -> RequestHead:
        """This head with ``headers``: ``self`` when they are the very same tuple (the
        pipeline asks several times per request, usually with headers it left unchanged)."""
        if headers is self.headers:
            return self
        # Direct construction: ``dataclasses.replace`` walks the fields on every call.
        return RequestHead(self.method, self.path, self.authority, headers, self.scheme, self.version)


@frozen_to_mypy
class ResponseHead:
    status: int
    headers: Headers
    version: str = "1.1"
    reason: str = ""

    def header(self, name: str) -> str | None:
        return get_header(self.headers, name)


def get_header(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    """First value of ``name`` (lower-case), or None."""
    for k, v in headers:
        if k == name:
            return v
    return None


def end_to_end(headers: Headers, *, keep_te_trailers: bool = False) -> Headers:
    """Drop hop-by-hop headers, including any listed in ``Connection``.

    ``keep_te_trailers`` keeps ``te: trailers`` (required by gRPC over HTTP/2).
    Returns ``headers`` itself (no copy) when there is nothing to drop, the common case.
    """
    for k, _ in headers:
        if k in HOP_BY_HOP:
            break
    else:
        return headers  # no hop-by-hop header, hence no Connection naming others either
    named: set[str] = set()
    for k, v in headers:
        if k == "connection":
            named.update(t.strip().lower() for t in v.split(",") if t.strip())
    out: list[tuple[str, str]] = []
    for k, v in headers:
        if k in named:
            continue
        if k in HOP_BY_HOP:
            if keep_te_trailers and k == "te" and v.strip().lower() == "trailers":
                out.append((k, v))
            continue
        out.append((k, v))
    return tuple(out)


def set_header(headers: Headers, name: str, value: str) -> Headers:
    """Replace every ``name`` header with one ``name: value``."""
    return (*((k, v) for k, v in headers if k != name), (name, value))


def remove_header(headers: Headers, name: str) -> Headers:
    return tuple((k, v) for k, v in headers if k != name)
