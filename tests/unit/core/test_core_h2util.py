"""HTTP/2 header mapping and the GOAWAY splitter (sans-io, no sockets)."""

from __future__ import annotations

import random
import struct

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest
from h2.utilities import HeaderValidationFlags, validate_headers
from hpack import NeverIndexedHeaderTuple
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
    new_connection,
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


# --- outbound blocks and the h2 configuration (new_connection) -----------------------------


def _validating_peer(*, client_side: bool) -> h2.connection.H2Connection:
    """An h2 endpoint with every check on (h2's defaults), standing in for grpc-go, Envoy..."""
    peer = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=client_side, header_encoding=None)
    )
    peer.initiate_connection()
    return peer


def _connected() -> tuple[h2.connection.H2Connection, h2.connection.H2Connection]:
    ours = new_connection(client_side=True)
    ours.initiate_connection()
    peer = _validating_peer(client_side=False)
    for _ in range(2):
        peer.receive_data(ours.data_to_send())
        ours.receive_data(peer.data_to_send())
    return ours, peer


def _send_request(
    ours: h2.connection.H2Connection, peer: h2.connection.H2Connection, head: RequestHead
) -> list[tuple[bytes, bytes]]:
    sid = ours.get_next_available_stream_id()
    ours.send_headers(sid, h2_request_headers(head), end_stream=True)
    events = peer.receive_data(ours.data_to_send())
    received = [e for e in events if isinstance(e, h2.events.RequestReceived)]
    assert len(received) == 1, events
    return list(received[0].headers)


def test_outbound_block_is_normalized_here_and_accepted_by_a_validating_peer() -> None:
    # h2's own outbound normalization is off (new_connection): this module does it.
    ours, peer = _connected()
    head = RequestHead(
        "POST",
        "/pkg.Svc/Call",
        "svc.demo:8080",
        (
            ("content-type", "application/grpc"),
            ("X-Mixed-Case", "1"),  # the model keeps names lower-case; lenient if it did not
            ("x-padded", " \tvalue\t "),  # surrounding whitespace is not allowed on the wire
            ("te", "trailers"),
            ("connection", "close"),
            ("x-empty", ""),
        ),
    )
    assert _send_request(ours, peer, head) == [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", b"svc.demo:8080"),
        (b":path", b"/pkg.Svc/Call"),
        (b"content-type", b"application/grpc"),
        (b"x-mixed-case", b"1"),
        (b"x-padded", b"value"),
        (b"te", b"trailers"),
        (b"x-empty", b""),
    ]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("x-smuggle", "a\r\nhost: evil"),
        ("x-nul", "a\x00b"),
        ("x-lf", "a\nb"),
        ("bad name", "1"),
        ("x:colon", "1"),
    ],
)
def test_fields_http2_cannot_carry_are_refused_before_anything_is_sent(name: str, value: str) -> None:
    with pytest.raises(ProtocolError) as err:
        h2_request_headers(RequestHead("GET", "/", "a", ((name, value),)))
    assert err.value.status == 400
    with pytest.raises(ProtocolError) as err:
        h2_response_headers(ResponseHead(200, ((name, value),)))
    assert err.value.status == 502
    with pytest.raises(ProtocolError) as err:
        h2_trailers(((name, value),))
    assert err.value.status == 502


def test_bad_pseudo_header_values_are_refused_and_padding_is_stripped() -> None:
    for head in (RequestHead("", "/", "a", ()), RequestHead("GET", "/x\r\ny", "a", ())):
        with pytest.raises(ProtocolError):
            h2_request_headers(head)
    assert h2_request_headers(RequestHead("GET", "/", " svc:80 ", ()))[2] == (b":authority", b"svc:80")


def test_per_request_ids_stay_out_of_the_peers_header_table_and_repeated_fields_are_indexed() -> None:
    ours, peer = _connected()
    sizes = []
    for i in range(60):
        tid = f"{i:032x}"
        head = RequestHead(
            "POST",
            "/pkg.Svc/Call",
            "svc.demo:8080",
            (
                ("content-type", "application/grpc"),
                ("user-agent", "grpc-go/1.66.2"),
                ("traceparent", f"00-{tid}-{i:016x}-01"),
                ("x-request-id", f"req-{i:08d}-0123456789"),
                ("grpc-timeout", f"{1000 - i}m"),
                ("authorization", "Bearer secret-token"),
            ),
        )
        sid = ours.get_next_available_stream_id()
        ours.send_headers(sid, h2_request_headers(head), end_stream=True)
        wire = ours.data_to_send()
        sizes.append(len(wire))
        events = peer.receive_data(wire)
        (req,) = [e for e in events if isinstance(e, h2.events.RequestReceived)]
        fields = dict(req.headers)
        assert fields[b"x-request-id"] == f"req-{i:08d}-0123456789".encode()
        assert fields[b"traceparent"].startswith(b"00-" + tid.encode())
        # Credentials and ids arrive as never-indexed: no hop may index them either.
        never = {bytes(h[0]) for h in req.headers if isinstance(h, NeverIndexedHeaderTuple)}
        assert {b"x-request-id", b"traceparent", b"grpc-timeout", b"authorization"} <= never
    table = peer.decoder.header_table.dynamic_entries
    names = {name for name, _ in table}
    assert b"user-agent" in names and b":path" in names  # what repeats is indexed once ...
    assert not names & {b"x-request-id", b"traceparent", b"grpc-timeout", b"authorization"}
    assert len(table) < 10  # ... and the table is not churned by values seen once
    # After the first request, repeated fields cost a byte each: only the ids are literal.
    assert max(sizes[1:]) < sizes[0]


def test_literals_are_sent_without_huffman_coding_and_decode_alike() -> None:
    ours, peer = _connected()
    head = RequestHead("GET", "/", "a", (("x-request-id", "0123456789abcdef"),))
    sid = ours.get_next_available_stream_id()
    ours.send_headers(sid, h2_request_headers(head), end_stream=True)
    wire = ours.data_to_send()
    assert b"0123456789abcdef" in wire  # plain literal on the wire
    (req,) = [e for e in peer.receive_data(wire) if isinstance(e, h2.events.RequestReceived)]
    assert (b"x-request-id", b"0123456789abcdef") in req.headers


# --- inbound validation agrees with h2's own validator --------------------------------------

_NAMES = [
    b":method", b":scheme", b":authority", b":path", b":status", b":protocol", b":custom", b":Method",
    b"content-type", b"te", b"host", b"connection", b"keep-alive", b"upgrade", b"transfer-encoding",
    b"X-Upper", b"x-ok", b"bad name", b"x:colon", b"", b"x\x7f", b"caf\xe9", b"x-\"quoted\"",
]  # fmt: skip
_VALUES = [
    b"", b"GET", b"CONNECT", b"POST", b"http", b"/", b"200", b"svc:80", b"other:80", b"trailers",
    b"Trailers", b"gzip", b" padded", b"padded\t", b"a\r\nb", b"a\x00b", b"a\nb", b"caf\xe9", b"a b",
]  # fmt: skip


_WELL_FORMED = [
    (b"x-ok", b"1"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
    (b"host", b"svc:80"),
]


def _random_block(rng: random.Random) -> list[tuple[bytes, bytes]]:
    block: list[tuple[bytes, bytes]] = []
    shape = rng.random()
    if shape < 0.35:  # mostly-valid request, then mutated
        block = [(b":method", rng.choice([b"GET", b"CONNECT", b"POST"])), (b":scheme", b"http"),
                 (b":authority", rng.choice([b"svc:80", b""])), (b":path", rng.choice([b"/", b""]))]  # fmt: skip
        rng.shuffle(block) if rng.random() < 0.1 else None
        block = [h for h in block if rng.random() > 0.05]
    elif shape < 0.6:  # mostly-valid response or trailers
        block = [(b":status", b"200")] if rng.random() < 0.7 else []
    for _ in range(rng.randrange(0, 5)):
        if rng.random() < 0.75:
            block.append(rng.choice(_WELL_FORMED))
        else:
            block.append((rng.choice(_NAMES), rng.choice(_VALUES)))
    if rng.random() < 0.2 and block:
        i = rng.randrange(len(block))
        block.insert(rng.randrange(len(block) + 1), block[i])  # duplicates
    return block


_FLAGS = {
    "request": HeaderValidationFlags(is_client=False, is_trailer=False, is_response_header=False, is_push_promise=False),
    "response": HeaderValidationFlags(is_client=True, is_trailer=False, is_response_header=True, is_push_promise=False),
    "trailers": HeaderValidationFlags(is_client=True, is_trailer=True, is_response_header=False, is_push_promise=False),
}  # fmt: skip


def _ours(kind: str, block: list[tuple[bytes, bytes]]) -> bool:
    try:
        if kind == "request":
            request_head_from_h2(block)
        elif kind == "response":
            response_head_from_h2(block)
        else:
            trailers_from_h2(block, client_side=True)
    except ProtocolError:
        return False
    return True


def _h2s(kind: str, block: list[tuple[bytes, bytes]]) -> bool:
    try:
        list(validate_headers(block, _FLAGS[kind]))
    except h2.exceptions.ProtocolError:
        return False
    if kind == "request":  # checks of the mapping itself, on top of h2's
        fields = dict(block)
        if b":protocol" in fields:
            return False  # extended CONNECT (RFC 8441) is not supported
        if fields[b":method"] == b"CONNECT":
            return b":authority" in fields
    if kind == "response":
        status = dict(block)[b":status"]
        return status.isdigit() and 100 <= int(status) <= 999
    return True


@pytest.mark.parametrize("kind", ["request", "response", "trailers"])
def test_inbound_validation_accepts_and_rejects_what_h2_does(kind: str) -> None:
    rng = random.Random(f"h2-validation-{kind}")  # a fixed corpus: same blocks every run
    accepted = rejected = 0
    for _ in range(4000):
        block = _random_block(rng)
        expected = _h2s(kind, block)
        assert _ours(kind, block) == expected, block
        accepted += expected
        rejected += not expected
    assert accepted > 100 and rejected > 100  # the corpus exercises both outcomes


@pytest.mark.parametrize(
    "fields",
    [
        (("x-padded", "\t v \t"), ("x-ok", "1")),  # only whitespace to fix
        (("X-Padded", "\t v \t"), ("x-ok", "1")),  # and a name to lower-case
    ],
)
def test_surrounding_whitespace_is_stripped_and_names_lowered(fields: tuple[tuple[str, str], ...]) -> None:
    assert h2_trailers(fields) == [(b"x-padded", b"v"), (b"x-ok", b"1")]
    assert h2_response_headers(ResponseHead(200, fields))[1:] == [(b"x-padded", b"v"), (b"x-ok", b"1")]


def test_splitter_returns_any_frame_stream_unchanged_however_it_is_read() -> None:
    headers, data, ping, goaway = _frames()
    empty = DataFrame(1, data=b"", flags=["END_STREAM"]).serialize()  # a frame with no body
    stream = headers + data + empty + ping + data + empty + headers
    for size in range(1, 60):
        assert _feed_in_pieces(GoAwaySplitter(expect_preface=False), stream, size) == [stream], size
    # and with a GOAWAY in it, at every offset a read can start or end on
    stream = headers + empty + goaway + data + empty
    for size in range(1, 60):
        result = _feed_in_pieces(GoAwaySplitter(expect_preface=False), stream, size)
        assert result == [headers + empty, GoAway(7, 0, b"bye"), data + empty], size
