"""Sans-io helpers for the HTTP/2 codecs (``meshproxy.io.http2_server`` / ``http2_client``).

Owns:
  * the mapping between HTTP/2 header blocks (``h2`` with ``header_encoding=None``:
    a list of ``(bytes, bytes)``) and the shared ``RequestHead`` / ``ResponseHead``
    model, including pseudo-headers and connection-specific header removal;
  * ``GoAwaySplitter``: a frame-boundary scanner that takes GOAWAY frames out of the
    inbound byte stream before it reaches ``h2``.

Why the splitter exists: ``h2`` (4.x) moves its connection state machine to CLOSED
as soon as a GOAWAY is sent or received (python-hyper/h2 issue #1181), after which
every frame on the in-flight streams is a protocol error. RFC 9113 section 6.8 says
streams up to the GOAWAY's last-stream-id may still complete, which is what graceful
shutdown and rolling restarts of gRPC servers rely on. So the shells hide inbound
GOAWAY frames from ``h2`` (and write their own graceful GOAWAY with
``goaway_frame``), keeping ``h2`` usable until the last stream is done.

Invariants:
  * Header names handed to the model are lower-case ``str`` decoded as latin-1, so
    bytes round-trip exactly; ``RequestHead.headers`` never holds pseudo-headers or
    ``host``.
  * Outbound header blocks never carry connection-specific headers
    (RFC 9113 8.2.2); ``te: trailers`` is kept (gRPC needs it).
  * ``GoAwaySplitter.feed`` returns the input bytes in order, minus GOAWAY frames,
    with each GOAWAY reported at its position in the stream.

Concurrency: none; plain functions and a small single-owner state machine.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import h2.exceptions
from h2.utilities import HeaderValidationFlags, validate_headers
from hyperframe.frame import GoAwayFrame

from meshproxy.core.errors import ProtocolError
from meshproxy.core.http import Headers, RequestHead, ResponseHead, end_to_end

H2Headers = list[tuple[bytes, bytes]]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
"""The client connection preface (RFC 9113 3.4); what protocol detection looks for."""

_FRAME_HEADER = struct.Struct(">HBBBL")  # 24-bit length split as 16+8, type, flags, stream id
_GOAWAY_TYPE = 0x7
_MAX_GOAWAY_DEBUG = 16 * 1024  # a GOAWAY's debug data is kept up to this size, the rest dropped


def _dec(b: bytes) -> str:
    return b.decode("latin-1")


def _enc(s: str) -> bytes:
    return s.encode("latin-1")


_REQUEST = HeaderValidationFlags(
    is_client=False, is_trailer=False, is_response_header=False, is_push_promise=False
)
_RESPONSE = HeaderValidationFlags(
    is_client=True, is_trailer=False, is_response_header=True, is_push_promise=False
)
_TRAILERS_IN = {
    side: HeaderValidationFlags(
        is_client=side, is_trailer=True, is_response_header=False, is_push_promise=False
    )
    for side in (False, True)
}


def _validated(headers: H2Headers, flags: HeaderValidationFlags, status: int) -> H2Headers:
    """RFC 9113 8.2/8.3 field checks, using ``h2``'s own validator.

    The shells configure ``h2`` with ``validate_inbound_headers=False`` and validate here
    instead: ``h2`` treats a malformed field block as a connection error, while RFC 9113
    8.1.1 makes it a stream error, and one bad request must not kill its neighbours.
    Rejects upper-case or illegal names, CR/LF/NUL in values (request smuggling when
    downgraded to HTTP/1), connection-specific fields, misplaced pseudo-headers.
    """
    try:
        return list(validate_headers(headers, flags))
    except h2.exceptions.ProtocolError as exc:
        raise ProtocolError(f"malformed HTTP/2 field block: {exc}", status=status) from None


def request_head_from_h2(headers: H2Headers) -> RequestHead:
    """Build a ``RequestHead`` from a request header block.

    Raises ``ProtocolError`` (status 400) for a malformed block (see ``_validated``) or a
    missing pseudo-header.
    """
    method = scheme = authority = path = None
    host: str | None = None
    regular: list[tuple[str, str]] = []
    for name, value in _validated(headers, _REQUEST, 400):
        if name[:1] == b":":
            if name == b":method":
                method = _dec(value)
            elif name == b":scheme":
                scheme = _dec(value)
            elif name == b":authority":
                authority = _dec(value)
            elif name == b":path":
                path = _dec(value)
            else:
                raise ProtocolError(f"unknown pseudo-header {_dec(name)}")
            continue
        k = _dec(name)
        if k == "host":
            host = _dec(value)
            continue
        regular.append((k, _dec(value)))
    if method is None:
        raise ProtocolError("missing :method")
    if method == "CONNECT":
        # RFC 9113 8.5: only :method and :authority.
        if authority is None:
            raise ProtocolError("CONNECT without :authority")
        return RequestHead(method, "", authority, tuple(regular), scheme="", version="2")
    if path is None or path == "":
        raise ProtocolError("missing :path")
    if scheme is None:
        raise ProtocolError("missing :scheme")
    if authority is None:
        authority = host if host is not None else ""
    return RequestHead(method, path, authority, tuple(regular), scheme=scheme, version="2")


def response_head_from_h2(headers: H2Headers) -> ResponseHead:
    """Build a ``ResponseHead`` from a response header block (``:status`` required)."""
    status: int | None = None
    regular: list[tuple[str, str]] = []
    for name, value in _validated(headers, _RESPONSE, 502):
        if name == b":status":
            try:
                status = int(value)
            except ValueError:
                raise ProtocolError(f"bad :status {value!r}", status=502) from None
            continue
        if name[:1] == b":":
            raise ProtocolError(f"unexpected pseudo-header {_dec(name)} in response", status=502)
        regular.append((_dec(name), _dec(value)))
    if status is None or not 100 <= status <= 999:
        raise ProtocolError("missing or invalid :status", status=502)
    return ResponseHead(status, tuple(regular), version="2")


def trailers_from_h2(headers: H2Headers, *, client_side: bool) -> Headers:
    """A received trailer block as model headers (``ProtocolError`` if malformed)."""
    block = _validated(headers, _TRAILERS_IN[client_side], 502 if client_side else 400)
    return tuple((_dec(k), _dec(v)) for k, v in block)


def _regular_fields(headers: Headers) -> H2Headers:
    # "host" is carried as :authority; everything hop-by-hop is illegal in HTTP/2.
    return [
        (_enc(k), _enc(v))
        for k, v in end_to_end(headers, keep_te_trailers=True)
        if k != "host" and k[:1] != ":"
    ]


def h2_request_headers(head: RequestHead) -> H2Headers:
    """A request header block for ``head``: pseudo-headers first, then end-to-end fields."""
    if head.method == "CONNECT":
        block: H2Headers = [(b":method", b"CONNECT"), (b":authority", _enc(head.authority))]
    else:
        authority = head.authority or head.header("host") or ""
        block = [
            (b":method", _enc(head.method)),
            (b":scheme", _enc(head.scheme or "http")),
            (b":authority", _enc(authority)),
            (b":path", _enc(head.path or "/")),
        ]
    block.extend(_regular_fields(head.headers))
    return block


def h2_response_headers(head: ResponseHead) -> H2Headers:
    """A response header block for ``head`` (``:status`` first, end-to-end fields)."""
    block: H2Headers = [(b":status", str(head.status).encode())]
    block.extend(_regular_fields(head.headers))
    return block


def h2_trailers(trailers: Headers) -> H2Headers:
    """A trailer block: no pseudo-headers, no connection-specific fields."""
    return _regular_fields(trailers)


@dataclass(frozen=True, slots=True)
class GoAway:
    """A GOAWAY frame taken out of the inbound stream."""

    last_stream_id: int
    error_code: int
    debug_data: bytes = b""


def goaway_frame(last_stream_id: int, error_code: int = 0, debug_data: bytes = b"") -> bytes:
    """Serialized GOAWAY frame, written by the shell itself (see module docstring)."""
    frame = GoAwayFrame(0, last_stream_id=last_stream_id, error_code=error_code, additional_data=debug_data)
    data: bytes = frame.serialize()
    return data


class GoAwaySplitter:
    """Scans inbound bytes at frame boundaries and takes out GOAWAY frames.

    ``feed`` returns ``bytes`` runs (to hand to ``h2`` unchanged) and ``GoAway`` items,
    in stream order. Frame bodies other than GOAWAY pass through as they arrive (never
    buffered); only a frame header split across reads (< 9 bytes) or a GOAWAY body is
    held. A malformed GOAWAY (shorter than 8 bytes, or on a stream other than 0) is
    passed through, so ``h2`` raises the protocol error itself.
    """

    __slots__ = ("_goaway", "_goaway_left", "_held", "_preface_left", "_skip")

    def __init__(self, *, expect_preface: bool) -> None:
        self._preface_left = len(PREFACE) if expect_preface else 0
        self._skip = 0  # bytes left of the current pass-through frame
        self._held = b""  # start of a frame header split across reads
        self._goaway: bytearray | None = None  # body of a GOAWAY being collected
        self._goaway_left = 0

    def feed(self, data: bytes) -> list[bytes | GoAway]:
        out: list[bytes | GoAway] = []
        pieces: list[bytes | memoryview] = []
        view = memoryview(data)
        n = len(view)
        pos = 0
        run = 0  # start of the pass-through run that ends at ``pos``
        if self._preface_left:
            pos = min(self._preface_left, n)
            self._preface_left -= pos
        while pos < n:
            if self._skip:
                take = min(self._skip, n - pos)
                self._skip -= take
                pos += take
                continue
            if self._goaway is not None:
                take = min(self._goaway_left, n - pos)
                room = _MAX_GOAWAY_DEBUG + 8 - len(self._goaway)
                if room > 0:
                    self._goaway += view[pos : pos + min(take, room)]
                self._goaway_left -= take
                pos += take
                run = pos
                if not self._goaway_left:
                    out.append(self._finish_goaway())
                continue
            held = self._held
            if held:  # only ever at the start of a feed
                need = 9 - len(held)
                if n < need:
                    self._held = held + bytes(view)
                    pos = run = n
                    break
                header: bytes | memoryview = held + bytes(view[:need])
                self._held = b""
                pos = need
            elif n - pos < 9:
                if pos > run:
                    pieces.append(view[run:pos])
                self._held = bytes(view[pos:])
                pos = run = n
                break
            else:
                header = view[pos : pos + 9]
                pos += 9
            hi, lo, ftype, _flags, stream_id = _FRAME_HEADER.unpack(header)
            length = (hi << 8) | lo
            if ftype == _GOAWAY_TYPE and (stream_id & 0x7FFFFFFF) == 0 and length >= 8:
                header_start = pos - 9 + len(held)
                if header_start > run:
                    pieces.append(view[run:header_start])
                if pieces:
                    out.append(b"".join(pieces))
                    pieces = []
                run = pos
                self._goaway = bytearray()
                self._goaway_left = length
                continue
            if held:
                pieces.append(held)  # the run from 0 carries the rest of this header
            self._skip = length
        if pos > run:
            if not pieces and run == 0 and pos == n:
                out.append(data)  # the common case: nothing taken out, no copy
                return out
            pieces.append(view[run:pos])
        if pieces:
            out.append(b"".join(pieces))
        return out

    def _finish_goaway(self) -> GoAway:
        body = bytes(self._goaway or b"")
        self._goaway = None
        frame = GoAwayFrame(0)
        frame.parse_body(memoryview(body))
        return GoAway(frame.last_stream_id, frame.error_code, bytes(frame.additional_data))
