"""Response flags: the one table, HTTP and gRPC local replies."""

from __future__ import annotations

import urllib.parse

import pytest

from meshproxy.core.flags import FLAGS, Flag, grpc_local_reply, grpc_status_for_http, local_reply
from meshproxy.core.http import get_header

EXPECTED_STATUS = {
    Flag.NR: 404,
    Flag.UH: 503,
    Flag.UF: 503,
    Flag.UO: 503,
    Flag.CO: 503,
    Flag.URX: 503,
    Flag.UT: 504,
    Flag.UR: 502,
    Flag.UC: 503,
    Flag.RL: 429,
    Flag.DPE: 400,
    Flag.NC: 503,
}


def test_every_flag_has_one_table_entry() -> None:
    assert set(FLAGS) == set(Flag)
    for flag, info in FLAGS.items():
        assert info.reason, flag


@pytest.mark.parametrize(("flag", "status"), sorted(EXPECTED_STATUS.items(), key=lambda kv: kv[0].value))
def test_local_reply_status_and_headers(flag: Flag, status: int) -> None:
    reply = local_reply(flag, "inventory.demo:8080")
    assert reply.status == status
    assert get_header(reply.headers, "x-meshproxy-flag") == flag.value
    reason = get_header(reply.headers, "x-meshproxy-reason")
    assert reason is not None and "inventory.demo:8080" in reason and FLAGS[flag].reason in reason
    assert get_header(reply.headers, "content-length") == str(len(reply.body))
    assert reply.body.startswith(flag.value.encode())


def test_runtime_status_only_for_fi_and_urx() -> None:
    assert local_reply(Flag.FI, status=418).status == 418
    assert local_reply(Flag.URX, status=502).status == 502
    assert local_reply(Flag.URX).status == 503
    assert local_reply(Flag.UO, status=200).status == 503  # the table wins


def test_detail_cannot_inject_headers() -> None:
    reply = local_reply(Flag.UH, "evil\r\nx-injected: 1 \u2603")
    reason = get_header(reply.headers, "x-meshproxy-reason")
    assert reason is not None and "\r" not in reason and "\n" not in reason
    reason.encode("latin-1")  # must be encodable on the wire
    assert get_header(reply.headers, "x-injected") is None


def test_grpc_reply_is_trailers_only_with_mapped_status() -> None:
    reply = grpc_local_reply(Flag.UT, "inventory.demo:8080 after 2s")
    assert reply.status == 200 and reply.body == b""
    assert get_header(reply.headers, "content-type") == "application/grpc"
    assert get_header(reply.headers, "grpc-status") == "4"
    message = get_header(reply.headers, "grpc-message")
    assert message is not None
    assert "UT" in urllib.parse.unquote(message) and "after 2s" in urllib.parse.unquote(message)
    assert get_header(grpc_local_reply(Flag.UH).headers, "grpc-status") == "14"
    assert get_header(grpc_local_reply(Flag.NR).headers, "grpc-status") == "12"
    assert get_header(grpc_local_reply(Flag.RL).headers, "grpc-status") == "8"


def test_grpc_message_percent_encodes_non_ascii_and_percent() -> None:
    reply = grpc_local_reply(Flag.UH, "100% busy")
    message = get_header(reply.headers, "grpc-message")
    assert message is not None and "%25" in message
    assert urllib.parse.unquote(message).endswith("100% busy")


def test_grpc_fault_status_maps_from_http() -> None:
    assert grpc_status_for_http(503) == 14
    assert grpc_status_for_http(404) == 12
    assert grpc_status_for_http(500) == 2
    reply = grpc_local_reply(Flag.FI, status=404)
    assert get_header(reply.headers, "grpc-status") == "12"
