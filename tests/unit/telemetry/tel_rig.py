"""Helpers shared by the telemetry tests (imported by name: the test dirs are not packages)."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from meshproxy.core.http import Headers, RequestHead
from meshproxy.telemetry import Telemetry


@dataclass
class Rig:
    tel: Telemetry
    exporter: InMemorySpanExporter
    log: io.StringIO

    def spans(self) -> list[ReadableSpan]:
        self.tel.tracing.force_flush()
        return list(self.exporter.get_finished_spans())


def head(
    path: str = "/items/1",
    headers: Headers = (),
    method: str = "GET",
    authority: str = "inventory.demo:8080",
    version: str = "1.1",
) -> RequestHead:
    return RequestHead(method=method, path=path, authority=authority, headers=headers, version=version)


MakeRig = Callable[..., Rig]


async def eventually(cond: Callable[[], bool], deadline: float = 10.0, step: float = 0.02) -> bool:
    """Poll ``cond`` (state written by another thread) until it holds or ``deadline`` passes."""
    import asyncio

    for _ in range(max(1, int(deadline / step))):
        if cond():
            return True
        await asyncio.sleep(step)
    return cond()
