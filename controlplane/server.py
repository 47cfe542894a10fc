"""The gRPC ConfigDiscovery server (port 15010): one config stream per proxy.

Owns: the server side of the stream contract in
``protos/meshapi/discovery/v1/discovery.proto`` (read it first), per-proxy
sync status for ``ListProxies`` / ``GetProxyConfig`` (``meshctl``), and the
grpc.aio server's options (keepalive, message size).

One stream, as implemented:
  1. The first request must carry ``node.pod`` and ``node.namespace``
     (else INVALID_ARGUMENT). Nothing is sent before the cluster was listed
     completely (a proxy keeps its config rather than get a half-known
     cluster after a control plane restart). The node is registered with the
     reconciler,
     which compiles for it at once; the stream then always sends the full
     current snapshot first, with ``version_info`` = its content hash (in the
     scheme the proxy asked for, announced in ``version_scheme``) and a
     fresh nonce.
  2. A reader task handles ACK/NACKs: a request whose ``response_nonce`` is
     not the latest sent is stale and ignored (counted). ACK -> ``acked_version``.
     NACK -> ``last_nack`` and that version is remembered: it is never sent
     again to this stream; the next different version is.
  3. The writer waits for new snapshots from the cache. Its send slot is a
     bounded coalescing queue: it always sends the newest snapshot, and counts
     how many arrived since its last send. More than ``send_queue_size`` while
     one write is stuck (the proxy does not read), or one write taking longer
     than ``send_timeout``, evicts the proxy (counted): it is unregistered at
     once, so a slow proxy never blocks the reconciler or other streams. Its
     RESOURCE_EXHAUSTED status follows the stuck message (HTTP/2 sends trailers
     after data and gRPC Python cannot reset a server stream), so the proxy
     learns it when it reads again, or keepalive ends a dead connection.
     Responses are written pre-encoded: each snapshot version is converted and
     encoded once (``convert.encode_snapshot_model``), whatever the number of proxies.
     Once a proxy ACKed what it was sent, a new snapshot that differs from it in
     endpoint lists only goes as an ``EndpointUpdate`` (encoded once per pair of
     versions); a FAILED_PRECONDITION NACK of one gets that version in full and
     turns updates off for the stream.
  4. When the stream ends, the node is unregistered (unless a newer stream of
     the same node took over).

Status per proxy: ``NOT_SENT`` (nothing sent yet), ``SYNCED`` (it ACKed the
version compiled for it now), ``STALE`` (anything else: in flight, NACKed, or
behind). ``GetProxyConfig`` returns the snapshot the proxy last ACKed.

Concurrency: grpc.aio runs each RPC as a task on the one event loop; each
stream adds one reader task that it owns and cancels. Shared state (the
registry of streams, the proto cache) is only touched from the loop, so no
locks. The only broad ``except`` is per stream (log, count, close).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from controlplane import convert
from controlplane.cache import SnapshotCache
from controlplane.compile import ProxyNode
from controlplane.metrics import ControlPlaneMetrics
from controlplane.settings import ControlPlaneSettings
from meshapi.discovery.v1 import discovery_pb2_grpc
from meshproxy.config.load import dump
from meshproxy.config.model import Snapshot

log = logging.getLogger(__name__)

_FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]  # a NACK saying "send it in full"

Ctx = grpc.aio.ServicerContext[Any, Any]
_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]  # the stubs lack it


class NodeRegistry(Protocol):
    """What the server needs of the reconciler."""

    async def wait_synced(self) -> None:
        """Return once the cluster was listed completely."""
        ...

    def add_node(self, node_id: str, node: ProxyNode) -> Snapshot: ...

    def remove_node(self, node_id: str) -> None: ...


def grpc_options(settings: ControlPlaneSettings) -> list[tuple[str, Any]]:
    """Server channel options: keepalive in both directions and large messages."""
    return [
        ("grpc.keepalive_time_ms", int(settings.keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        # Proxies ping every ~10 s too; a stricter server would answer with GOAWAY.
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
    ]


class _StreamClosed(Exception):
    """The proxy ended the stream (or it broke)."""


class _Evicted(Exception):
    """The proxy does not keep up; ``write`` is the write stuck in front of it, if any."""

    def __init__(self, write: asyncio.Future[None] | None, reason: str) -> None:
        super().__init__(reason)
        self.write = write
        self.reason = reason


@dataclass(eq=False)
class _Stream:
    """One proxy's stream: what was sent, what it ACKed, and its send slot."""

    node_id: str
    node: ProxyNode
    connected_since: str
    queue_limit: int
    latest: Snapshot | None = None  # newest snapshot not sent yet
    pending: int = 0  # snapshots offered since the last send
    overflow: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # something to send, or the end
    # Called on overflow and when the reader ends: a write in progress stops waiting.
    alarm: Callable[[], None] | None = None
    sent: Snapshot | None = None
    sent_nonce: str = ""
    sent_at: float = 0.0
    acked: Snapshot | None = None
    # Versions this proxy rejected; never sent to it again on this stream. Bounded: a
    # proxy that NACKs everything cycles through at most this many distinct versions.
    nacked: OrderedDict[str, None] = field(default_factory=OrderedDict)
    last_nack: str = ""
    reader_done: bool = False
    # Incremental endpoint updates: used when the proxy ACKed what it was sent last and the
    # new snapshot differs from that in endpoints only. A proxy that cannot apply one NACKs
    # it with FAILED_PRECONDITION: it gets that version in full, and full snapshots only
    # for the rest of the stream.
    deltas: bool = True
    sent_delta: bool = False
    resend: bool = False  # send ``latest`` even though it is the version sent last
    release_slot: Callable[[], None] | None = None  # the full-push slot of the response in flight

    def offer(self, snapshot: Snapshot) -> None:
        """Called by the cache on every new version; never blocks."""
        self.latest = snapshot
        self.pending += 1
        if self.pending > self.queue_limit:
            self.overflow = True
            self.raise_alarm()
        self.wake.set()

    def raise_alarm(self) -> None:
        if self.alarm is not None:
            self.alarm()


class DiscoveryService(discovery_pb2_grpc.ConfigDiscoveryServicer):
    """The ConfigDiscovery servicer."""

    def __init__(
        self,
        registry: NodeRegistry,
        cache: SnapshotCache,
        settings: ControlPlaneSettings,
        metrics: ControlPlaneMetrics,
        *,
        clock: Any = time.monotonic,
    ) -> None:
        self._registry = registry
        self._cache = cache
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._streams: dict[str, _Stream] = {}
        self._nonces = itertools.count(1)
        # Converting and encoding a big snapshot costs more than sending it: replicas of a
        # workload share one snapshot (convert and encode once per version, bounded LRU), and
        # workloads share most services: each is encoded once, and a cluster change only
        # encodes the services it changed (convert.ServiceBytesCache).
        self._protos: OrderedDict[str, bytes] = OrderedDict()
        self._service_bytes = convert.ServiceBytesCache()
        self._full_slots = asyncio.Semaphore(settings.max_full_pushes)
        # Endpoint updates by (base version, new version); None: a full snapshot is needed.
        self._deltas: OrderedDict[tuple[str, str], bytes | None] = OrderedDict()

    # ---- the stream

    async def StreamConfig(self, request_iterator: AsyncIterator[Any], context: Ctx) -> None:
        first = await context.read()
        if first is _EOF:
            return
        node = convert.node_from_proto(first.node)
        if not node.pod or not node.namespace:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the first request must carry node.pod and node.namespace"
            )
        stream = _Stream(
            node_id=node.node_id,
            node=node,
            connected_since=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            queue_limit=self._settings.send_queue_size,
        )
        previous = self._streams.get(stream.node_id)
        if previous is not None:
            log.info("proxy reconnected; replacing its older stream", extra={"node": stream.node_id})
        self._streams[stream.node_id] = stream
        cancel_watch = self._cache.watch(stream.node_id, stream.offer)
        self._metrics.connected_proxies.inc()
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            cancel_watch()
            self._metrics.connected_proxies.dec()
            if self._streams.get(stream.node_id) is stream:
                del self._streams[stream.node_id]
                self._registry.remove_node(stream.node_id)

        reader = asyncio.create_task(self._read(stream, context), name=f"discovery-read-{stream.node_id}")
        try:
            synced = asyncio.ensure_future(self._registry.wait_synced())
            await asyncio.wait({synced, reader}, return_when=asyncio.FIRST_COMPLETED)
            if not synced.done():  # the proxy left before there was anything to send
                synced.cancel()
                raise _StreamClosed
            snapshot = self._registry.add_node(stream.node_id, node)
            # The cache only wakes watchers on a version change; a reconnecting proxy whose
            # config did not change still gets its full snapshot first.
            if stream.latest is None:
                stream.offer(snapshot)
            await self._write_loop(stream, context)
        except _StreamClosed:
            pass
        except _Evicted as ev:
            # Stop spending anything on this proxy now. Its status can only reach it after
            # the message stuck in front of it (HTTP/2 sends trailers after data), so wait
            # for that write -- it completes if the proxy reads again, fails when it goes --
            # and then say why it was closed.
            self._metrics.slow_closes.inc()
            log.warning("closing a slow proxy's stream", extra={"node": stream.node_id, "reason": ev.reason})
            release()
            if ev.write is not None:
                with contextlib.suppress(Exception):
                    await ev.write
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"proxy too slow: {ev.reason}")
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            log.exception("discovery stream failed", extra={"node": stream.node_id})
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            if stream.release_slot is not None:
                stream.release_slot()
            release()

    async def _write_loop(self, stream: _Stream, context: Ctx) -> None:
        while True:
            await stream.wake.wait()
            stream.wake.clear()
            if stream.reader_done:
                raise _StreamClosed
            if stream.overflow:
                raise _Evicted(None, f"more than {stream.queue_limit} updates queued")
            snapshot, stream.latest, stream.pending = stream.latest, None, 0
            if snapshot is None:
                continue
            if snapshot.version in stream.nacked:
                continue  # never resend what the proxy rejected
            if stream.sent is not None and snapshot.version == stream.sent.version and not stream.resend:
                continue
            stream.resend = False
            payload = self._delta(stream, snapshot)
            release = None
            if payload is None:
                # A full snapshot: take a slot before building the per-proxy message, so a
                # connect storm holds max_full_pushes of them in memory, not one per proxy.
                release = await self._full_slot()
                if stream.reader_done:
                    release()
                    raise _StreamClosed
            stream.sent_delta = payload is not None
            nonce = f"{next(self._nonces)}"
            msg = convert.encode_response(
                payload or self._encoded(snapshot),
                snapshot.version,
                nonce,
                digest_version=stream.node.digest_versions,  # the scheme its snapshots were compiled in
            )
            # Record before writing: the ACK can arrive before write() returns.
            stream.sent, stream.sent_nonce, stream.sent_at = snapshot, nonce, self._clock()
            stream.release_slot = release
            await self._write(stream, context, msg, release)
            # This loop then waits, maybe for minutes: holding on to the message would keep
            # one full snapshot per proxy alive (1000 x 500 KiB in make bench-controlplane).
            del msg
            self._metrics.pushes.inc()
            log.debug(
                "snapshot sent", extra={"node": stream.node_id, "version": snapshot.version, "nonce": nonce}
            )

    async def _full_slot(self) -> Callable[[], None]:
        """Wait for a full-snapshot slot; returns its release (idempotent)."""
        await self._full_slots.acquire()
        released = False

        def release(*_: object) -> None:
            nonlocal released
            if not released:
                released = True
                self._full_slots.release()

        return release

    async def _write(
        self, stream: _Stream, context: Ctx, msg: Any, release: Callable[..., None] | None = None
    ) -> None:
        loop = asyncio.get_running_loop()
        write = asyncio.ensure_future(context.write(msg))
        if release is not None:
            # The slot returns with the proxy's answer (it has read the whole message: a
            # finished write only means gRPC queued it, still in memory), or after
            # full_push_slot_time if the proxy is slow (the message goes on without a slot).
            loop.call_later(self._settings.full_push_slot_time, release)
        # One future, woken by whatever comes first: the write finishing, the stream's alarm
        # (overflow, or the reader ended) or the send timeout. A task for the alarm plus
        # asyncio.wait per write were a third of the control plane's CPU for an endpoint
        # change pushed to 1000 proxies (make bench-controlplane, py-spy).
        woken: asyncio.Future[None] = loop.create_future()

        def wake(*_: object) -> None:
            if not woken.done():
                woken.set_result(None)

        write.add_done_callback(wake)
        timer = loop.call_later(self._settings.send_timeout, wake)
        stream.alarm = wake
        try:
            if stream.reader_done or stream.overflow:
                wake()
            await woken
        finally:
            stream.alarm = None
            timer.cancel()
            write.remove_done_callback(wake)
        if not write.done():
            if stream.reader_done:
                raise _Evicted(write, "the proxy went away during a write")
            if stream.overflow:
                raise _Evicted(write, f"more than {stream.queue_limit} updates queued behind a stuck write")
            raise _Evicted(write, f"a write took longer than {self._settings.send_timeout:g}s")
        write.result()

    async def _read(self, stream: _Stream, context: Ctx) -> None:
        try:
            while True:
                req = await context.read()
                if req is _EOF:
                    return
                self._on_request(stream, req)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the stream broke under the reader: the writer ends it
            log.debug("discovery read ended", extra={"node": stream.node_id, "error": repr(exc)})
        finally:
            stream.reader_done = True
            stream.wake.set()
            stream.raise_alarm()

    def _on_request(self, stream: _Stream, req: Any) -> None:
        if not req.response_nonce or req.response_nonce != stream.sent_nonce or stream.sent is None:
            self._metrics.stale_requests.inc()
            return
        sent = stream.sent
        stream.sent_nonce = ""  # one answer per response
        if stream.release_slot is not None:
            stream.release_slot()
            stream.release_slot = None
        if stream.sent_delta and req.error_detail.code == _FAILED_PRECONDITION:
            # The proxy could not rebuild the snapshot from the update (it does not hold the
            # base): not a rejection of this version. Send it in full, and only full ones.
            log.info(
                "proxy cannot apply endpoint updates; sending full snapshots", extra={"node": stream.node_id}
            )
            stream.deltas = False
            if stream.latest is None:
                stream.latest, stream.resend = sent, True
            stream.wake.set()
            return
        if req.HasField("error_detail") and (req.error_detail.message or req.error_detail.code):
            stream.nacked[sent.version] = None
            while len(stream.nacked) > 64:
                stream.nacked.popitem(last=False)
            stream.last_nack = req.error_detail.message or f"code {req.error_detail.code}"
            self._metrics.nacks.inc()
            log.warning(
                "proxy rejected snapshot",
                extra={"node": stream.node_id, "version": sent.version, "error": stream.last_nack},
            )
            return
        if req.version_info != sent.version:
            # An ACK must name what it applied; anything else is a confused proxy. Keep
            # the old view rather than guess.
            log.warning(
                "ACK for an unexpected version", extra={"node": stream.node_id, "version": req.version_info}
            )
            return
        stream.acked = sent
        stream.last_nack = ""
        self._metrics.acks.inc()
        self._metrics.push_latency.observe(max(0.0, self._clock() - stream.sent_at))

    def _delta(self, stream: _Stream, snapshot: Snapshot) -> bytes | None:
        """The encoded endpoint update from what the proxy ACKed to ``snapshot``, if one will do."""
        base = stream.acked
        if not stream.deltas or base is None or stream.sent is not base:
            return None  # nothing ACKed yet, or a response in flight: its base is uncertain
        key = (base.version, snapshot.version)
        if key in self._deltas:
            self._deltas.move_to_end(key)
            return self._deltas[key]
        data = convert.encode_endpoint_update(base, snapshot, self._service_bytes)
        self._deltas[key] = data
        while len(self._deltas) > 256:
            self._deltas.popitem(last=False)
        return data

    def _encoded(self, snapshot: Snapshot) -> bytes:
        data = self._protos.get(snapshot.version)
        if data is None:
            data = convert.encode_snapshot_model(snapshot, self._service_bytes)
            self._protos[snapshot.version] = data
            while len(self._protos) > 64:
                self._protos.popitem(last=False)
        else:
            self._protos.move_to_end(snapshot.version)
        return data

    # ---- operator views

    def status_rows(self) -> list[convert.ProxyStatusView]:
        rows = []
        for node_id in sorted(self._streams):
            s = self._streams[node_id]
            desired = self._cache.get(node_id)
            desired_version = desired.version if desired else ""
            acked_version = s.acked.version if s.acked else ""
            if s.sent is None:
                state = "NOT_SENT"
            elif acked_version and acked_version == desired_version:
                state = "SYNCED"
            else:
                state = "STALE"
            rows.append(
                convert.ProxyStatusView(
                    node=s.node,
                    sent_version=s.sent.version if s.sent else "",
                    acked_version=acked_version,
                    desired_version=desired_version,
                    state=state,
                    last_nack=s.last_nack,
                    connected_since=s.connected_since,
                )
            )
        return rows

    async def ListProxies(self, request: Any, context: Ctx) -> Any:
        return convert.list_proxies_response(self.status_rows())

    async def GetProxyConfig(self, request: Any, context: Ctx) -> Any:
        stream = self._streams.get(f"{request.pod}.{request.namespace}")
        if stream is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"no proxy {request.namespace}/{request.pod} is connected"
            )
        assert stream is not None
        if stream.acked is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"proxy {request.namespace}/{request.pod} has not ACKed any config",
            )
        assert stream.acked is not None
        return convert.get_proxy_config_response(
            stream.acked.version, json.dumps(dump(stream.acked), indent=2, sort_keys=True)
        )


def _as_is(data: bytes) -> bytes:
    return data


class DiscoveryServer:
    """The grpc.aio server around ``DiscoveryService``."""

    def __init__(self, service: DiscoveryService, settings: ControlPlaneSettings) -> None:
        self.service = service
        self._settings = settings
        self._server = grpc.aio.server(options=grpc_options(settings))
        # The generated registration would re-encode every response; StreamConfig writes
        # responses already encoded (convert.encode_response), so register by hand.
        handlers = {
            "StreamConfig": grpc.stream_stream_rpc_method_handler(
                service.StreamConfig,
                request_deserializer=convert.decode_discovery_request,
                response_serializer=_as_is,
            ),
            "ListProxies": grpc.unary_unary_rpc_method_handler(
                service.ListProxies,
                request_deserializer=convert.decode_list_proxies_request,
                response_serializer=convert.encode_message,
            ),
            "GetProxyConfig": grpc.unary_unary_rpc_method_handler(
                service.GetProxyConfig,
                request_deserializer=convert.decode_get_proxy_config_request,
                response_serializer=convert.encode_message,
            ),
        }
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(convert.SERVICE_NAME, handlers),)
        )
        self.port = 0

    async def start(self, host: str | None = None, port: int | None = None) -> int:
        """Listen (port 0 picks a free one); returns the bound port."""
        host = host if host is not None else self._settings.listen_address
        port = port if port is not None else self._settings.grpc_port
        addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.port = self._server.add_insecure_port(addr)
        if self.port == 0:
            raise OSError(f"cannot listen on {addr}")
        await self._server.start()
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        await self._server.stop(self._settings.shutdown_grace if grace is None else grace)

    async def wait(self) -> None:
        await self._server.wait_for_termination()
