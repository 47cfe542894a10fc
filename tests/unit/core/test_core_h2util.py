"""HTTP/2 header mapping and the GOAWAY splitter (sans-io, no sockets)."""

from __future__ import annotations

import struct

import h2.config
import h2.connection
import pytest
from hyperframe.frame import DataFrame, GoAwayFrame, HeadersFrame, PingFrame

from meshproxy.core.errors import ProtocolError
from meshproxy.core.h2util import (
    PREFACE,
    GoAway,
    GoAwaySplitter,
    goaway_frame,
    h2_request_headers,
    h2_response_headers,
    h2_trailers,
    request_head_from_h2,
    response_head_from_h2,
    trailers_from_h2,
)
from meshproxy.core.http import RequestHead, ResponseHead

# --- header mapping -------------------------------------------------------------------------


def test_request_head_from_pseudo_headers() -> None:
    head = request_head_from_h2(
        [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":authority", b"inventory.demo:8080"),
            (b":path", b"/pkg.Svc/Get?x=1"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"x-raw", b"caf\xe9"),
        ]
    )
    assert head == RequestHead(
        "POST",
        "/pkg.Svc/Get?x=1",
        "inventory.demo:8080",
        (("content-type", "application/grpc"), ("te", "trailers"), ("x-raw", "caf\xe9")),
        scheme="http",
        version="2",
    )


def test_host_header_is_the_authority_when_pseudo_header_missing() -> None:
    head = request_head_from_h2(
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"host", b"svc:80"), (b"a", b"b")]
    )
    assert head.authority == "svc:80"
    assert head.headers == (("a", "b"),)


@pytest.mark.parametrize(
    "block",
    [
        [(b":scheme", b"http"), (b":path", b"/")],  # no method
        [(b":method", b"GET"), (b":scheme", b"http")],  # no path
        [(b":method", b"GET"), (b":path", b"/")],  # no scheme
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":protocol", b"x")],
        [(b":method", b"CONNECT"), (b":path", b"/")],  # CONNECT without authority
    ],
)
def test_malformed_request_blocks_are_rejected(block: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(ProtocolError) as err:
        request_head_from_h2(block)
    assert err.value.status == 400


def test_request_block_strips_connection_specific_fields_but_keeps_te_trailers() -> None:
    head = RequestHead(
        "POST",
        "/a",
        "svc.demo:80",
        (
            ("host", "svc.demo:80"),
            ("connection", "keep-alive, x-hop"),
            ("keep-alive", "timeout=5"),
            ("x-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("te", "trailers"),
            ("x-end", "2"),
        ),
    )
    assert h2_request_headers(head) == [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", b"svc.demo:80"),
        (b":path", b"/a"),
        (b"te", b"trailers"),
        (b"x-end", b"2"),
    ]


def test_http1_request_without_authority_uses_host_header() -> None:
    head = RequestHead("GET", "/", "", (("host", "legacy:8080"),))
    assert (b":authority", b"legacy:8080") in h2_request_headers(head)


def test_request_block_is_accepted_by_h2() -> None:
    # The blocks we build must pass h2's own outbound validation.
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    head = RequestHead("GET", "/x", "a:1", (("connection", "close"), ("te", "trailers"), ("accept", "*/*")))
    conn.send_headers(1, h2_request_headers(head), end_stream=True)


def test_response_roundtrip_and_trailers() -> None:
    head = ResponseHead(200, (("content-type", "application/grpc"), ("connection", "close")), version="1.1")
    block = h2_response_headers(head)
    assert block == [(b":status", b"200"), (b"content-type", b"application/grpc")]
    assert response_head_from_h2(block) == ResponseHead(
        200, (("content-type", "application/grpc"),), version="2"
    )
    trailers = (("grpc-status", "5"), ("grpc-message", "not%20found"), ("transfer-encoding", "x"))
    assert h2_trailers(trailers) == [(b"grpc-status", b"5"), (b"grpc-message", b"not%20found")]
    assert trailers_from_h2([(b"grpc-status", b"0")], client_side=True) == (("grpc-status", "0"),)
    with pytest.raises(ProtocolError):
        trailers_from_h2([(b":status", b"200")], client_side=True)  # no pseudo-headers in trailers


@pytest.mark.parametrize(
    "extra",
    [
        (b"connection", b"close"),  # connection-specific (RFC 9113 8.2.2)
        (b"te", b"gzip"),  # only "trailers" allowed
        (b"X-Upper", b"1"),  # field names are lower-case in HTTP/2
        (b"x-smuggle", b"a\r\nhost: evil"),  # CR/LF would split the request when sent as HTTP/1
        (b"x-nul", b"a\x00b"),
    ],
)
def test_malformed_fields_are_a_protocol_error_for_that_request(extra: tuple[bytes, bytes]) -> None:
    block = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/"), extra]
    with pytest.raises(ProtocolError) as err:
        request_head_from_h2(block)
    assert err.value.status == 400


def test_pseudo_header_after_regular_field_is_rejected() -> None:
    with pytest.raises(ProtocolError):
        request_head_from_h2([(b":method", b"GET"), (b"a", b"b"), (b":path", b"/"), (b":scheme", b"http")])


@pytest.mark.parametrize(
    "block", [[(b"a", b"b")], [(b":status", b"abc")], [(b":status", b"200"), (b":path", b"/")]]
)
def test_bad_response_blocks_are_protocol_errors_with_502(block: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(ProtocolError) as err:
        response_head_from_h2(block)
    assert err.value.status == 502


# --- GOAWAY splitter ------------------------------------------------------------------------


def _frames() -> tuple[bytes, bytes, bytes, bytes]:
    headers = HeadersFrame(1, data=b"\x82\x86", flags=["END_HEADERS"]).serialize()
    data = DataFrame(1, data=b"x" * 100).serialize()
    ping = PingFrame(0, opaque_data=b"12345678").serialize()
    goaway = GoAwayFrame(0, last_stream_id=7, error_code=0, additional_data=b"bye").serialize()
    return headers, data, ping, goaway


def _feed_in_pieces(splitter: GoAwaySplitter, stream: bytes, size: int) -> list[bytes | GoAway]:
    out: list[bytes | GoAway] = []
    for i in range(0, len(stream), size):
        out.extend(splitter.feed(stream[i : i + size]))
    # Join adjacent byte runs so results for different piece sizes compare equal.
    joined: list[bytes | GoAway] = []
    for item in out:
        if isinstance(item, bytes) and joined and isinstance(joined[-1], bytes):
            joined[-1] += item
        else:
            joined.append(item)
    return joined


@pytest.mark.parametrize("size", [1, 2, 5, 9, 10, 17, 100, 10_000])
def test_splitter_takes_out_goaway_at_its_position_for_any_read_size(size: int) -> None:
    headers, data, ping, goaway = _frames()
    stream = PREFACE + headers + data + goaway + ping + data
    result = _feed_in_pieces(GoAwaySplitter(expect_preface=True), stream, size)
    assert result == [PREFACE + headers + data, GoAway(7, 0, b"bye"), ping + data]


def test_splitter_passes_a_stream_without_goaway_through_unchanged() -> None:
    headers, data, ping, _ = _frames()
    stream = headers + data + ping
    splitter = GoAwaySplitter(expect_preface=False)
    out = splitter.feed(stream)
    assert out == [stream]
    assert out[0] is stream  # no copy in the common case


def test_splitter_reports_error_goaway() -> None:
    frame = goaway_frame(3, error_code=0x1, debug_data=b"bad frame")
    assert GoAwaySplitter(expect_preface=False).feed(frame) == [GoAway(3, 1, b"bad frame")]


def test_malformed_goaway_is_left_for_h2_to_reject() -> None:
    on_stream = struct.pack(">HBBBL", 0, 8, 0x7, 0, 5) + bytes(8)  # GOAWAY must be on stream 0
    too_short = struct.pack(">HBBBL", 0, 4, 0x7, 0, 0) + bytes(4)  # needs at least 8 bytes
    assert GoAwaySplitter(expect_preface=False).feed(on_stream + too_short) == [on_stream + too_short]
