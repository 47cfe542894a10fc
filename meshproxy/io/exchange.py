"""The seam between downstream codecs, the proxy pipeline and upstream clients.

Owns: the asyncio-level protocols that an HTTP/1.1 or HTTP/2 codec implements,
so the request pipeline (routing, retries, telemetry) is written once.

    downstream codec (http1_server / http2_server)
        -> RequestHandler(ctx, head, body, sink)      (the pipeline, proxy.py)
            -> UpstreamClient.request(endpoint, head, body) -> UpstreamResponse
                 (http1_client / http2_client pools)

Invariants:
  * Bodies are streamed chunk by chunk with back-pressure: ``BodyStream.read``
    awaits the next chunk (bounded buffering in the codec), ``ResponseSink.send_data``
    awaits until the chunk was handed to the transport below its high-water mark.
  * A ``BodyStream`` ends with ``b""``; ``trailers`` is set only after that.
  * ``ResponseSink`` is used in order: ``send_head`` once, ``send_data`` any number
    of times, ``send_end`` once; or ``reset`` at any time.
  * Optional fast path, looked up with ``getattr`` by the pipeline: a body with
    ``take_complete() -> bytes | None`` (all of the rest, once the body has ended without
    error, else None; ``read`` then returns ``b""``) and a sink with ``send_whole(head,
    data, trailers, *, end_stream)`` (the same as ``send_head`` + ``send_data`` +
    ``send_end``, in one step). A response that arrived whole then costs one write.

Concurrency: one asyncio task per request (HTTP/2 streams run concurrently on
one connection).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from meshproxy.config.model import Endpoint
from meshproxy.core.breaker import Admission
from meshproxy.core.http import Headers, RequestHead, ResponseHead


class BodyStream(Protocol):
    async def read(self) -> bytes:
        """Next chunk; ``b""`` once the body has ended."""
        ...

    @property
    def trailers(self) -> Headers | None:
        """Trailers received after the last chunk (HTTP/2, chunked HTTP/1), or None."""
        ...


class ResponseSink(Protocol):
    async def send_head(self, head: ResponseHead, *, end_stream: bool = False) -> None: ...

    async def send_data(self, data: bytes) -> None: ...

    async def send_end(self, trailers: Headers | None = None) -> None: ...

    async def reset(self) -> None:
        """Abort the response (HTTP/2 RST_STREAM, HTTP/1 connection close)."""
        ...


@dataclass(frozen=True, slots=True)
class DownstreamContext:
    """What the listener knows about the connection a request came in on."""

    direction: str  # "outbound" (app -> mesh, port 15001) or "inbound" (mesh -> app, 15006)
    peer_address: str
    peer_port: int
    original_dst_address: str  # from SO_ORIGINAL_DST (or the local address without interception)
    original_dst_port: int
    connection_id: int


RequestHandler = Callable[[DownstreamContext, RequestHead, BodyStream, ResponseSink], Awaitable[None]]


@dataclass(slots=True)
class UpstreamResponse:
    head: ResponseHead
    body: BodyStream


class ConnectionLimits(Protocol):
    """The destination's connection budget (``meshproxy.core.breaker.Breaker`` implements it)."""

    def try_acquire_connection(self) -> Admission: ...

    def release_connection(self) -> None: ...

    def try_acquire_pending(self) -> Admission: ...

    def release_pending(self) -> None: ...


class UpstreamClient(Protocol):
    async def request(
        self,
        endpoint: Endpoint,
        head: RequestHead,
        body: BodyStream,
        *,
        connect_timeout: float,
        idle_timeout: float | None = None,
        limits: ConnectionLimits | None = None,
    ) -> UpstreamResponse:
        """Send ``head`` and stream ``body`` to ``endpoint``; return when the response head arrives.

        ``idle_timeout`` (the destination's ``TrafficPolicy.idle_timeout``) closes pooled
        connections to the endpoint that stay unused that long; None keeps the client's default.
        ``limits`` (the service's breaker): a new connection needs a ``max_connections`` slot;
        without one the request waits for a pooled connection as a pending request
        (``max_pending_requests``); beyond that it fails with ``UpstreamOverflowError`` (UO).

        Raises ``meshproxy.core.errors.UpstreamConnectError`` if no connection could be made,
        ``UpstreamResetError`` if the connection/stream died before a response head.
        """
        ...
