"""The proxy's tracing pipeline: sampler, resource, and one bounded export queue per exporter.

Owns: ``TracingPipeline`` (one per tracing configuration: who this proxy is as an
OpenTelemetry ``Resource``, the parent-based ratio sampler, the span encoder, the export
queues) and ``ExportQueue`` (a bounded queue drained in batches by one worker thread).

Flow: a hop's ``SpanRecord`` is finished on the event loop and ``submit``-ted. For the OTLP
exporters (gRPC and HTTP) it is encoded to OTLP bytes right there, once, and the bytes are
queued. OTLP/HTTP and OTLP/gRPC in plaintext (the in-cluster case) are drained by a task on
the event loop (``otlp_loop``: no thread); the other OTLP exporters by a worker thread that
joins a batch into one request and sends it with the OpenTelemetry exporter's transport. For exporters that take SDK spans
(Zipkin, and exporters a caller adds, e.g. tests' in-memory one) the record itself is
queued and converted to a ``ReadableSpan`` on the worker thread.

Invariants:
  * Never touches OpenTelemetry's global state; nothing here can block the event loop:
    ``submit`` is an encode and a few appends, the loop's export tasks only await, and
    the worker threads hold the GIL only for a ``b"".join`` (wire) or the conversion
    (SDK) per batch; network waits release it.
  * Batches hold ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE`` spans (default 128, at most the
    queue); a partial batch leaves after ``OTEL_BSP_SCHEDULE_DELAY`` ms (default 1000).
  * Each queue holds at most ``Tracing.max_queue_size`` spans. A span that finds its
    queue full is dropped and counted in ``meshproxy_spans_dropped_total{reason=
    "queue_full"}``; a batch whose export fails (after the exporter's own retries) is
    counted with ``reason="export_failed"``. Both counts are exact.
  * Sampling is ``ParentBased(TraceIdRatioBased(ratio))`` (``spans.RatioSampler``): a
    sampled parent is always followed and an unsampled one never.
  * A pipeline with no exporter records no spans (``recording`` is False), but the
    sampling decision is still made and propagated, so the hops after this one agree.

Concurrency: ``submit`` runs on the event-loop thread. An ``otlp_loop.AsyncExportQueue``
is drained by a task on the same loop (``flush``/``aclose`` are awaited); an
``ExportQueue`` has one daemon worker thread. ``deque`` appends and pops are atomic, so the
loop never takes a lock per span: it sets the worker's ``threading.Event`` only when a
full batch is waiting. ``force_flush`` and ``shutdown`` (threaded queues) block and are
called off the loop (tests, ``Telemetry.shutdown``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from meshproxy.config.model import Propagation, Tracing, Workload
from meshproxy.telemetry import exporters
from meshproxy.telemetry.metrics import ProxyMetrics
from meshproxy.telemetry.otlp_loop import AsyncExportQueue, LoopClient, QueueBounds, SpanBatches
from meshproxy.telemetry.otlp_wire import WireEncoder
from meshproxy.telemetry.spans import SCOPE, AttrValue, RatioSampler, SpanRecord, to_readable

log = logging.getLogger(__name__)

_MAX_STATIC = 4096  # cached static attribute sets per pipeline (a few MB at most)
MAX_EXPORT_BATCH = 128  # spans per export request (~90 KB of OTLP at this proxy's span size)
SCHEDULE_DELAY_MILLIS = 1000.0  # a partial batch waits at most this long


def batch_settings(env: Mapping[str, str], max_queue_size: int) -> tuple[float, int]:
    """``(schedule delay in ms, spans per export)`` from the OpenTelemetry SDK's variables
    ``OTEL_BSP_SCHEDULE_DELAY`` and ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE``; a missing or invalid
    value (logged) keeps this proxy's default. The batch never exceeds the queue."""
    delay = _positive(env, "OTEL_BSP_SCHEDULE_DELAY", SCHEDULE_DELAY_MILLIS)
    batch = int(_positive(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", MAX_EXPORT_BATCH))
    return delay, max(1, min(batch, max_queue_size))


def _positive(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if value >= 1 and value == int(value):
        return value
    log.warning("%s=%r is not a positive integer; using %g", name, raw, default)
    return default


class ExportQueue(SpanBatches[Any]):
    """A bounded queue of spans for one exporter, drained in batches by a worker thread."""

    def __init__(
        self, name: str, send: Callable[[list[Any]], bool], close: Callable[[], None], bounds: QueueBounds
    ) -> None:
        super().__init__(name, bounds)
        self._send = send
        self._close = close
        self._wake = threading.Event()
        self._done = threading.Condition()
        self._flush_asked = 0  # tickets: a flush is done when the worker finished a drain
        self._flush_done = 0  # that started after the ticket was taken
        self._stopping = False
        self._worker = threading.Thread(target=self._run, name=f"meshproxy-export-{name}", daemon=True)
        self._worker.start()

    def offer(self, item: Any) -> None:
        """Queue one span (loop thread). Never blocks; a full queue drops and counts."""
        queue = self._queue
        if len(queue) >= self._max:
            self._on_full(1)
            return
        queue.append(item)
        if len(queue) >= self._batch and not self._wake.is_set():
            self._wake.set()

    def _run(self) -> None:
        while True:
            ticked = not self._wake.wait(self._delay)
            self._wake.clear()
            ticket = self._flush_asked
            stopping = self._stopping
            # Full batches go at once; a partial one waits for the timer, a flush or shutdown
            # (draining whatever is there after each export made many small exports).
            self._drain(everything=ticked or stopping or ticket > self._flush_done)
            with self._done:
                self._flush_done = max(self._flush_done, ticket)
                self._done.notify_all()
            if stopping:
                return

    def _drain(self, *, everything: bool) -> None:
        while self._has_batch(everything):
            batch = self._take()
            try:
                ok = self._send(batch)
            except Exception:
                log.warning(
                    "span exporter %s raised; dropping %d spans", self.name, len(batch), exc_info=True
                )
                ok = False
            self._settle(len(batch), ok)

    def flush(self, timeout: float) -> bool:
        """Export everything queued so far; False if that took longer than ``timeout``."""
        with self._done:
            self._flush_asked += 1
            ticket = self._flush_asked
        self._wake.set()
        with self._done:
            return self._done.wait_for(lambda: self._flush_done >= ticket, timeout)

    def shutdown(self, timeout: float) -> None:
        """Export what is queued, stop the worker, close the exporter."""
        self._stopping = True
        self._wake.set()
        self._worker.join(timeout)
        try:
            self._close()
        except Exception:
            log.warning("span exporter %s failed to shut down", self.name, exc_info=True)


def resource_for(workload: Workload, env: Mapping[str, str]) -> Resource:
    attrs: dict[str, str] = {
        "service.name": env.get("OTEL_SERVICE_NAME") or workload.name,
        "service.namespace": workload.namespace,
        "k8s.namespace.name": workload.namespace,
        "mesh.proxy": SCOPE,
    }
    if workload.pod:
        attrs["k8s.pod.name"] = workload.pod
    # Resource.create also merges OTEL_RESOURCE_ATTRIBUTES (from os.environ, as the SDK does).
    return Resource.create(attrs)


class TracingPipeline:
    """One tracing configuration: sampler, propagation formats, encoder, export queues."""

    def __init__(
        self,
        settings: Tracing,
        workload: Workload,
        metrics: ProxyMetrics,
        *,
        env: Mapping[str, str],
        extra_exporters: Sequence[SpanExporter] = (),
        schedule_delay_millis: float | None = None,
    ) -> None:
        self.settings = settings
        self.formats: tuple[Propagation, ...] = settings.propagation
        self.sampler = RatioSampler(settings.sampling_ratio)
        self.resource = resource_for(workload, env)
        self.scope = InstrumentationScope(SCOPE)
        named: list[tuple[str, exporters.AnyExporter]] = list(exporters.build(settings, env))
        named += [(f"extra:{i}", e) for i, e in enumerate(extra_exporters)]
        self.exporter_names = tuple(name for name, _ in named)
        self._wire: list[ExportQueue] = []
        self._sdk: list[ExportQueue] = []
        self._async: list[AsyncExportQueue] = []
        env_delay, batch = batch_settings(env, settings.max_queue_size)
        delay = max(0.001, (env_delay if schedule_delay_millis is None else schedule_delay_millis) / 1000.0)
        bounds = QueueBounds(
            max_queue_size=settings.max_queue_size,
            batch=batch,
            delay=delay,
            on_full=metrics.spans_dropped_queue_full,
            on_failed=metrics.spans_dropped_export_failed,
        )
        for name, exporter in named:
            if isinstance(exporter, LoopClient):
                self._async.append(AsyncExportQueue(name, exporter, self._encoded_request, bounds))
            elif isinstance(exporter, exporters.WireExporter):
                self._wire.append(ExportQueue(name, self._wire_sender(exporter), exporter.shutdown, bounds))
            else:
                self._sdk.append(ExportQueue(name, self._sdk_sender(exporter), exporter.shutdown, bounds))
        self.queues: tuple[ExportQueue, ...] = (*self._wire, *self._sdk)
        self.async_queues: tuple[AsyncExportQueue, ...] = tuple(self._async)
        self._encoded: tuple[AsyncExportQueue | ExportQueue, ...] = (*self._async, *self._wire)
        # Built only for OTLP exporters (it writes the wire format itself: no protobuf).
        self.encoder = WireEncoder(self.resource, self.scope) if self._encoded else None
        self.recording = bool(self.queues or self.async_queues)
        self._static: dict[tuple[object, ...], tuple[tuple[tuple[str, AttrValue], ...], bytes]] = {}

    def static_attributes(
        self, key: tuple[object, ...], build: Callable[[], list[tuple[str, AttrValue]]]
    ) -> tuple[tuple[tuple[str, AttrValue], ...], bytes]:
        """The attributes every request described by ``key`` shares, and their OTLP bytes.

        Built and encoded once per distinct ``key`` (a proxy sees a few callers, methods and
        destinations, request after request); at most ``_MAX_STATIC`` sets, then cleared."""
        hit = self._static.get(key)
        if hit is None:
            attrs = tuple(build())
            wire = self.encoder.attributes(attrs) if self.encoder is not None else b""
            if len(self._static) >= _MAX_STATIC:
                self._static.clear()
            hit = self._static[key] = (attrs, wire)
        return hit

    def _encoded_request(self, batch: list[bytes]) -> bytes:
        assert self.encoder is not None
        return self.encoder.request(batch)

    def _wire_sender(self, exporter: exporters.WireExporter) -> Callable[[list[bytes]], bool]:
        def send(batch: list[bytes]) -> bool:
            assert self.encoder is not None
            return exporter.export_encoded(self.encoder.request(batch), len(batch))

        return send

    def _sdk_sender(self, exporter: SpanExporter) -> Callable[[list[SpanRecord]], bool]:
        resource, scope = self.resource, self.scope

        def send(batch: list[SpanRecord]) -> bool:
            spans = [to_readable(r, resource, scope) for r in batch]
            return exporter.export(spans) is SpanExportResult.SUCCESS

        return send

    def submit(self, record: SpanRecord) -> None:
        """A finished, sampled span (loop thread)."""
        if self.encoder is not None:
            data = self.encoder.span(record)
            for q in self._encoded:
                q.offer(data)
        for q in self._sdk:
            q.offer(record)

    async def flush(self) -> None:
        """Export everything submitted so far to the event-loop exporters."""
        for q in self.async_queues:
            await q.flush()

    async def aclose(self, grace: float) -> None:
        """Flush and stop the event-loop exporters (the threaded ones: ``shutdown``)."""
        deadline = time.monotonic() + grace
        for q in self.async_queues:
            await q.aclose(max(0.001, deadline - time.monotonic()))

    def force_flush(self, timeout_millis: int = 5000) -> bool:
        """Export everything submitted so far to the threaded exporters. Blocking: tests and
        shutdown only (the event-loop exporters flush with ``await flush()``)."""
        deadline = time.monotonic() + timeout_millis / 1000.0
        return all(q.flush(max(0.0, deadline - time.monotonic())) for q in self.queues)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Flush and stop every threaded queue. Blocking: call it off the event loop."""
        deadline = time.monotonic() + timeout
        for q in self.queues:
            q.shutdown(max(0.0, deadline - time.monotonic()))
