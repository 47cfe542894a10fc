"""Per-hop telemetry: the one API the request pipeline calls.

Owns: ``Telemetry`` (built once per proxy), ``HttpHop`` (one per HTTP/gRPC
request through this proxy) and ``TcpHop`` (one per opaque TCP connection).
Each hop produces, from one set of facts, a span, the Prometheus series and
optionally an access-log line, so the three always agree.

How the pipeline (``meshproxy.io.proxy``) uses it::

    tel = Telemetry.build(snapshot.telemetry, snapshot.workload)   # at start-up
    tel.reconfigure(new.telemetry, new.workload)                  # on every applied snapshot

    hop = tel.start_http(direction="outbound", head=head, peer=(ip, port),
                         destination_service=str(service.key))    # when the request head is parsed
    upstream_head = head.with_headers(hop.upstream_headers(head))    # trace context + x-request-id
    hop.annotate(route=route.name, backend=str(backend.key),
                 destination_workload=endpoint.workload)          # as decisions are made (any time)
    hop.annotate(retries=2) / hop.annotate(decision="circuit_open")
    hop.finish(status=200, flag=None, request_bytes=n_in, response_bytes=n_out,
               grpc_status="0")                                   # exactly once, when the response ended

    tcp = tel.tcp_opened(direction="outbound", destination_service=key)
    tcp.finish(bytes_sent=a, bytes_received=b, flag=None)

    tel.metrics.set_breaker_state(dest, "open"); tel.metrics.retry(dest); ...   # see ProxyMetrics
    await tel.shutdown()                                          # flushes exporters, with a deadline

Conventions:
  * ``direction="outbound"`` (app -> mesh) makes a CLIENT span and metrics with
    ``reporter="source"``; ``"inbound"`` (mesh -> app) a SERVER span and
    ``reporter="destination"``.
  * ``destination_service``: outbound, the ``Service.key`` routed to; inbound, the
    ``InboundPort.service`` name (or None if unknown).
  * ``flag``: the response flag (``UF``, ``UR``, ``UT``, ``UO``, ``RL``, ...), None if fine.
  * The outbound hop tells the next sidecar who is calling with
    ``x-meshproxy-source-workload``/``-namespace`` headers; the inbound hop uses
    them for ``source_workload`` labels (validated, cardinality-capped) and strips
    them before the request reaches the app.

Invariants:
  * ``start_http`` and ``finish`` never block and never raise because of a
    telemetry backend: spans go to bounded export queues (drained by a task on the
    loop or a worker thread, see ``tracing``), access-log lines through a bounded
    queue, and both count what they drop.
  * The span of an inbound hop is the child of the incoming trace context; the
    context injected upstream is the hop's own span, so the chain across
    sidecars is client span -> server span -> (app) -> client span -> ...
  * When a span is not sampled no attributes are built; when the access log is
    off no record is built; ``finish`` is idempotent (a second call is ignored).
  * ``reconfigure`` swaps the tracing pipeline in one assignment; hops already
    started keep their span, and the old pipeline stays open ``RETIRE_GRACE``
    seconds for them before it is flushed and stopped.

Concurrency: everything here runs on the event-loop thread, as do the OTLP/gRPC
export tasks. The other threads are the worker threads of the SDK exporters (TLS
OTLP/gRPC, OTLP/HTTP, Zipkin) and the access-log writer (reached through bounded,
thread-safe queues), plus short-lived daemon threads that retire a replaced tracing
pipeline and run ``shutdown``'s blocking flush off the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from opentelemetry.sdk.trace.export import SpanExporter
from prometheus_client import CollectorRegistry

from meshproxy.config import model
from meshproxy.core.http import Headers, RequestHead, get_header
from meshproxy.telemetry import propagation
from meshproxy.telemetry.accesslog import AccessLog
from meshproxy.telemetry.metrics import ProxyMetrics
from meshproxy.telemetry.spans import KIND_CLIENT, KIND_SERVER, SpanEnd, SpanRecord, new_ids
from meshproxy.telemetry.tracing import TracingPipeline

log = logging.getLogger(__name__)

SOURCE_WORKLOAD_HEADER = "x-meshproxy-source-workload"
SOURCE_NAMESPACE_HEADER = "x-meshproxy-source-namespace"
_SOURCE_HEADERS = frozenset({SOURCE_WORKLOAD_HEADER, SOURCE_NAMESPACE_HEADER})
# Replaced on the way upstream: trace context, caller identity (and x-request-id, when ours).
_REPLACED = propagation.TRACE_HEADERS | _SOURCE_HEADERS
_REPLACED_AND_ID = _REPLACED | {propagation.REQUEST_ID}
# Every header start_http reads: one pass picks them out, the lookups then scan a short list.
_READ = _REPLACED_AND_ID | {"content-type", "user-agent"}
# A DNS-1123 name: what Kubernetes allows for workloads and namespaces.
_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")
# Distinct caller identities accepted as label values before new ones become "unknown":
# the headers come from the network, so they must not be able to grow the series count.
MAX_SOURCES = 256
UNKNOWN = "unknown"
# Seconds a replaced tracing pipeline stays open for the spans of requests still in flight
# (the default whole-request timeout is 15 s).
RETIRE_GRACE = 20.0
NO_FLAG = "-"
# gRPC codes that are a server's fault (semantic conventions: the rest, e.g. NOT_FOUND, are the
# caller's business and only errors on the client side): UNKNOWN, DEADLINE_EXCEEDED,
# UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS.
_GRPC_SERVER_ERRORS = frozenset({"2", "4", "12", "13", "14", "15"})

Clock = Callable[[], float]


def _split_authority(authority: str) -> tuple[str, int | None]:
    if authority.startswith("["):
        host, _, rest = authority[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = authority.rpartition(":") if authority.count(":") == 1 else (authority, "", "")
    return host, int(port) if port.isdigit() else None


def _grpc_method(head: RequestHead, read: Sequence[tuple[str, str]]) -> tuple[str, str] | None:
    """``(service, method)`` when the request is gRPC (``/pkg.Service/Method``), else None."""
    ct = get_header(read, "content-type")
    if ct is None or not ct.startswith("application/grpc"):
        return None
    parts = head.path.split("/")
    if len(parts) != 3 or parts[0]:
        return ("", "")
    return (parts[1], parts[2])


class HttpHop:
    """One HTTP/gRPC request through this proxy. Created by ``Telemetry.start_http``."""

    __slots__ = (
        "_backend",
        "_decision",
        "_dest_workload",
        "_finished",
        "_grpc",
        "_keep_request_id",
        "_pipeline",
        "_retries",
        "_route",
        "_sid",
        "_span",
        "_start",
        "_start_wall",
        "_tel",
        "_tid",
        "_trace_state",
        "destination_service",
        "direction",
        "head",
        "peer",
        "request_id",
        "sampled",
        "source_namespace",
        "source_workload",
    )

    def __init__(  # positional: built once per request, and a keyword call costs more
        self,
        tel: Telemetry,
        direction: str,
        head: RequestHead,
        peer: tuple[str, int],
        destination_service: str | None,
        source_workload: str,
        source_namespace: str,
        pipeline: TracingPipeline,
        ids: tuple[int, int],
        sampled: bool,
        trace_state: str,
        record: SpanRecord | None,
        request_id: str,
        keep_request_id: bool,
        grpc: tuple[str, str] | None,
    ) -> None:
        self._tel = tel
        self.direction = direction
        self.head = head
        self.peer = peer
        self.destination_service = destination_service or UNKNOWN
        self.source_workload = source_workload
        self.source_namespace = source_namespace
        self._pipeline = pipeline
        self._tid, self._sid = ids
        self.sampled = sampled
        self._trace_state = trace_state
        self._span = record
        self.request_id = request_id
        self._keep_request_id = keep_request_id
        self._start = tel.clock()
        self._start_wall = tel.wall_clock()
        self._grpc = grpc
        self._route: str | None = None
        self._backend: str | None = None
        self._retries = 0
        self._decision: str | None = None
        self._dest_workload: str | None = None
        self._finished = False

    @property
    def trace_id(self) -> str:
        return f"{self._tid:032x}"

    @property
    def span_id(self) -> str:
        return f"{self._sid:016x}"

    def upstream_headers(self, head: RequestHead) -> Headers:
        """``head.headers`` as they should go upstream: this hop's trace context in the
        configured formats (incoming trace headers replaced), ``x-request-id`` added if
        absent, the caller-identity headers added (outbound) or stripped (inbound).
        One pass over the headers."""
        drop = _REPLACED if self._keep_request_id else _REPLACED_AND_ID
        out = [kv for kv in head.headers if kv[0] not in drop]
        out += propagation.context_headers(
            self._tid, self._sid, self.sampled, self._trace_state, self._pipeline.formats
        )
        if not self._keep_request_id:
            out.append((propagation.REQUEST_ID, self.request_id))
        if self.direction == "outbound":
            w = self._tel.workload
            out.append((SOURCE_WORKLOAD_HEADER, w.name))
            out.append((SOURCE_NAMESPACE_HEADER, w.namespace))
        return tuple(out)

    def annotate(
        self,
        *,
        route: str | None = None,
        backend: str | None = None,
        retries: int | None = None,
        decision: str | None = None,
        destination_workload: str | None = None,
    ) -> None:
        """Record routing/resilience facts as they become known; any subset, any number of times.

        Only stored here: they reach the span in one batch at ``finish``."""
        if route is not None:
            self._route = route
        if backend is not None:
            self._backend = backend
        if retries is not None:
            self._retries = retries
        if decision is not None:
            self._decision = decision
        if destination_workload is not None:
            self._dest_workload = destination_workload

    def finish(
        self,
        *,
        status: int,
        flag: str | None,
        request_bytes: int,
        response_bytes: int,
        grpc_status: str | None = None,
        error: str | None = None,
    ) -> None:
        """End the hop: span status and end, metrics, access log. Exactly once; later calls are ignored.

        ``status`` is the status sent downstream (a local reply's status when the
        proxy answered itself); ``error`` a short error kind, e.g. ``"timeout"``.
        """
        if self._finished:
            return
        self._finished = True
        tel = self._tel
        duration = tel.clock() - self._start
        if self.direction == "outbound":
            reporter, dest_workload = "source", self._dest_workload or UNKNOWN
        else:
            reporter, dest_workload = "destination", tel.workload.name
        if self._grpc is not None and grpc_status is None:
            grpc_status = "2" if status >= 400 else None  # gRPC maps a non-200 HTTP status to UNKNOWN
        if tel.metrics_enabled:
            labels = (
                reporter,
                self.source_workload,
                self.source_namespace,
                self.destination_service,
                dest_workload,
                str(status),
                grpc_status or "",
                self._route or "",
                self._backend or "",
                flag or NO_FLAG,
            )
            tel.metrics.http_children(labels).record(
                duration,
                request_bytes,
                response_bytes,
                self._start + duration if self.sampled else None,
                self._tid,
                self._sid,
            )

        outbound = self.direction == "outbound"
        grpc_error = grpc_status is not None and (
            grpc_status in _GRPC_SERVER_ERRORS if not outbound else grpc_status != "0"
        )
        is_error = error is not None or status >= 500 or (outbound and status >= 400) or grpc_error
        error_type = (
            (error or flag or (str(status) if status >= 400 else None) or grpc_status) if is_error else None
        )
        record = self._span
        if record is not None:
            record.end_ns = time.time_ns()
            if self._route is not None and self._grpc is None:
                record.name = f"{self.head.method} {self._route}"
            record.end = SpanEnd(
                status,
                self._route,
                self._backend,
                self._retries,
                self._decision,
                self._dest_workload,
                flag or None,
                int(grpc_status) if grpc_status is not None and grpc_status.isdigit() else None,
                error_type,
            )
            record.error = error_type
            self._pipeline.submit(record)

        mode = tel.access_log_mode
        if mode is model.AccessLogMode.ON or (mode is model.AccessLogMode.SAMPLED and self.sampled):
            tel.access_log().log(
                self._record(
                    reporter,
                    dest_workload,
                    status,
                    flag,
                    grpc_status,
                    error_type,
                    duration,
                    request_bytes,
                    response_bytes,
                )
            )

    def _record(
        self,
        reporter: str,
        dest_workload: str,
        status: int,
        flag: str | None,
        grpc_status: str | None,
        error_type: str | None,
        duration: float,
        request_bytes: int,
        response_bytes: int,
    ) -> dict[str, Any]:
        head = self.head
        path, _, query = head.path.partition("?")
        rec: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(self._start_wall, UTC).isoformat(timespec="milliseconds"),
            "direction": self.direction,
            "reporter": reporter,
            "http.request.method": head.method,
            "url.path": path,
            "url.query": query or None,
            "server.address": head.authority,
            "client.address": self.peer[0],
            "network.protocol.version": head.version,
            "user_agent.original": head.header("user-agent"),
            "http.response.status_code": status,
            "rpc.grpc.status_code": grpc_status,
            "mesh.response_flag": flag or NO_FLAG,
            "mesh.source.workload": self.source_workload,
            "mesh.source.namespace": self.source_namespace,
            "mesh.destination.service": self.destination_service,
            "mesh.destination.workload": dest_workload,
            "mesh.route": self._route,
            "mesh.backend": self._backend,
            "mesh.retries": self._retries,
            "mesh.decision": self._decision,
            "error.type": error_type,
            "request_bytes": request_bytes,
            "response_bytes": response_bytes,
            "duration_ms": round(duration * 1000.0, 3),
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "sampled": self.sampled,
            "request_id": self.request_id,
        }
        return rec


class TcpHop:
    """One opaque TCP connection. Created by ``Telemetry.tcp_opened`` (which counts it opened)."""

    __slots__ = (
        "_children",
        "_finished",
        "_start",
        "_start_wall",
        "_tel",
        "destination_service",
        "direction",
    )

    def __init__(self, tel: Telemetry, *, direction: str, destination_service: str) -> None:
        self._tel = tel
        self.direction = direction
        self.destination_service = destination_service or UNKNOWN
        w = tel.workload
        # For inbound TCP there is no header to say who calls: the source is unknown.
        if direction == "outbound":
            labels = ("source", w.name, w.namespace, self.destination_service)
        else:
            labels = ("destination", UNKNOWN, UNKNOWN, self.destination_service)
        self._children = tel.metrics.tcp_children(labels)
        if tel.metrics_enabled:
            self._children.record_open()
        self._start = tel.clock()
        self._start_wall = tel.wall_clock()
        self._finished = False

    def finish(self, *, bytes_sent: int, bytes_received: int, flag: str | None) -> None:
        """``bytes_sent``: to the upstream; ``bytes_received``: from it. Idempotent."""
        if self._finished:
            return
        self._finished = True
        tel = self._tel
        if tel.metrics_enabled:
            self._children.record_close(bytes_sent, bytes_received)
        if tel.access_log_mode is model.AccessLogMode.ON:
            tel.access_log().log(
                {
                    "timestamp": datetime.fromtimestamp(self._start_wall, UTC).isoformat(
                        timespec="milliseconds"
                    ),
                    "direction": self.direction,
                    "network.transport": "tcp",
                    "mesh.destination.service": self.destination_service,
                    "mesh.response_flag": flag or NO_FLAG,
                    "bytes_sent": bytes_sent,
                    "bytes_received": bytes_received,
                    "duration_ms": round((tel.clock() - self._start) * 1000.0, 3),
                }
            )


class Telemetry:
    """Process-wide telemetry of one proxy. Build with ``Telemetry.build``."""

    def __init__(
        self,
        settings: model.Telemetry,
        workload: model.Workload,
        *,
        metrics: ProxyMetrics,
        clock: Clock,
        wall_clock: Clock,
        env: Mapping[str, str],
        access_log_stream: TextIO | None,
        extra_exporters: Sequence[SpanExporter],
        schedule_delay_millis: float | None,
        access_log_path: str | None = None,
    ) -> None:
        self.metrics = metrics
        self.clock = clock
        self.wall_clock = wall_clock
        self._env = dict(env)
        self._access_log_stream = access_log_stream
        self._access_log_path = access_log_path
        self._access_log: AccessLog | None = None
        self._extra_exporters = tuple(extra_exporters)
        self._schedule_delay_millis = schedule_delay_millis
        self._sources: set[tuple[str, str]] = set()
        self._ids = random.Random()  # request ids (seeded from the OS; see propagation.new_request_id)
        self._retired: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._stopping_loop = asyncio.Event()  # the same signal, for the event-loop side
        self._retiring: set[asyncio.Task[None]] = set()
        self.retire_grace = RETIRE_GRACE
        self._closer: threading.Thread | None = None
        self.settings = settings
        self.workload = workload
        self.access_log_mode = settings.access_log
        self.metrics_enabled = settings.metrics
        self.tracing = self._pipeline(settings.tracing, workload)

    @classmethod
    def build(
        cls,
        settings: model.Telemetry,
        workload: model.Workload,
        *,
        clock: Clock = time.perf_counter,
        wall_clock: Clock = time.time,
        env: Mapping[str, str] | None = None,
        registry: CollectorRegistry | None = None,
        access_log_stream: TextIO | None = None,
        access_log_path: str | None = None,
        extra_exporters: Sequence[SpanExporter] = (),
        schedule_delay_millis: float | None = None,
    ) -> Telemetry:
        """``env`` defaults to a copy of ``os.environ`` (read once, here: the OTEL_* variables).
        The access log goes to ``access_log_path`` (appended, opened when first needed) if given,
        else to ``access_log_stream``, else stdout. ``extra_exporters`` are added to the
        configured ones (tests pass an in-memory exporter)."""
        return cls(
            settings,
            workload,
            metrics=ProxyMetrics(registry, wall_clock=wall_clock),
            clock=clock,
            wall_clock=wall_clock,
            env=dict(os.environ) if env is None else env,
            access_log_stream=access_log_stream,
            access_log_path=access_log_path,
            extra_exporters=extra_exporters,
            schedule_delay_millis=schedule_delay_millis,
        )

    def _pipeline(self, tracing: model.Tracing, workload: model.Workload) -> TracingPipeline:
        return TracingPipeline(
            tracing,
            workload,
            self.metrics,
            env=self._env,
            extra_exporters=self._extra_exporters,
            schedule_delay_millis=self._schedule_delay_millis,
        )

    def access_log(self) -> AccessLog:
        if self._access_log is None:
            on_drop = self.metrics.access_log_dropped.inc
            if self._access_log_path is not None:
                self._access_log = AccessLog.open_file(self._access_log_path, on_drop=on_drop)
            else:
                self._access_log = AccessLog(self._access_log_stream, on_drop=on_drop)
        return self._access_log

    def reconfigure(self, settings: model.Telemetry, workload: model.Workload | None = None) -> None:
        """Apply a new snapshot's telemetry settings. Cheap when nothing changed."""
        workload = workload if workload is not None else self.workload
        self.access_log_mode = settings.access_log
        self.metrics_enabled = settings.metrics
        if settings.tracing != self.settings.tracing or workload != self.workload:
            old = self.tracing
            self.tracing = self._pipeline(settings.tracing, workload)
            if old.async_queues:  # reconfigure runs on the event loop, as every snapshot apply does
                task = asyncio.get_running_loop().create_task(
                    self._retire_async(old), name="meshproxy-tracing-retire-loop"
                )
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)

            def retire() -> None:
                # Requests already in flight still end their spans on the old pipeline: keep it
                # open for a grace period (cut short by shutdown()), then flush and stop it.
                self._stopping.wait(self.retire_grace)
                old.shutdown()

            t = threading.Thread(target=retire, name="meshproxy-tracing-retire", daemon=True)
            t.start()
            self._retired = [r for r in self._retired if r.is_alive()] + [t]
        self.settings = settings
        self.workload = workload

    async def _retire_async(self, old: TracingPipeline) -> None:
        """The event-loop exporters of a replaced pipeline: open for the grace period (cut
        short by ``shutdown``), then flushed and closed."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.retire_grace):
                await self._stopping_loop.wait()
        await old.aclose(grace=5.0)

    def start_http(
        self,
        *,
        direction: str,
        head: RequestHead,
        peer: tuple[str, int],
        destination_service: str | None,
    ) -> HttpHop:
        """A request head arrived: start its span (child of any incoming trace context)."""
        read = [kv for kv in head.headers if kv[0] in _READ]
        parent = propagation.extract(read) if read else None
        pipeline = self.tracing
        w = self.workload
        if direction == "outbound":
            kind = KIND_CLIENT
            src_workload, src_namespace = w.name, w.namespace
        else:
            kind = KIND_SERVER
            src_workload, src_namespace = self._caller(read)
        grpc = _grpc_method(head, read)
        ids = new_ids(self._ids, parent)
        sampled = pipeline.sampler.sampled(ids[0], parent)
        trace_state = parent.trace_state if parent is not None else ""
        incoming_id = propagation.request_id(read)
        request_id = incoming_id or propagation.new_request_id(self._ids)
        record = None
        if sampled and pipeline.recording:
            record = SpanRecord(
                ids[0],
                ids[1],
                parent.span_id if parent is not None else 0,
                trace_state,
                f"{grpc[0]}/{grpc[1]}" if grpc else head.method,
                kind,
                time.time_ns(),
            )
            ua = get_header(read, "user-agent")
            dest = destination_service or UNKNOWN

            def static() -> list[tuple[str, str | int | float | bool]]:
                host, port = _split_authority(head.authority)
                attrs: list[tuple[str, str | int | float | bool]] = [
                    ("http.request.method", head.method),
                    ("url.scheme", head.scheme),
                    ("server.address", host),
                    ("network.protocol.version", head.version),
                    ("network.peer.address", peer[0]),
                    ("mesh.source.workload", src_workload),
                    ("mesh.source.namespace", src_namespace),
                    ("mesh.destination.service", dest),
                ]
                if port is not None:
                    attrs.append(("server.port", port))
                if kind == KIND_SERVER:
                    attrs.append(("client.address", peer[0]))
                if ua is not None:
                    attrs.append(("user_agent.original", ua))
                if grpc is not None:
                    attrs.append(("rpc.system", "grpc"))
                    attrs.append(("rpc.service", grpc[0]))
                    attrs.append(("rpc.method", grpc[1]))
                return attrs

            key = (kind, head.method, head.scheme, head.authority, head.version, peer[0],
                   src_workload, src_namespace, dest, ua, grpc)  # fmt: skip
            record.static, record.static_wire = pipeline.static_attributes(key, static)
            record.attributes = [
                ("url.path", head.path.partition("?")[0]),
                ("network.peer.port", peer[1]),
                ("mesh.request_id", request_id),
            ]
        return HttpHop(
            self,
            direction,
            head,
            peer,
            destination_service,
            src_workload,
            src_namespace,
            pipeline,
            ids,
            sampled,
            trace_state,
            record,
            request_id,
            incoming_id is not None,
            grpc,
        )

    def _caller(self, headers: Sequence[tuple[str, str]]) -> tuple[str, str]:
        """Who called, from the client sidecar's identity headers; capped, validated."""
        wl = ns = None
        for k, v in headers:
            if k == SOURCE_WORKLOAD_HEADER:
                wl = v
            elif k == SOURCE_NAMESPACE_HEADER:
                ns = v
        if wl is None or ns is None:
            return UNKNOWN, UNKNOWN
        key = (wl, ns)
        if key in self._sources:  # validated when first seen
            return key
        if not _NAME_RE.fullmatch(wl) or not _NAME_RE.fullmatch(ns) or len(self._sources) >= MAX_SOURCES:
            return UNKNOWN, UNKNOWN
        self._sources.add(key)
        return key

    def tcp_opened(self, *, direction: str, destination_service: str) -> TcpHop:
        return TcpHop(self, direction=direction, destination_service=destination_service)

    async def shutdown(self, grace: float = 5.0) -> None:
        """Flush access-log lines and spans; give up after ``grace`` seconds (a dead
        backend must not hold up the proxy's exit: undelivered spans are lost)."""
        pipeline, access_log, retired = self.tracing, self._access_log, list(self._retired)
        self._stopping.set()
        self._stopping_loop.set()
        loop = asyncio.get_running_loop()
        # The event-loop exporters first (current and retiring pipelines), within the grace.
        started = loop.time()
        try:
            async with asyncio.timeout(grace):
                await pipeline.aclose(grace)
                if self._retiring:
                    await asyncio.gather(*self._retiring, return_exceptions=True)
        except TimeoutError:
            log.warning("span export did not finish within %.1fs; dropping what is left", grace)
        grace = max(0.1, grace - (loop.time() - started))
        done: asyncio.Future[None] = loop.create_future()

        def resolve() -> None:
            if not done.done():
                done.set_result(None)

        def run() -> None:
            try:
                # The access log first: it is local and quick, spans may wait on a network.
                if access_log is not None:
                    access_log.close(grace)
                pipeline.shutdown()
                for t in retired:
                    t.join()
            except Exception:
                log.warning("telemetry shutdown failed", exc_info=True)
            finally:
                with contextlib.suppress(RuntimeError):  # the loop may be gone after a timeout
                    loop.call_soon_threadsafe(resolve)

        # A daemon thread, not the default executor: if an export is stuck, the process can still exit.
        self._closer = threading.Thread(target=run, name="meshproxy-telemetry-shutdown", daemon=True)
        self._closer.start()
        try:
            await asyncio.wait_for(asyncio.shield(done), grace)
        except TimeoutError:
            log.warning("telemetry shutdown did not finish within %.1fs; dropping what is left", grace)
