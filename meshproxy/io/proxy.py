"""The request pipeline: from a parsed request head to an upstream response, in small layers.

Owns: ``Proxy``, the ``RequestHandler`` the HTTP/1 and HTTP/2 codecs call, and
its TCP counterpart ``Proxy.handle_tcp``; the layers of one hop; the one
translation of errors into local replies (``reply_for`` over
``meshproxy.core.flags``).

The stacks are composed in exactly one place (``Proxy.__init__`` with ``_compose``);
every layer has the signature ``async (call, next) -> UpstreamResponse``. Gates
before a stack only decide (they raise a local reply or fill in the ``Call``)::

    outbound: route gate -> [fault] -> [timeout] -> [retry] -> breaker -> balance -> upstream
    inbound:  route gate -> rate-limit gate -> upstream   (the app address is the endpoint)

The bracketed layers are in the stack only when the request's policy has something
for them to do (a fault configured, a timeout, a retry policy): the route gate picks
the composed variant, so a default request awaits no coroutine for a no-op layer.

  * route:     outbound, the destination service by original VIP:port then Host
               (``RouteTable``); a known service without a matching route is NR (404);
               an unknown destination is passed through to the original address.
               Inbound, the app at ``inbound.app_address`` and the original port.
  * fault / rate limit: ``core.fault.decide`` (FI) / a ``TokenBucket`` (RL, 429).
  * timeout:   the route's or service's whole-request timeout, until the response head (UT).
  * stream idle (around the stack, not a layer): a request body still arriving, then the
               response body, that moves no byte for ``stream_idle_timeout`` ends the
               request (SI): a 408 local reply before the response head, a reset after.
               Only requests whose body is still arriving (or whose response streams) get
               a timer, one per request.
  * retry:     ``core.retry.should_retry`` with the service's budget and backoff; the
               body is replayable while it stays under ``RetryPolicy.max_body_bytes``.
  * breaker:   ``Breaker`` limits (UO) and failure accrual (CO); a 5xx or a failed
               attempt is a failure.
  * balance:   ``EndpointPool.pick`` (UH when empty); outlier outcome fed back when the
               response ends.

Invariants:
  * A request captures ``runtime.active`` once; the whole exchange uses that config.
  * Every local reply is built by ``core.flags`` from the error's flag, here only.
  * Per-request runtime accounting (breaker slot, endpoint in-flight count) is
    released exactly once, when the response body ends, fails or is abandoned.
  * Hop-by-hop headers never cross the proxy (``end_to_end``), except the
    ``Upgrade``/``Connection: upgrade`` pair of a WebSocket-style upgrade.

Concurrency: one task per request (the codec's); layers only await, they own no tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from mypy_extensions import mypyc_attr

from meshproxy.config.model import (
    Endpoint,
    InboundPort,
    RetryPolicy,
    Route,
    Service,
    ServiceKey,
    TrafficPolicy,
)
from meshproxy.config.model import Protocol as AppProtocol
from meshproxy.core import fault as fault_mod
from meshproxy.core.balancer import EndpointPool
from meshproxy.core.breaker import Breaker
from meshproxy.core.breaker import State as BreakerState
from meshproxy.core.errors import (
    ConfigError,
    ProtocolError,
    ProxyError,
    UpstreamConnectError,
    UpstreamOverflowError,
    UpstreamResetError,
    UpstreamTimeoutError,
)
from meshproxy.core.flags import Flag, grpc_local_reply, local_reply
from meshproxy.core.http import Headers, RequestHead, ResponseHead, end_to_end, get_header
from meshproxy.core.outlier import Outcome, outcome_for_status
from meshproxy.core.passthrough import source_for
from meshproxy.core.retry import RetryBudgetState, backoff, should_retry
from meshproxy.core.routing import apply_header_modifier
from meshproxy.io.body import (
    DownstreamClosedError,
    NotReplayableError,
    ReplayBuffer,
    detachable,
    known_length,
)
from meshproxy.io.exchange import (
    BodyStream,
    DownstreamContext,
    ResponseSink,
    UpstreamClient,
    UpstreamResponse,
)
from meshproxy.io.runtime import Active, Runtime
from meshproxy.io.tcp_relay import Parked, open_tcp, splice
from meshproxy.telemetry.hop import HttpHop, Telemetry

log = logging.getLogger(__name__)

_DEFAULT_POLICY = TrafficPolicy()
_PASSTHROUGH_CONNECT_TIMEOUT = 5.0
# A stream that moves no byte for this long ends with flag SI: a request body still arriving
# (client silent mid-upload, or upstream not reading it), or a response body being forwarded
# (upstream silent, or client not reading). Envoy's default stream_idle_timeout: long enough
# for slow streams and long polls, short enough that a stalled peer cannot pin a request (and
# its breaker slot, upstream connection, memory) for ever. ``TrafficPolicy.timeout`` stops at
# the response head, and inbound requests have none at all.
STREAM_IDLE_TIMEOUT = 300.0


@mypyc_attr(native_class=False)  # an exception: see meshproxy.compiled
class LocalReplyError(ProxyError):
    """The pipeline decided to answer itself (NR, UH, UO, CO, RL, FI, NC...)."""

    def __init__(self, flag: Flag, detail: str = "", status: int | None = None) -> None:
        super().__init__(f"{flag.value}: {detail}" if detail else flag.value)
        self.flag = flag.value
        self.flag_enum = flag
        self.detail = detail
        self.status = status


def flag_for(exc: BaseException) -> Flag:
    """The response flag for an error raised below the pipeline."""
    if isinstance(exc, LocalReplyError):
        return exc.flag_enum
    if isinstance(exc, UpstreamConnectError):
        return Flag.UF
    if isinstance(exc, UpstreamOverflowError):
        return Flag.UO
    if isinstance(exc, UpstreamTimeoutError | TimeoutError):
        return Flag.UT
    if isinstance(exc, UpstreamResetError):
        return Flag.UR
    if isinstance(exc, ProtocolError):
        return Flag.DPE if exc.status < 500 else Flag.UR
    if isinstance(exc, NotReplayableError):
        return Flag.URX
    if isinstance(exc, DownstreamClosedError):
        return Flag.DC
    if isinstance(exc, ConfigError):
        return Flag.NC
    return Flag.UR


def reply_for(exc: BaseException, *, grpc: bool = False) -> tuple[ResponseHead, bytes]:
    """The one translation of an error into the local reply the client gets."""
    flag = flag_for(exc)
    status: int | None = None
    detail = str(exc)
    if isinstance(exc, LocalReplyError):
        status, detail = exc.status, exc.detail
    elif isinstance(exc, ProtocolError) and flag is Flag.DPE:
        detail = str(exc)
    reply = (grpc_local_reply if grpc else local_reply)(flag, detail, status)
    rstatus = reply.status
    if flag is Flag.DPE and isinstance(exc, ProtocolError) and not grpc:
        rstatus = exc.status  # 400, 413, 414 or 431: the codec knows which
    return ResponseHead(status=rstatus, headers=reply.headers), reply.body


def local_reply_for(exc: ProxyError) -> tuple[ResponseHead, bytes]:
    """``LocalReply`` hook for the codecs (malformed requests)."""
    return reply_for(exc)


def _outcome(exc: BaseException) -> Outcome:
    if isinstance(exc, UpstreamConnectError):
        return Outcome.CONNECT_FAILURE
    if isinstance(exc, UpstreamTimeoutError | TimeoutError):
        return Outcome.TIMEOUT
    if isinstance(exc, UpstreamResetError | ProtocolError):
        return Outcome.RESET
    return Outcome.LOCAL


EndVerdict = bool | None
"""How a response body ended: True read to its end, False the upstream failed mid-body,
None abandoned by the proxy (a retry discarded it, or the client went away)."""


class _Tracked:
    """A response body that runs its ``on_end(verdict)`` callbacks exactly once: at its end, on
    error or on abort, in the order they were added (innermost layer first)."""

    __slots__ = ("_inner", "_on_end")

    def __init__(self, inner: BodyStream, on_end: Callable[[EndVerdict], None]) -> None:
        self._inner = inner
        self._on_end: list[Callable[[EndVerdict], None]] | None = [on_end]

    def add(self, on_end: Callable[[EndVerdict], None]) -> bool:
        """Also run ``on_end``; False if the body already ended (the caller wraps instead)."""
        if self._on_end is None:
            return False
        self._on_end.append(on_end)
        return True

    def _end(self, ok: EndVerdict) -> None:
        callbacks, self._on_end = self._on_end, None
        for cb in callbacks or ():
            cb(ok)

    @property
    def content_length(self) -> int | None:
        return known_length(self._inner)

    @property
    def complete(self) -> bool:
        """The whole body has arrived (it may not all have been read yet), if the inner body says."""
        return bool(getattr(self._inner, "complete", False))

    @property
    def trailers(self) -> Headers | None:
        return self._inner.trailers

    def take_complete(self) -> bytes | None:
        """The rest of the body in one piece if it has all arrived (see ``BodyQueue``), else
        None. The end callbacks run at the next ``read``, which returns ``b""``: the caller
        reads once more after forwarding, as it would after the last chunk."""
        take = getattr(self._inner, "take_complete", None)
        return take() if take is not None and self._on_end is not None else None

    async def read(self) -> bytes:
        try:
            data = await self._inner.read()
        except BaseException:
            self._end(False)
            raise
        if not data:
            self._end(True)
        return data

    def abort(self) -> None:
        self._end(None)
        abort = getattr(self._inner, "abort", None)
        if abort is not None:
            abort()

    def detach(self) -> tuple[asyncio.Transport, bytes]:
        self._end(True)
        inner = detachable(self._inner)
        if inner is None:
            raise TypeError("this response body is not a tunnel")
        return inner.detach()


def _abort_body(body: BodyStream) -> None:
    abort = getattr(body, "abort", None)
    if abort is not None:
        abort()


def _track(resp: UpstreamResponse, on_end: Callable[[EndVerdict], None]) -> UpstreamResponse:
    # Layers stacked on one response share one wrapper: each wrapper costs a coroutine per read.
    # The response object is the layer's own (from the layer below), so it is updated in place.
    if not (isinstance(resp.body, _Tracked) and resp.body.add(on_end)):
        resp.body = _Tracked(resp.body, on_end)
    return resp


@dataclass(slots=True)
class Call:
    """One request's journey through the layers. Layers fill in what they decide."""

    ctx: DownstreamContext
    active: Active
    head: RequestHead  # as it goes upstream
    body: BodyStream
    hop: HttpHop | None
    grpc: bool
    matched: Service | None = None  # the service the app addressed (by VIP:port, then Host)
    service: Service | None = None  # the destination service (after route splits)
    route: Route | None = None
    target: Endpoint | None = None  # a fixed destination (inbound app, passthrough)
    inbound_port: InboundPort | None = None
    endpoint: Endpoint | None = None  # chosen for the current try
    tried: list[Endpoint] = field(default_factory=list)
    retries: int = 0
    per_try_timeout: float | None = None  # set by the retry layer, enforced by the balance layer
    upgrade: bool = False  # an Upgrade or CONNECT request: HTTP/1.1 upstream whatever is declared
    loop: asyncio.AbstractEventLoop | None = None  # looked up once per request (timers)
    task: asyncio.Task[object] | None = None  # the request's task (timeouts cancel it)

    @property
    def policy(self) -> TrafficPolicy:
        """The backend's policy: breaker, outlier detection, balancing, connection settings."""
        return self.service.policy if self.service is not None else _DEFAULT_POLICY

    @property
    def request_policy(self) -> TrafficPolicy:
        """The addressed service's policy: timeout, retries, fault injection.

        These belong to the request the app made to the service it called, so a split of
        ``inventory`` into ``inventory-v1``/``-v2`` keeps ``inventory``'s retries and timeout
        (as with Istio's VirtualService vs DestinationRule, and Gateway API's route-level
        timeouts); the backends' own policies govern their breakers and endpoints.
        """
        if self.matched is not None:
            return self.matched.policy
        return self.policy


Next = Callable[[Call], Awaitable[UpstreamResponse]]


class Layer(Protocol):
    """One step of the stack: does its part, then (usually) ``await nxt(call)``."""

    def __call__(self, call: Call, nxt: Next) -> Awaitable[UpstreamResponse]: ...


class Proxy:
    """The pipeline (see module doc). ``handle`` is the codecs' ``RequestHandler``."""

    def __init__(
        self,
        runtime: Runtime,
        clients: Mapping[str, UpstreamClient],
        *,
        inbound_clients: Mapping[str, UpstreamClient] | None = None,
        telemetry: Telemetry | None = None,
        rng: random.Random | None = None,
        stream_idle_timeout: float | None = STREAM_IDLE_TIMEOUT,
    ) -> None:
        self.runtime = runtime
        self.stream_idle_timeout = stream_idle_timeout
        # Requests whose body was still arriving when they reached the pipeline, each watched
        # by a stream idle timer from the start (for tests and debugging; see ``handle``).
        self.request_watchdogs = 0
        self.clients = clients
        # Connections to the app: their own pools, bound to the passthrough source when the
        # app is not on loopback (``core.passthrough``). The same address:port can be an
        # outbound destination too (a call to a service on this pod), which must not share them.
        self.inbound_clients = inbound_clients if inbound_clients is not None else clients
        self.telemetry = telemetry
        self.rng = rng or random.Random()
        self._gauge_states: dict[int, tuple[Breaker, BreakerState]] = {}
        self._ejected_reported: dict[int, tuple[EndpointPool, int]] = {}  # id(pool) -> last gauge value
        self._panicking: set[ServiceKey] = set()  # services whose pool is in panic mode (for logs)
        self._deadlines: dict[float, _Deadlines] = {}  # whole-request timeouts, by length
        # The outbound stack in each combination of the optional layers (fault, timeout,
        # retry): the route gate picks the one whose layers have something to do for the
        # request, so a no-op layer costs no coroutine. Unknown destinations (passthrough)
        # only need the fixed endpoint set by the balance layer.
        self._outbound: dict[tuple[bool, bool, bool], Next] = {
            (fault, timeout, retry): self._compose(
                [
                    *([self._fault] if fault else []),
                    *([self._timeout] if timeout else []),
                    *([self._retry] if retry else []),
                    self._breaker,
                    self._balance,
                ]
            )
            for fault in (False, True)
            for timeout in (False, True)
            for retry in (False, True)
        }
        self._passthrough = self._compose([self._balance])

    def _compose(self, layers: list[Layer]) -> Next:
        handler: Next = self._upstream
        for layer in reversed(layers):
            handler = _bind(layer, handler)
        return handler

    # ---- the RequestHandler ---------------------------------------------------------------

    async def handle(
        self, ctx: DownstreamContext, head: RequestHead, body: BodyStream, sink: ResponseSink
    ) -> None:
        active = self.runtime.active  # captured once for the whole exchange
        grpc, upgrade = _classify(head)
        matched: Service | None = None  # outbound: the service the app addressed (before splits)
        dest_name: str | None = None
        if active is not None:
            if ctx.direction == "inbound":
                dest_name = active.inbound_labels.get(ctx.original_dst_port)
            else:
                matched = active.table.service_for(
                    ctx.original_dst_address, ctx.original_dst_port, head.authority
                )
                dest_name = active.service_labels.get(matched.key) if matched is not None else None
        hop = None
        if self.telemetry is not None:
            hop = self.telemetry.start_http(
                direction=ctx.direction,
                head=head,
                peer=(ctx.peer_address, ctx.peer_port),
                destination_service=dest_name,
            )
        idle = self.stream_idle_timeout
        watched: _WatchedCounting | None = None
        counted: _Counting
        if (
            idle is not None
            and not getattr(body, "complete", False)
            and upgrade is None
            and head.method != "CONNECT"
        ):
            # A request body still arriving can stall (a client that sends a head and part of
            # a body, then nothing), pinning the upstream connection and breaker slot with no
            # route timeout inbound, nor outbound with it disabled. A bodyless request (``EMPTY``
            # is complete) or one whose body arrived whole cannot: no watchdog, no timer, the
            # plain counter. Upgrades and CONNECT become tunnels, which have no idle timeout.
            counted = watched = _WatchedCounting(body)
        else:
            counted = _Counting(body)
        headers = end_to_end(head.headers, keep_te_trailers=head.version == "2")
        up_head = head.with_headers(headers)
        if hop is not None:
            up_head = up_head.with_headers(hop.upstream_headers(up_head))
        if upgrade:
            up_head = up_head.with_headers(
                (*up_head.headers, ("connection", "upgrade"), ("upgrade", upgrade))
            )
        if active is None:
            await self._local(
                sink, hop, LocalReplyError(Flag.NC, "waiting for the first config"), grpc, counted
            )
            return
        call = Call(
            ctx=ctx,
            active=active,
            head=up_head,
            body=counted,
            hop=hop,
            grpc=grpc,
            matched=matched,
            upgrade=upgrade is not None or head.method == "CONNECT",
        )
        # The codecs' sinks know their loop: asking asyncio costs a getpid() system call on
        # Python 3.11, measurable at one per request.
        call.loop = loop = getattr(sink, "loop", None) or asyncio.get_running_loop()
        call.task = task = asyncio.current_task(loop)
        watchdog: _StallWatchdog | None = None
        if watched is not None:
            assert idle is not None
            self.request_watchdogs += 1
            watchdog = watched.watchdog = _StallWatchdog(idle, loop, task, request=body)
        # A failure is answered after the try statement, never inside a handler: a compiled
        # handler that awaits makes its exception every other task's sys.exc_info() meanwhile
        # (meshproxy.compiled).
        local: ProxyError | None = None
        try:
            if ctx.direction == "inbound":
                self._route_inbound(call)
                self._rate_limit(call)
                resp = await self._upstream(call)  # inbound has one endpoint, the app
            else:
                resp = await self._route_outbound(call)(call)
        except asyncio.CancelledError:
            if watchdog is not None:
                watchdog.stop()
                if watchdog.fired and task is not None and task.uncancel() == 0:
                    # Our stream idle timeout, before any response head: the layers below let
                    # go of the breaker slot and endpoint, and the upstream exchange aborted its
                    # connection (half a body was written: it can never be reused). The client
                    # gets a local reply; its connection is not reused (its body is unread).
                    log.info(
                        "request body stalled, local reply",
                        extra={
                            "service": str(call.service.key) if call.service else "",
                            "request_bytes": counted.count,
                        },
                    )
                    local = LocalReplyError(Flag.SI, f"no request body byte for {idle}s")
            if local is None:
                if hop is not None:
                    hop.finish(status=499, flag=Flag.DC.value, request_bytes=counted.count, response_bytes=0)
                raise
        except ProxyError as exc:
            if watchdog is not None:
                watchdog.stop()
            local = exc
        except BaseException:
            if watchdog is not None:
                watchdog.stop()
            raise
        if local is not None:
            await self._local(sink, hop, local, grpc, counted)
            return
        await self._respond(call, resp, sink, counted, upgrade, watchdog)

    async def _local(
        self, sink: ResponseSink, hop: HttpHop | None, exc: ProxyError, grpc: bool, counted: _Counting
    ) -> None:
        head, data = reply_for(exc, grpc=grpc)
        log.debug(
            "local reply", extra={"flag": flag_for(exc).value, "status": head.status, "reason": str(exc)}
        )
        try:
            if data:
                await sink.send_head(head)
                await sink.send_data(data)
                await sink.send_end()
            else:
                await sink.send_head(head, end_stream=True)
        finally:
            if hop is not None:
                hop.finish(
                    status=head.status,
                    flag=flag_for(exc).value,
                    request_bytes=counted.count,
                    response_bytes=len(data),
                    grpc_status=get_header(head.headers, "grpc-status"),
                )

    async def _respond(
        self,
        call: Call,
        resp: UpstreamResponse,
        sink: ResponseSink,
        counted: _Counting,
        upgrade: str | None,
        watchdog: _StallWatchdog | None = None,
    ) -> None:
        """Forward the upstream response. ``watchdog`` is the request's if its body was still
        arriving (it then also watches the response body: one timer per request)."""
        hop = call.hop
        rhead = resp.head
        status = rhead.status
        headers = end_to_end(rhead.headers, keep_te_trailers=False)
        if call.route is not None:
            headers = apply_header_modifier(headers, call.route.response_headers)
        tunnel = (status == 101 and upgrade is not None) or (
            call.head.method == "CONNECT" and 200 <= status < 300
        )
        if status == 101 and upgrade is not None:
            headers = (
                *headers,
                ("connection", "upgrade"),
                ("upgrade", rhead.header("upgrade") or upgrade),
            )
        # Usually nothing was dropped or added: the upstream's head goes on as it is.
        head = (
            rhead
            if headers is rhead.headers
            else ResponseHead(status=status, headers=headers, version=rhead.version, reason=rhead.reason)
        )
        sent = 0
        flag: str | None = None
        try:
            # The client's stream is reset after the inner try statement, not in its handlers:
            # a compiled handler that awaits makes its exception every other task's
            # sys.exc_info() meanwhile (meshproxy.compiled).
            reset = False
            try:
                if tunnel:
                    await sink.send_head(head)
                    await self._tunnel(call, resp, sink)
                    return
                body = resp.body
                empty = known_length(body) == 0
                send_whole = getattr(sink, "send_whole", None)
                take = getattr(body, "take_complete", None) if send_whole is not None else None
                whole: bytes | None = take() if take is not None else None
                if whole is not None:
                    # The whole body is here (the common small response): head, body and end in
                    # one write, no per-chunk coroutines. The last read runs the accounting.
                    assert send_whole is not None
                    if not empty:
                        sent = len(whole)
                    await send_whole(head, whole, body.trailers, end_stream=empty)
                    await body.read()
                    return
                await sink.send_head(head, end_stream=empty)
                if not empty:
                    # A body that already arrived whole (the common small response) cannot stall.
                    if self.stream_idle_timeout is not None and not getattr(body, "complete", False):
                        if watchdog is not None:
                            watchdog.respond()  # the request's: a byte either way is progress
                        else:
                            loop = call.loop or asyncio.get_running_loop()
                            watchdog = _StallWatchdog(
                                self.stream_idle_timeout, loop, call.task or asyncio.current_task(loop)
                            )
                    while data := await body.read():
                        sent += len(data)
                        await sink.send_data(data)
                        if watchdog is not None:
                            watchdog.progress()
                    await sink.send_end(body.trailers)
                else:
                    await body.read()  # lets the accounting wrappers see the end
            except ProxyError as exc:
                # The client went away (any codec's "DC" error): nobody to tell. Otherwise the
                # upstream failed mid-body: the client must see a reset, not a clean end. The
                # downstream is checked first: once the client is gone, whatever failed next
                # (often the upstream read we abandoned) is a consequence, and the flag is DC.
                downstream = exc.flag == Flag.DC.value or bool(getattr(sink, "downstream_closed", False))
                flag = Flag.DC.value if downstream else Flag.UC.value
                _abort_body(resp.body)
                reset = not downstream
            except asyncio.CancelledError:
                _abort_body(resp.body)
                task = call.task or asyncio.current_task()
                if watchdog is not None and watchdog.fired and task is not None and task.uncancel() == 0:
                    # Our own stall timeout, the response head already sent (or being sent): reset
                    # the client's stream, carry on.
                    flag = Flag.SI.value
                    log.info(
                        "stream stalled mid-response, stream reset",
                        extra={"service": str(call.service.key) if call.service else "", "sent": sent},
                    )
                    reset = True
                else:
                    # The codecs cancel a request's task when its client disconnects (HTTP/1 connection
                    # lost, HTTP/2 RST_STREAM); shutdown's drain deadline does too. Either way: DC.
                    flag = Flag.DC.value
                    raise
            except BaseException:
                _abort_body(resp.body)
                raise
            if reset:
                with contextlib.suppress(Exception):
                    await sink.reset()
        finally:
            if watchdog is not None:
                watchdog.stop()
            if hop is not None:
                trailers = resp.body.trailers
                grpc_status = get_header(trailers or resp.head.headers, "grpc-status")
                hop.finish(
                    status=status,
                    flag=flag,
                    request_bytes=counted.count,
                    response_bytes=sent,
                    grpc_status=grpc_status,
                )

    async def _tunnel(self, call: Call, resp: UpstreamResponse, sink: ResponseSink) -> None:
        down, up = detachable(sink), detachable(resp.body)
        if down is None or up is None:
            # An HTTP/2 downstream cannot carry an HTTP/1 upgrade: end it cleanly.
            _abort_body(resp.body)
            await sink.reset()
            return
        down_t, down_pending = down.detach()
        up_t, up_pending = up.detach()
        await splice(down_t, down_pending, up_t, up_pending)

    # ---- layers (in stack order) ----------------------------------------------------------

    def _route_outbound(self, call: Call) -> Next:
        """The route gate: service, route and backend; the stack for this request's policy."""
        ctx, table, svc = call.ctx, call.active.table, call.matched
        if svc is None:
            # Unknown destination: transparent passthrough to where the app was connecting.
            call.target = Endpoint(address=ctx.original_dst_address, port=ctx.original_dst_port)
            if call.hop is not None:
                call.hop.annotate(route="passthrough")
            return self._passthrough
        decision = table.route(svc, call.head.method, call.head.path, call.head.headers, self.rng)
        if decision is None:
            raise LocalReplyError(Flag.NR, f"{svc.key} {call.head.method} {call.head.path}")
        call.service = decision.backend
        route = call.route = decision.route
        call.head = call.head.with_headers(apply_header_modifier(call.head.headers, route.request_headers))
        if call.hop is not None:
            call.hop.annotate(route=decision.route_name, backend=str(decision.backend.key))
        policy = call.request_policy
        # The same conditions the optional layers test before doing anything.
        return self._outbound[
            (
                policy.fault is not None,
                bool(route.timeout) or policy.timeout is not None,
                (route.retry or policy.retry) is not None,
            )
        ]

    def _route_inbound(self, call: Call) -> None:
        """The inbound route gate: the app's address on the original port is the endpoint."""
        active, port = call.active, call.ctx.original_dst_port
        call.target = call.endpoint = active.inbound_targets.get(port) or Endpoint(
            address=active.snapshot.inbound.app_address, port=port
        )
        call.inbound_port = active.inbound_ports.get(port)

    def _rate_limit(self, call: Call) -> None:
        """The inbound rate-limit gate (RL)."""
        port = call.inbound_port
        policy = port.rate_limit if port is not None else None
        name = ""
        if policy is not None:
            name = f"inbound:{call.ctx.original_dst_port}"
        elif port is not None and port.service:
            # Indexed at apply time: a scan of every service per inbound request grew with the mesh.
            by_service = call.active.service_rate_limits.get(port.service)
            if by_service is not None:
                policy, name = by_service
        if policy is not None and not self.runtime.bucket(name, policy).try_acquire():
            if self.telemetry is not None:
                self.telemetry.metrics.rate_limited(port.service if port and port.service else name)
            raise LocalReplyError(Flag.RL, f"{name}: {policy.requests_per_second}/s, burst {policy.burst}")

    async def _fault(self, call: Call, nxt: Next) -> UpstreamResponse:
        fault = call.request_policy.fault
        if call.service is None or fault is None:
            return await nxt(call)
        decision = fault_mod.decide(fault, self.rng)
        if decision.delay > 0:
            if call.hop is not None:
                call.hop.annotate(decision="fault_delay")
            await asyncio.sleep(decision.delay)
        if decision.abort_status is not None:
            raise LocalReplyError(Flag.FI, str(call.service.key), decision.abort_status)
        return await nxt(call)

    async def _timeout(self, call: Call, nxt: Next) -> UpstreamResponse:
        if call.service is None:
            return await nxt(call)
        limit = (
            call.route.timeout
            if call.route is not None and call.route.timeout
            else call.request_policy.timeout
        )
        if limit is None:
            return await nxt(call)
        # asyncio.timeout() would do, but it looks the loop and task up again (on Python 3.11
        # each lookup is a getpid() system call); the request's own are at hand. A timer per
        # request (call_later + cancel: ~2.5 us on the bench VM) is replaced by one queue per
        # timeout length (``_Deadlines``).
        loop, task = call.loop, call.task
        assert loop is not None and task is not None
        queue = self._deadlines.get(limit)
        if queue is None or queue.loop is not loop:
            queue = self._deadline_queue(limit, loop)
        deadline = queue.add(task)
        try:
            return await nxt(call)
        except asyncio.CancelledError as exc:
            if deadline.fired and task.uncancel() == 0:
                raise UpstreamTimeoutError(f"{call.service.key}: no response within {limit}s") from exc
            raise
        finally:
            deadline.finish()

    def _deadline_queue(self, limit: float, loop: asyncio.AbstractEventLoop) -> _Deadlines:
        if len(self._deadlines) >= 64:  # timeouts of configs long gone: drop the idle queues
            self._deadlines = {k: q for k, q in self._deadlines.items() if not q.idle}
        queue = self._deadlines[limit] = _Deadlines(loop, limit)
        return queue

    async def _retry(self, call: Call, nxt: Next) -> UpstreamResponse:
        svc = call.service
        policy = (call.route.retry if call.route is not None else None) or call.request_policy.retry
        if svc is None or policy is None:
            return await nxt(call)
        budget = self.runtime.budget(svc)
        if budget is not None:
            budget.deposit()
        # A body framed as empty needs no replay buffer (nor a stream object per try): every
        # try reads the same nothing.
        replay = ReplayBuffer(call.body, policy.max_body_bytes) if known_length(call.body) != 0 else None
        attempt = 1
        while True:
            if replay is not None:
                call.body = replay.stream()  # NotReplayableError (URX) once a retried body overflowed
            # The per-try timeout is enforced by the balance layer, below the breaker, so the
            # endpoint and the breaker see a TIMEOUT rather than an anonymous cancellation.
            call.per_try_timeout = policy.per_try_timeout
            try:
                resp = await nxt(call)
            except (UpstreamConnectError, UpstreamResetError, UpstreamTimeoutError, ProtocolError) as exc:
                replayable = replay is None or replay.replayable
                if not self._may_retry(call, policy, _outcome(exc), None, None, attempt, replayable, budget):
                    raise
                err: BaseException | None = exc
            else:
                rhead = resp.head
                status = rhead.status
                grpc_status = get_header(rhead.headers, "grpc-status")
                if grpc_status is None and status < 500 and status not in policy.status_codes:
                    # No retry condition can hold for this response (see core.retry: every
                    # status condition needs a 5xx or a listed code, the gRPC ones a
                    # grpc-status): the common answer, without the full decision.
                    return resp
                grpc_code = int(grpc_status) if grpc_status and grpc_status.isdigit() else None
                replayable = replay is None or replay.replayable
                if not self._may_retry(
                    call, policy, Outcome.SUCCESS, status, grpc_code, attempt, replayable, budget
                ):
                    return resp
                _abort_body(resp.body)
                err = None
            breaker = self.runtime.breaker(svc)
            retry_slot = breaker.try_acquire_retry()
            if not retry_slot:
                if err is not None:
                    raise err
                raise LocalReplyError(Flag.UO, retry_slot.reason)
            try:
                call.retries += 1
                if self.telemetry is not None:
                    self.telemetry.metrics.retry(str(svc.key))
                if call.hop is not None:
                    call.hop.annotate(retries=call.retries)
                await asyncio.sleep(backoff(policy, attempt, self.rng))
            finally:
                breaker.release_retry()
            attempt += 1

    def _may_retry(
        self,
        call: Call,
        policy: RetryPolicy,
        outcome: Outcome,
        status: int | None,
        grpc_status: int | None,
        attempt: int,
        replayable: bool,
        budget: RetryBudgetState | None,
    ) -> bool:
        return should_retry(
            policy, call.head.method, outcome, status, grpc_status, attempt, replayable, budget
        )

    async def _breaker(self, call: Call, nxt: Next) -> UpstreamResponse:
        svc = call.service
        if svc is None:
            return await nxt(call)
        breaker = self.runtime.breaker(svc)
        admission = breaker.try_acquire_request()
        if not admission.ok:
            if self.telemetry is not None:
                self.telemetry.metrics.breaker_rejected(
                    str(svc.key), admission.limit.value if admission.limit else "circuit_open"
                )
                # A saturated limit reads "open" until a release brings it below the maximum.
                self._breaker_gauge(svc)
            raise LocalReplyError(admission.flag or Flag.UO, admission.reason)
        try:
            resp = await nxt(call)
        except asyncio.CancelledError:
            breaker.release_request(admission, None)
            raise
        except LocalReplyError:
            breaker.release_request(admission, None)
            raise
        except UpstreamOverflowError:
            # The pool found neither a connection slot nor a pending slot: an overload
            # signal, not an upstream failure (failure accrual must not count it).
            breaker.release_request(admission, None)
            if self.telemetry is not None:
                self.telemetry.metrics.breaker_rejected(str(svc.key), "max_pending_requests")
            self._breaker_gauge(svc)
            raise
        except BaseException:
            breaker.release_request(admission, False)
            self._breaker_gauge(svc)
            raise
        success = resp.head.status < 500

        def done(ok: EndVerdict) -> None:
            # A 5xx is a failure however its body ended; an abandoned 2xx says nothing.
            verdict = False if not success or ok is False else (True if ok else None)
            breaker.release_request(admission, verdict)
            self._breaker_gauge(svc)

        return _track(resp, done)

    def _breaker_gauge(self, svc: Service) -> None:
        if self.telemetry is None:
            return
        breaker = self.runtime.breaker(svc)
        state = breaker.state
        # The gauge is set only when the state changes (a labelled gauge write per request is
        # measurable). Keyed by breaker identity, so a new Breaker (service removed, then back)
        # is always reported; the entry holds the breaker, so its id is not reused meanwhile.
        last = self._gauge_states.get(id(breaker))
        if last is not None and last[1] is state:
            return
        if len(self._gauge_states) > 2 * len(self.runtime.breakers) + 16:
            live = {id(b) for b in self.runtime.breakers.values()}
            self._gauge_states = {k: v for k, v in self._gauge_states.items() if k in live}
        self._gauge_states[id(breaker)] = (breaker, state)
        self.telemetry.metrics.set_breaker_state(str(svc.key), state.value)

    async def _balance(self, call: Call, nxt: Next) -> UpstreamResponse:
        if call.target is not None:
            call.endpoint = call.target
            return await nxt(call)
        svc = call.service
        assert svc is not None
        pool = self.runtime.pool(svc)
        panics = pool.panic_picks
        ep = pool.pick(exclude=call.tried)
        if pool.panic_picks != panics or (self._panicking and svc.key in self._panicking):
            self._panic_seen(svc, pool)
        if self._ejected_reported:
            last = self._ejected_reported.get(id(pool))
            if last is not None and last[1] != pool.ejected_count:
                self._ejected_gauge(svc, pool)  # an ejection ended since the last report
        if ep is None:
            raise LocalReplyError(Flag.UH, str(svc.key))
        call.endpoint = ep
        call.tried.append(ep)
        if call.hop is not None and ep.workload:
            call.hop.annotate(destination_workload=ep.workload)
        pool.on_request_start(ep)
        try:
            if call.per_try_timeout is None:
                resp = await nxt(call)
            else:
                try:
                    async with asyncio.timeout(call.per_try_timeout) as cm:
                        resp = await nxt(call)
                except TimeoutError as exc:
                    if cm.expired():
                        raise UpstreamTimeoutError(
                            f"{svc.key}: {ep.address}:{ep.port} sent no response within {call.per_try_timeout}s"
                        ) from exc
                    raise
        except BaseException as exc:
            self._endpoint_done(svc, pool, ep, _outcome(exc))
            raise
        outcome = outcome_for_status(resp.head.status)

        def done(ok: EndVerdict) -> None:
            if outcome is Outcome.SUCCESS and ok is not True:
                self._endpoint_done(svc, pool, ep, Outcome.RESET if ok is False else Outcome.LOCAL)
            else:
                self._endpoint_done(svc, pool, ep, outcome)

        return _track(resp, done)

    def _panic_seen(self, svc: Service, pool: EndpointPool) -> None:
        """Count a pick made in panic mode; log when a service enters or leaves it."""
        dest = str(svc.key)
        if pool.in_panic:
            if self.telemetry is not None:
                self.telemetry.metrics.lb_panic(dest)
            if svc.key not in self._panicking:
                self._panicking.add(svc.key)
                log.warning(
                    "load balancer in panic mode: too few healthy endpoints, ignoring outlier ejection",
                    extra={"service": dest, "endpoints": pool.size},
                )
        elif svc.key in self._panicking:
            self._panicking.discard(svc.key)
            log.info("load balancer left panic mode", extra={"service": dest})

    def _endpoint_done(self, svc: Service, pool: EndpointPool, ep: Endpoint, outcome: Outcome) -> None:
        """Outlier feedback for one attempt, and the ejection metrics when it ejected someone."""
        before = pool.ejections_total
        pool.on_request_end(ep, outcome)
        if pool.ejections_total != before and self.telemetry is not None:
            dest = str(svc.key)
            self.telemetry.metrics.ejection(dest)
            self._ejected_gauge(svc, pool)
            log.info("endpoint ejected", extra={"service": dest, "endpoint": f"{ep.address}:{ep.port}"})

    def _ejected_gauge(self, svc: Service, pool: EndpointPool) -> None:
        """Keep ``meshproxy_ejected_endpoints`` equal to the pool's count, written on change only.

        Ejections end lazily (the pool notices at its next pick), so the pick path calls this too."""
        if self.telemetry is None:
            return
        n = pool.ejected_count
        last = self._ejected_reported.get(id(pool))
        if last is None and n == 0:
            return  # never ejected: no series, as before any ejection
        if last is not None and last[1] == n:
            return
        if len(self._ejected_reported) > 2 * len(self.runtime.pools) + 16:
            live = {id(p) for p in self.runtime.pools.values()}
            self._ejected_reported = {k: v for k, v in self._ejected_reported.items() if k in live}
        self._ejected_reported[id(pool)] = (pool, n)
        self.telemetry.metrics.set_ejected(str(svc.key), n)

    async def _upstream(self, call: Call) -> UpstreamResponse:
        ep = call.endpoint
        assert ep is not None
        clients = self.inbound_clients if call.ctx.direction == "inbound" else self.clients
        client = clients.get(self._upstream_version(call)) or clients["1.1"]
        if call.service is not None:
            policy = call.service.policy
            return await client.request(
                ep,
                call.head,
                call.body,
                connect_timeout=policy.connect_timeout,
                idle_timeout=policy.idle_timeout,
                limits=self.runtime.breaker(call.service),
            )
        return await client.request(ep, call.head, call.body, connect_timeout=_PASSTHROUGH_CONNECT_TIMEOUT)

    def _upstream_version(self, call: Call) -> str:
        """The HTTP version spoken upstream: what the destination declares, else the client's.

        gRPC always travels over HTTP/2 (it needs trailers); upgrades and CONNECT over
        HTTP/1.1 (HTTP/2 cannot carry them). A service/inbound port declared ``http1``
        gets HTTP/1.1 even from an HTTP/2 client, ``http2`` gets HTTP/2 (h2c prior
        knowledge) even from an HTTP/1.1 client; ``auto`` keeps the client's version.
        """
        if "2" not in self.clients or call.upgrade:
            return "1.1"
        if call.grpc:
            return "2"
        if call.service is not None:
            declared = call.service.protocol
        elif call.inbound_port is not None:
            declared = call.inbound_port.protocol
        else:
            declared = AppProtocol.AUTO
        if declared is AppProtocol.HTTP2:
            return "2"
        if declared is AppProtocol.HTTP1:
            return "1.1"
        return "2" if call.head.version == "2" else "1.1"

    # ---- opaque TCP -------------------------------------------------------------------------

    async def handle_tcp(
        self,
        ctx: DownstreamContext,
        transport: asyncio.Transport,
        take_pending: Callable[[], tuple[bytes, bool]],
    ) -> None:
        """Relay one opaque TCP connection.

        ``take_pending()`` returns the bytes (and EOF) the listener already read; it is
        called right before the splice, so nothing that arrives meanwhile is lost.
        """
        active = self.runtime.active
        svc: Service | None = None
        candidates: list[Endpoint] = []
        connect_timeout = _PASSTHROUGH_CONNECT_TIMEOUT
        dest_name = "unknown"
        if ctx.direction == "inbound":
            app = active.snapshot.inbound.app_address if active is not None else "127.0.0.1"
            candidates = [Endpoint(address=app, port=ctx.original_dst_port)]
            if active is not None:
                dest_name = active.inbound_labels.get(ctx.original_dst_port, dest_name)
        elif active is not None:
            svc = active.table.service_for(ctx.original_dst_address, ctx.original_dst_port, None)
        if ctx.direction == "outbound" and svc is None:
            candidates = [Endpoint(address=ctx.original_dst_address, port=ctx.original_dst_port)]
        hop = None
        if svc is not None and active is not None:
            dest_name = active.service_labels.get(svc.key, dest_name)
            connect_timeout = svc.policy.connect_timeout
        if self.telemetry is not None:
            hop = self.telemetry.tcp_opened(direction=ctx.direction, destination_service=dest_name)
        pool = self.runtime.pool(svc) if svc is not None else None
        upstream: Parked | None = None
        chosen: Endpoint | None = None
        last: Exception | None = None
        for _ in range(3 if pool is not None else 1):
            if pool is not None and svc is not None:
                panics = pool.panic_picks
                chosen = pool.pick(exclude=[e for e in candidates])
                if pool.panic_picks != panics or (self._panicking and svc.key in self._panicking):
                    self._panic_seen(svc, pool)
                if chosen is None:
                    break
                candidates.append(chosen)
                pool.on_request_start(chosen)
            else:
                chosen = candidates[0]
            try:
                upstream = await open_tcp(
                    chosen.address,
                    chosen.port,
                    connect_timeout=connect_timeout,
                    local_addr=source_for(chosen.address) if ctx.direction == "inbound" else None,
                )
                break
            except UpstreamConnectError as exc:
                last = exc
                if pool is not None:
                    pool.on_request_end(chosen, Outcome.CONNECT_FAILURE)
        if upstream is None or chosen is None:
            transport.abort()
            log.info(
                "tcp upstream unavailable",
                extra={
                    "direction": ctx.direction,
                    "destination": dest_name,
                    "error": str(last or "no endpoint"),
                },
            )
            if hop is not None:
                hop.finish(bytes_sent=0, bytes_received=0, flag=(Flag.UF if last else Flag.UH).value)
            return
        stats = None
        try:
            pending, eof = take_pending()
            up_t, up_pending, up_eof = upstream.take()
            stats = await splice(transport, pending, up_t, up_pending, a_eof=eof, b_eof=up_eof)
        finally:
            if pool is not None:
                pool.on_request_end(chosen, Outcome.SUCCESS if stats is not None else Outcome.LOCAL)
            if hop is not None:
                hop.finish(
                    bytes_sent=stats.a_to_b if stats else 0,
                    bytes_received=stats.b_to_a if stats else 0,
                    flag=Flag.UC.value if stats is not None and stats.reset else None,
                )


class _Deadline:
    """Cancels ``task`` when fired and remembers it did (so the cancellation can be told apart)."""

    __slots__ = ("done", "fired", "task", "when")

    def __init__(self, task: asyncio.Task[object], when: float) -> None:
        self.task: asyncio.Task[object] | None = task
        self.when = when
        self.fired = False
        self.done = False

    def fire(self) -> None:
        task = self.task
        self.done = True
        self.task = None
        if task is not None and not task.done():
            self.fired = True
            task.cancel()

    def finish(self) -> None:
        """The guarded part is over: never fire (and let go of the task)."""
        self.done = True
        self.task = None


class _Deadlines:
    """The whole-request deadlines of one timeout length: a FIFO and at most one timer.

    Deadlines of one length are added in the order they expire, so the earliest live one
    is the first not yet done. ``add`` appends (dropping finished entries at the front, so
    the queue holds about the requests in flight); finishing only marks an entry; the one
    timer, armed for the front, drops finished entries, fires expired ones and re-arms for
    the next. A busy proxy so arms about one timer per timeout period instead of a
    ``call_later`` and a ``cancel`` per request, and fires each deadline on time.
    """

    __slots__ = ("_limit", "_queue", "_timer", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: float) -> None:
        self.loop = loop
        self._limit = limit
        self._queue: deque[_Deadline] = deque()
        self._timer: asyncio.TimerHandle | None = None

    @property
    def idle(self) -> bool:
        return self._timer is None and not self._queue

    def add(self, task: asyncio.Task[object]) -> _Deadline:
        queue = self._queue
        while queue and queue[0].done:
            queue.popleft()
        deadline = _Deadline(task, self.loop.time() + self._limit)
        queue.append(deadline)
        if self._timer is None:
            self._timer = self.loop.call_at(deadline.when, self._fire)
        return deadline

    def _fire(self) -> None:
        self._timer = None
        queue = self._queue
        now = self.loop.time()
        while queue:
            first = queue[0]
            if not first.done and first.when > now:
                self._timer = self.loop.call_at(first.when, self._fire)
                return
            queue.popleft()
            if not first.done:
                first.fire()


class _StallWatchdog:
    """Cancels the request's task when its stream moved no byte for ``idle`` seconds.

    Two sides report progress: a request body still arriving (``request``; each chunk the
    upstream side reads, through ``_WatchedCounting``) and, after ``respond``, the response
    body being forwarded. Before ``respond`` it watches only while the request body is still
    arriving: once all of it is here the client has nothing left to stall, and the wait for
    the response head is the route timeout's; the timer then lapses (``respond`` re-arms it).

    One timer per request, re-armed lazily when it fires before the deadline (progress only
    moves a timestamp), so a fast body costs one timer, not one per chunk. ``fired`` tells
    the task that the cancellation is ours (``Task.uncancel`` then undoes it).
    """

    __slots__ = ("_handle", "_idle", "_last", "_loop", "_request", "_task", "fired", "responding")

    def __init__(
        self,
        idle: float,
        loop: asyncio.AbstractEventLoop,
        task: asyncio.Task[object] | None,
        *,
        request: BodyStream | None = None,
    ) -> None:
        self._loop = loop
        self._task = task
        self._idle = idle
        self._request = request  # the downstream request body, while it may still arrive
        self.responding = request is None
        self._last = loop.time()
        self.fired = False
        self._handle: asyncio.TimerHandle | None = loop.call_at(self._last + idle, self._check)

    def progress(self) -> None:
        self._last = self._loop.time()

    def respond(self) -> None:
        """The response body is being forwarded: watch it too (re-arming a lapsed timer)."""
        self.responding = True
        self._last = self._loop.time()
        if self._handle is None and self._task is not None and not self.fired:
            self._handle = self._loop.call_at(self._last + self._idle, self._check)

    def _check(self) -> None:
        self._handle = None
        if not self.responding and getattr(self._request, "complete", False):
            return  # the whole request body is here: nothing of the client's left to stall
        deadline = self._last + self._idle
        if self._loop.time() < deadline:
            self._handle = self._loop.call_at(deadline, self._check)
            return
        if self._task is not None and not self._task.done():
            self.fired = True
            self._task.cancel()

    def stop(self) -> None:
        self._task = None  # a late progress or respond arms nothing
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


def _bind(layer: Layer, nxt: Next) -> Next:
    # A partial, not a wrapping coroutine: calling it returns the layer's own coroutine, so
    # each request creates one coroutine per layer instead of two.
    return functools.partial(layer, nxt=nxt)


def _classify(head: RequestHead) -> tuple[bool, str | None]:
    """(gRPC?, the Upgrade token we pass through or None), in one pass over the headers."""
    content_type = up = conn = None
    for k, v in head.headers:
        if k == "content-type":
            if content_type is None:
                content_type = v
        elif k == "upgrade":
            if up is None:
                up = v
        elif k == "connection" and conn is None:
            conn = v
    grpc = content_type is not None and content_type.startswith("application/grpc")
    if (
        head.version != "1.1"
        or up is None
        or conn is None
        or "upgrade" not in conn.lower()
        or up.strip().lower().startswith("h2c")
    ):
        return grpc, None
    return grpc, up


class _Counting:
    """Counts request body bytes for telemetry while passing the stream through."""

    __slots__ = ("_inner", "count")

    def __init__(self, inner: BodyStream) -> None:
        self._inner = inner
        self.count = 0

    @property
    def content_length(self) -> int | None:
        return known_length(self._inner)

    @property
    def trailers(self) -> Headers | None:
        return self._inner.trailers

    def take_complete(self) -> bytes | None:
        """The rest of the body in one piece if it has all arrived (see ``BodyQueue``), else
        None: a unary gRPC request goes upstream as HEADERS and one DATA frame carrying
        END_STREAM, without a pump task (``Http2Client``)."""
        take = getattr(self._inner, "take_complete", None)
        data: bytes | None = take() if take is not None else None
        if data is not None:
            self.count += len(data)
        return data

    async def read(self) -> bytes:
        data = await self._inner.read()
        self.count += len(data)
        return data


class _WatchedCounting(_Counting):
    """A request body that was still arriving when the request reached the pipeline: each
    chunk the upstream side reads is progress for the stream's watchdog. Only such bodies
    pay for it; the others get the plain ``_Counting``."""

    __slots__ = ("watchdog",)

    def __init__(self, inner: BodyStream) -> None:
        super().__init__(inner)
        self.watchdog: _StallWatchdog | None = None  # set once the request's task is known

    def take_complete(self) -> bytes | None:
        data = super().take_complete()
        if data is not None and self.watchdog is not None:
            self.watchdog.progress()
        return data

    async def read(self) -> bytes:
        data = await self._inner.read()
        self.count += len(data)
        if self.watchdog is not None:
            self.watchdog.progress()
        return data
