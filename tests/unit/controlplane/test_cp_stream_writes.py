"""``DiscoveryService._write``: one response written to one proxy, or the proxy evicted.

Owns: the eviction rules of a single write, fed a fake gRPC context whose write we
control: a write that finishes returns; one that does not finish within
``send_timeout`` evicts the proxy; the stream's alarm (its send slot overflowed, or its
reader ended) evicts it at once, without waiting for the timeout; the stuck write is
handed over with the eviction (its status follows it). Concurrency: one event loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from controlplane.cache import SnapshotCache
from controlplane.compile import ProxyNode
from controlplane.metrics import ControlPlaneMetrics
from controlplane.server import DiscoveryService, _Evicted, _Stream
from controlplane.settings import ControlPlaneSettings
from meshproxy.config.model import Snapshot


class _Registry:
    async def wait_synced(self) -> None:
        return None

    def add_node(self, node_id: str, node: ProxyNode) -> Snapshot:
        raise AssertionError("not used")

    def remove_node(self, node_id: str) -> None:
        raise AssertionError("not used")


class _Context:
    """A call whose writes finish only when the test says so."""

    def __init__(self) -> None:
        self.writes: list[asyncio.Future[None]] = []
        self.started = asyncio.Event()

    async def write(self, msg: Any) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.writes.append(done)
        self.started.set()
        await done


def _service(send_timeout: float) -> DiscoveryService:
    return DiscoveryService(
        _Registry(), SnapshotCache(), ControlPlaneSettings(send_timeout=send_timeout), ControlPlaneMetrics()
    )


def _stream() -> _Stream:
    return _Stream(node_id="p.ns", node=ProxyNode("p", "ns"), connected_since="", queue_limit=2)


async def test_a_finished_write_returns_and_leaves_no_alarm_behind() -> None:
    service, stream, ctx = _service(30.0), _stream(), _Context()
    task = asyncio.create_task(service._write(stream, ctx, b"x"))  # type: ignore[arg-type]
    await ctx.started.wait()
    ctx.writes[0].set_result(None)
    await asyncio.wait_for(task, 5)
    assert stream.alarm is None
    for _ in range(3):  # later offers, even an overflow, concern the next write only
        stream.offer(Snapshot(version="v"))
    assert stream.overflow


async def test_a_write_that_does_not_finish_in_time_evicts_the_proxy() -> None:
    service, stream, ctx = _service(0.05), _stream(), _Context()
    with pytest.raises(_Evicted) as ev:
        await asyncio.wait_for(service._write(stream, ctx, b"x"), 5)  # type: ignore[arg-type]
    assert "longer than 0.05s" in ev.value.reason
    assert ev.value.write is not None and not ev.value.write.done()  # handed over, still pending
    ev.value.write.cancel()


@pytest.mark.parametrize("alarm", ["overflow", "reader ended"])
async def test_the_streams_alarm_evicts_at_once_during_a_stuck_write(alarm: str) -> None:
    service, stream, ctx = _service(3600.0), _stream(), _Context()
    task = asyncio.create_task(service._write(stream, ctx, b"x"))  # type: ignore[arg-type]
    await ctx.started.wait()  # _write hooked the alarm before its write could start
    assert stream.alarm is not None
    if alarm == "overflow":
        for _ in range(3):
            stream.offer(Snapshot(version="v"))
    else:
        stream.reader_done = True
        stream.raise_alarm()
    with pytest.raises(_Evicted) as ev:
        await asyncio.wait_for(task, 5)  # far below the hour-long send timeout
    assert ("queued" if alarm == "overflow" else "went away") in ev.value.reason
    assert ev.value.write is not None
    ev.value.write.cancel()


async def test_a_stream_already_alarmed_is_evicted_without_waiting() -> None:
    service, stream, ctx = _service(3600.0), _stream(), _Context()
    stream.reader_done = True
    with pytest.raises(_Evicted):
        await asyncio.wait_for(service._write(stream, ctx, b"x"), 5)  # type: ignore[arg-type]
