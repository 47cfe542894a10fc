"""Sans-io helpers for the HTTP/2 codecs (``meshproxy.io.http2_server`` / ``http2_client``).

Owns:
  * the mapping between HTTP/2 header blocks (``h2`` with ``header_encoding=None``:
    a list of ``(bytes, bytes)``) and the shared ``RequestHead`` / ``ResponseHead``
    model, including pseudo-headers and connection-specific header removal;
  * header validation in both directions (``h2``'s own checks are turned off, see
    ``new_connection``) and which fields stay out of HPACK's dynamic table;
  * ``new_connection``: the ``h2`` configuration both shells use;
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
    (RFC 9113 8.2.2); ``te: trailers`` is kept (gRPC needs it). Their names are
    lower-case and legal, their values free of CR/LF/NUL and surrounding whitespace:
    what ``h2`` would check on receipt (``h2`` itself does not re-check them on send).
  * ``GoAwaySplitter.feed`` returns the input bytes in order, minus GOAWAY frames,
    with each GOAWAY reported at its position in the stream.

Concurrency: none; plain functions and a small single-owner state machine.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Any

import h2.config
import h2.connection
from hpack import Encoder, NeverIndexedHeaderTuple
from hyperframe.frame import GoAwayFrame
from mypy_extensions import mypyc_attr

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


# Received field blocks are validated here, not by ``h2`` (``validate_inbound_headers`` is
# off, see ``new_connection``): ``h2`` treats a malformed block as a connection error, while
# RFC 9113 8.1.1 makes it a stream error, and one bad request must not fail its neighbours.
# The rules are ``h2``'s own (``h2.utilities.validate_headers``, RFC 9113 8.2 and 8.3; a
# test checks that both accept and reject the same blocks), in one pass: ``h2``'s seven
# chained generators and its byte-by-byte character loop were ~5% of a gRPC sidecar's
# Python time (py-spy, bench VM), about 25 us for a 15-field request block; this is 12.
_REQUEST, _RESPONSE, _TRAILERS = 0, 1, 2  # kinds of block
_FIELD_NAME_BYTES = re.compile(rb"[\x21-\x39\x3b-\x40\x5b-\x7e]+")  # as _FIELD_NAME
_VALUE_ILLEGAL_BYTES = re.compile(rb"[\x00\r\n]")
_WHITESPACE = (0x20, 0x09)
_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade"}
)
_PSEUDO_FIELDS = frozenset({b":method", b":scheme", b":authority", b":path", b":status", b":protocol"})
_REQUEST_ONLY = frozenset({b":method", b":scheme", b":authority", b":path", b":protocol"})


@mypyc_attr(native_class=False)  # an exception: see meshproxy.compiled
class _Malformed(Exception):
    pass


def _check_block(headers: H2Headers, kind: int) -> None:
    """Raise ``_Malformed`` unless ``headers`` is a well-formed block of ``kind``."""
    pseudo: set[bytes] = set()
    regular = False
    method = authority = host = None
    for header in headers:
        name = header[0]
        value = header[1]
        if name[:1] == b":":
            if regular:
                raise _Malformed(f"pseudo-header field out of sequence: {name!r}")
            if name in pseudo:
                raise _Malformed(f"duplicate pseudo-header field {name!r}")
            if name not in _PSEUDO_FIELDS:
                raise _Malformed(f"custom pseudo-header field {name!r}")
            pseudo.add(name)
            if name == b":method":
                method = value
            elif name == b":authority":
                authority = value
            elif name == b":path" and not value and kind == _REQUEST:
                raise _Malformed("an empty :path header is forbidden")
        else:
            regular = True
            if not _FIELD_NAME_BYTES.fullmatch(name):
                raise _Malformed(f"illegal header name {name!r}")
            if name in _CONNECTION_SPECIFIC:
                raise _Malformed(f"connection-specific header field present: {name!r}")
            if name == b"te" and value.lower() != b"trailers":
                raise _Malformed(f"invalid value for TE header: {value!r}")
            if name == b"host" and kind == _REQUEST:
                if host is not None:
                    raise _Malformed("request header block has multiple Host headers")
                host = value
        if value and (value[0] in _WHITESPACE or value[-1] in _WHITESPACE):
            raise _Malformed(f"header value {value!r} of {name!r} surrounded by whitespace")
    # CR, LF or NUL anywhere: one search over all values rather than one per value.
    if _VALUE_ILLEGAL_BYTES.search(b"".join([header[1] for header in headers])):
        bad = next(h for h in headers if _VALUE_ILLEGAL_BYTES.search(h[1]))
        raise _Malformed(f"illegal character in header value {bad[1]!r} of {bad[0]!r}")
    if kind == _TRAILERS:
        if pseudo:
            raise _Malformed(f"pseudo-header in trailers {sorted(pseudo)}")
        return
    if kind == _RESPONSE:
        if b":status" not in pseudo:
            raise _Malformed("header block missing mandatory b':status' header")
        if pseudo & _REQUEST_ONLY:
            raise _Malformed(f"request-only headers in a response {sorted(pseudo & _REQUEST_ONLY)}")
        return
    if b":method" not in pseudo:
        raise _Malformed("header block missing mandatory b':method' header")
    connect = method == b"CONNECT"
    if connect and b":protocol" not in pseudo:
        if b":scheme" in pseudo or b":path" in pseudo:  # RFC 9113 8.5
            raise _Malformed("ordinary CONNECT must not include :scheme or :path")
    elif b":scheme" not in pseudo or b":path" not in pseudo:
        raise _Malformed("header block missing mandatory :scheme or :path header")
    if b":status" in pseudo:
        raise _Malformed("response-only header :status in a request")
    if not connect and b":protocol" in pseudo:
        raise _Malformed(":protocol outside an extended CONNECT")
    if authority is None and host is None:
        raise _Malformed("request header block does not have an :authority or Host header")
    if authority is not None and host is not None and authority != host:
        raise _Malformed(f"mismatched :authority and Host headers: {authority!r} / {host!r}")


def _validated(headers: H2Headers, kind: int, status: int) -> H2Headers:
    """``headers`` if well-formed (RFC 9113 8.2/8.3), else ``ProtocolError`` with ``status``.

    Rejects upper-case or illegal names, CR/LF/NUL in values (request smuggling when
    downgraded to HTTP/1), connection-specific fields, misplaced, missing or unknown
    pseudo-headers, a Host that disagrees with :authority.
    """
    try:
        _check_block(headers, kind)
    except _Malformed as exc:
        raise ProtocolError(f"malformed HTTP/2 field block: {exc}", status=status) from None
    return headers


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
        elif name == b"host":
            host = _dec(value)
        else:  # decoded inline: a call per field is measurable here
            regular.append((name.decode("latin-1"), value.decode("latin-1")))
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
    block = _validated(headers, _TRAILERS, 502 if client_side else 400)
    return tuple((_dec(k), _dec(v)) for k, v in block)


# Outbound field blocks are normalized and validated here, once, and ``h2`` is configured
# not to do it again (``new_connection``): its outbound pipeline is six generators per
# header (lower-casing, stripping, connection-header and pseudo-header checks), about
# 15 us for a 15-field gRPC request on the bench VM, while this one pass is a regex per
# name and value. The checks are ``h2``'s inbound rules (RFC 9113 8.2.1), so a block
# that leaves here is one ``h2`` would accept on the other side.
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x40\x5b-\x7e]+")  # visible ASCII, no upper case, no ":"
_VALUE_NEEDS_CARE = re.compile(r"[\x00\r\n]|^[ \t]|[ \t]$")  # illegal, or surrounding whitespace
_VALUE_ILLEGAL = re.compile(r"[\x00\r\n]")
_FIELD_NAMES = re.compile(r"(?:[\x21-\x39\x3b-\x40\x5b-\x7e]+\n)*")  # _FIELD_NAME, each followed by "\n"

# Fields sent as HPACK "never indexed" literals, kept out of the dynamic tables of every
# hop (RFC 7541 7.1.3). Credentials, as ``h2``'s own normalization does (plus short
# cookies, see ``_regular_fields``); and fields whose value is new on every request
# (trace and request ids, a deadline): indexing those only evicts the fields that do
# repeat (content-type, user-agent, :path...), and with ``hpack``'s linear table search
# a full 4 KiB table of such entries cost ~15 us more per request block (bench VM).
_NEVER_INDEXED = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "traceparent",
        "tracestate",
        "b3",
        "x-b3-traceid",
        "x-b3-spanid",
        "x-b3-parentspanid",
        "x-request-id",
        "grpc-timeout",
    }
)


def _field(name: str, value: str, status: int) -> tuple[bytes, bytes]:
    """One outbound field, checked (see ``_FIELD_NAME``); slow path of ``_regular_fields``."""
    if not _FIELD_NAME.fullmatch(name):
        lowered = name.lower()  # the model keeps names lower-case; be lenient if it did not
        if not _FIELD_NAME.fullmatch(lowered):
            raise ProtocolError(f"invalid HTTP/2 field name {name!r}", status=status)
        name = lowered
    if _VALUE_NEEDS_CARE.search(value):
        value = value.strip(" \t")
        if _VALUE_ILLEGAL.search(value):
            raise ProtocolError(f"invalid character in HTTP/2 field {name!r}", status=status)
    return _enc(name), _enc(value)


def _regular_fields(headers: Headers, status: int) -> H2Headers:
    # "host" is carried as :authority; everything hop-by-hop is illegal in HTTP/2.
    fields = end_to_end(headers, keep_te_trailers=True)
    if not fields:
        return []
    # One regex over all names and one over all values (loops in C), not two per field:
    # 16 -> 10 us for a 15-field gRPC request (bench VM). A block that fails either check
    # is redone field by field (``_field``), which fixes what it can or names the culprit.
    if not _FIELD_NAMES.fullmatch("\n".join([k for k, _ in fields]) + "\n") or _VALUE_ILLEGAL.search(
        "".join([v for _, v in fields])
    ):
        return _checked_fields(fields, status)
    out: H2Headers = []
    for k, v in fields:
        if k == "host":
            continue
        if v and (v[0] in " \t" or v[-1] in " \t"):
            v = v.strip(" \t")
        value = v.encode("latin-1")
        if k in _NEVER_INDEXED or (k == "cookie" and len(value) < 20):
            out.append(NeverIndexedHeaderTuple(k.encode("latin-1"), value))
        else:
            out.append((k.encode("latin-1"), value))
    return out


def _checked_fields(fields: Headers, status: int) -> H2Headers:
    """``_regular_fields`` one field at a time, for a block with something to fix or refuse."""
    out: H2Headers = []
    for k, v in fields:
        if k == "host" or k[:1] == ":":
            continue
        field = _field(k, v, status)
        name = _dec(field[0])
        if name in _NEVER_INDEXED or (name == "cookie" and len(field[1]) < 20):
            out.append(NeverIndexedHeaderTuple(*field))
        else:
            out.append(field)
    return out


def _pseudo(name: bytes, value: str, status: int) -> tuple[bytes, bytes]:
    if _VALUE_NEEDS_CARE.search(value):
        value = value.strip(" \t")  # as h2's normalization did
    if not value or _VALUE_ILLEGAL.search(value):
        raise ProtocolError(f"invalid HTTP/2 {_dec(name)} {value!r}", status=status)
    return name, _enc(value)


def h2_request_headers(head: RequestHead) -> H2Headers:
    """A request header block for ``head``: pseudo-headers first, then end-to-end fields.

    Raises ``ProtocolError`` (400) for a field HTTP/2 cannot carry (an illegal character,
    an empty or malformed pseudo-header value).
    """
    if head.method == "CONNECT":
        block: H2Headers = [(b":method", b"CONNECT"), _pseudo(b":authority", head.authority, 400)]
    else:
        authority = head.authority or head.header("host") or ""
        block = [
            _pseudo(b":method", head.method, 400),
            _pseudo(b":scheme", head.scheme or "http", 400),
            # An empty :authority is legal (a request without Host); h2 accepts it too.
            (b":authority", _enc(authority)) if not authority else _pseudo(b":authority", authority, 400),
            _pseudo(b":path", head.path or "/", 400),
        ]
    block.extend(_regular_fields(head.headers, 400))
    return block


def h2_response_headers(head: ResponseHead) -> H2Headers:
    """A response header block for ``head`` (``:status`` first, end-to-end fields).

    Raises ``ProtocolError`` (502) for a field HTTP/2 cannot carry.
    """
    block: H2Headers = [(b":status", str(head.status).encode())]
    block.extend(_regular_fields(head.headers, 502))
    return block


def h2_trailers(trailers: Headers) -> H2Headers:
    """A trailer block: no pseudo-headers, no connection-specific fields (``ProtocolError`` 502)."""
    return _regular_fields(trailers, 502)


class LiteralEncoder(Encoder):
    """An HPACK encoder that writes literals without Huffman coding.

    ``hpack``'s Huffman coder is a Python loop per byte: for a gRPC request with trace
    context (about 200 bytes of literals that are new on every request) it was 60% of
    ``encode`` (bench VM: 90 -> 29 us per request block with never-indexed ids and no
    Huffman), and the next hop pays again to decode it (85 -> 40 us). Fields that repeat
    are sent once per connection and indexed after that, so Huffman coding would only
    shrink the per-request literals: about 50 bytes more per request on the wire.
    """

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        return super().encode(headers, huffman=False)


def new_connection(*, client_side: bool) -> h2.connection.H2Connection:
    """An ``H2Connection`` configured as both shells need it.

    * ``header_encoding=None``: header blocks stay ``bytes``; the mapping to the model's
      latin-1 ``str`` is done once, here.
    * ``validate_inbound_headers=False``: received blocks are validated per stream in
      ``_validated`` (``h2`` would make a malformed block a connection error, failing
      every stream on the connection).
    * ``validate_outbound_headers=False``, ``normalize_outbound_headers=False``: every
      block we send is built, normalized and checked by ``h2_request_headers``,
      ``h2_response_headers`` or ``h2_trailers``; ``h2`` doing it again cost ~15-20% of
      ``send_headers``.
    * ``LiteralEncoder``: no Huffman coding (see there).
    """
    config = h2.config.H2Configuration(
        client_side=client_side,
        header_encoding=None,
        validate_inbound_headers=False,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
    )
    conn = h2.connection.H2Connection(config=config)
    conn.encoder = LiteralEncoder()
    return conn


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
        if not (self._preface_left or self._skip or self._held or self._goaway is not None):
            # The common case, a read that starts on a frame boundary: walk the frame
            # headers in place (no slices); anything else takes the general path below.
            n = len(data)
            pos = 0
            unpack = _FRAME_HEADER.unpack_from
            while n - pos >= 9:
                hi, lo, ftype, _flags, stream_id = unpack(data, pos)
                length = (hi << 8) | lo
                if ftype == _GOAWAY_TYPE and (stream_id & 0x7FFFFFFF) == 0 and length >= 8:
                    return self._feed(data)  # nothing changed yet: start over, the long way
                pos += 9 + length
            if pos >= n:
                self._skip = pos - n  # the last frame's body goes on in the next read
                return [data]
            self._held = data[pos:]  # a frame header split across reads
            return [data[:pos]] if pos else []
        return self._feed(data)

    def _feed(self, data: bytes) -> list[bytes | GoAway]:
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
