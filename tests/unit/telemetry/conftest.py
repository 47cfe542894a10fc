"""Fixtures for telemetry tests: a Telemetry with an in-memory span exporter and captured access log."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from tel_rig import MakeRig, Rig

from meshproxy.config import model
from meshproxy.telemetry import Telemetry


@pytest.fixture
async def make_rig() -> AsyncIterator[MakeRig]:
    rigs: list[Rig] = []

    def make(
        *,
        workload: str = "frontend",
        namespace: str = "demo",
        ratio: float = 1.0,
        propagation: tuple[model.Propagation, ...] = (model.Propagation.W3C, model.Propagation.B3_MULTI),
        access_log: model.AccessLogMode = model.AccessLogMode.OFF,
        metrics: bool = True,
    ) -> Rig:
        exporter = InMemorySpanExporter()
        out = io.StringIO()
        settings = model.Telemetry(
            tracing=model.Tracing(sampling_ratio=ratio, propagation=propagation),
            access_log=access_log,
            metrics=metrics,
        )
        tel = Telemetry.build(
            settings,
            model.Workload(name=workload, namespace=namespace),
            env={},
            extra_exporters=[exporter],
            access_log_stream=out,
            schedule_delay_millis=50,
        )
        rig = Rig(tel, exporter, out)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        await rig.tel.shutdown(grace=5.0)
