"""The benchmark's span sink counts what both OTLP transports deliver into one total, so the
bench can check that every request's spans arrived whichever protocol the sidecars used."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshproxy.telemetry.otlp_grpc import OtlpGrpcClient
from meshproxy.telemetry.otlp_http import OtlpHttpClient
from tests.support.otlp import export_request as request

ROOT = Path(__file__).resolve().parents[3]


def _ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [int(s.getsockname()[1]) for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[tuple[int, int, Path]]:
    grpc_port, http_port = _ports(2)
    out = tmp_path / "spans.count"
    argv = [sys.executable, "-m", "bench.spancount", "--port", str(grpc_port), "--http-port", str(http_port)]
    proc = subprocess.Popen([*argv, "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    ready = [proc.stdout.readline() for _ in range(2)]  # it says so once both listen
    assert any("OTLP/gRPC" in line for line in ready), ready
    yield grpc_port, http_port, out
    proc.terminate()
    proc.wait(10)


async def test_both_transports_add_to_one_total(sink: tuple[int, int, Path]) -> None:
    grpc_port, http_port, out = sink
    via_grpc = OtlpGrpcClient(f"http://127.0.0.1:{grpc_port}", timeout=5)
    via_http = OtlpHttpClient(f"http://127.0.0.1:{http_port}/v1/traces", timeout=5)
    assert await via_grpc.export(request(3))
    assert await via_http.export(request(4))
    assert await via_http.export(request(5))
    await via_grpc.aclose()
    await via_http.aclose()
    assert out.read_text().strip() == "12"
    # Anything but the OTLP path is refused, and counts nothing.
    wrong = OtlpHttpClient(f"http://127.0.0.1:{http_port}/v1/logs", timeout=1)
    assert not await wrong.export(request(1))
    await wrong.aclose()
    assert out.read_text().strip() == "12"
