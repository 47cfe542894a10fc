"""Protocol sniffing from the first bytes of a connection."""

from __future__ import annotations

import pytest

from meshproxy.core.detect import H2_PREFACE, MAX_PREFIX, Detected, detect


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"POST /api/orders HTTP/1.0\r\n",
        b"OPTIONS * HTTP/1.1\r\n",
        b"CONNECT example.com:443 HTTP/1.1\r\n",
        b"GET http://inventory.demo/x HTTP/1.1\n",
        b"DELETE /items/1",  # request line not complete yet: method + target are enough
    ],
)
def test_http1(data: bytes) -> None:
    assert detect(data) is Detected.HTTP1


def test_http2_preface_and_its_prefixes() -> None:
    assert detect(H2_PREFACE) is Detected.HTTP2
    assert detect(H2_PREFACE + b"\x00\x00\x12\x04") is Detected.HTTP2
    for n in range(1, len(H2_PREFACE)):
        assert detect(H2_PREFACE[:n]) is Detected.NEED_MORE, n


@pytest.mark.parametrize("data", [b"G", b"GE", b"GET", b"GET ", b"OPTIO", b"P", b"PA"])
def test_need_more_while_still_ambiguous(data: bytes) -> None:
    assert detect(data) is Detected.NEED_MORE


def test_empty_needs_more() -> None:
    assert detect(b"") is Detected.NEED_MORE


@pytest.mark.parametrize(
    "data",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # TLS ClientHello
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"*1\r\n$4\r\nPING\r\n",  # Redis
        b"get / HTTP/1.1\r\n",  # methods are case-sensitive
        b"GETX / HTTP/1.1\r\n",
        b"GET  / HTTP/1.1\r\n",
        b"GET / HTTP/2.0\r\n",  # a complete line with a version we do not speak
        b"GET /x SPDY\r\n",
        b"PRX",
        b"\x00",
    ],
)
def test_tcp_as_soon_as_excluded(data: bytes) -> None:
    assert detect(data) is Detected.TCP


def test_bounded_examination() -> None:
    assert detect(b"G" * (MAX_PREFIX * 4)) is Detected.TCP
    # A very long URL: decided on the method and target start, not on the whole line.
    assert detect(b"GET /" + b"a" * 5000) is Detected.HTTP1
    # A preface prefix cut short by a tiny bound can never complete: TCP.
    assert detect(H2_PREFACE[:4], max_bytes=4) is Detected.TCP
    assert detect(b"GE", max_bytes=2) is Detected.TCP
