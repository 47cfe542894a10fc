"""The sidecar's discovery client: one config stream to the control plane.

Owns: the proxy side of the stream contract in
``protos/meshapi/discovery/v1/discovery.proto``: say who we are, receive full
snapshots and incremental endpoint updates (rebuilt on the last good snapshot;
one we cannot rebuild is NACKed with FAILED_PRECONDITION and the server sends
the full snapshot), validate and apply them, ACK or NACK each one, reconnect with
jittered exponential backoff, and report the connection state.

API (what ``meshproxy.io.app`` uses)::

    client = XdsClient(target, node, apply, on_state)
    task = asyncio.create_task(client.run(), name="xds-client")   # runs until cancelled

  * ``target``: "host:port" of the control plane (default port 15010).
  * ``node``: ``meshproxy.xds.convert.ProxyNode`` (pod, namespace, service
    account, labels, pod IP, ...), sent as the first request of every stream.
  * ``apply(snapshot) -> None``: called on the event loop with each new
    validated snapshot, full or rebuilt from an incremental endpoint update of the
    last good one (conversion and validation run in a worker thread). Raise ``ConfigError`` to reject it: the client NACKs
    with that message and the proxy keeps its last good snapshot. It must not
    block (swap the snapshot in with one assignment).
  * ``on_state(ConnectionState) -> None`` (optional): CONNECTING before each
    attempt, CONNECTED once the first response of a stream arrived,
    DISCONNECTED when a stream ends (for metrics and /ready).
  * ``client.last_good``: the last applied snapshot (or None); its version is
    sent on reconnect so the control plane knows what we already run.

Invariants: exactly one ACK/NACK per response, carrying its nonce; an ACK names
the version just applied, a NACK the last good version. ``apply`` is never
called with a snapshot that failed validation (``ConfigError`` from
``meshproxy.xds.convert``), nor with the version already applied. Backoff
resets after a stream that delivered a response; delays are drawn uniformly
in [delay/2, delay] so proxies restarted together do not reconnect in step.

Concurrency: ``run`` is one task; each stream attempt uses one grpc.aio
channel, closed when the attempt ends. Cancelling ``run`` closes the stream.

Also runnable for debugging: ``python -m meshproxy.xds.client HOST:PORT --pod P
--namespace N`` prints each version it receives (never NACKs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import logging
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from meshapi.discovery.v1 import discovery_pb2_grpc
from meshproxy.config.model import Snapshot
from meshproxy.core.errors import ConfigError
from meshproxy.xds import convert
from meshproxy.xds.convert import ProxyNode
from meshproxy.xds.version import ServiceDigests

log = logging.getLogger(__name__)

_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]  # the stubs lack it

__all__ = ["Backoff", "ConnectionState", "ProxyNode", "XdsClient"]


class ConnectionState(enum.Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"


@dataclass(frozen=True, slots=True)
class Backoff:
    """Reconnect delays: ``initial`` doubling up to ``maximum``, jittered down by up to half."""

    initial: float = 0.5
    maximum: float = 30.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        base = min(self.maximum, self.initial * (2 ** max(0, attempt)))
        return rng.uniform(base / 2, base)


def channel_options(max_message_bytes: int = 64 * 1024 * 1024) -> list[tuple[str, Any]]:
    return [
        # Ping every 10 s, give up 10 s later: a dead control plane (or a half-open
        # connection through a dead NAT) is noticed within about 30 s.
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # We do our own jittered backoff between streams.
        ("grpc.enable_retries", 0),
    ]


class XdsClient:
    def __init__(
        self,
        target: str,
        node: ProxyNode,
        apply: Callable[[Snapshot], None],
        on_state: Callable[[ConnectionState], None] | None = None,
        *,
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
        initial: Snapshot | None = None,
    ) -> None:
        self.target = target
        self.node = node
        self._apply = apply
        self._on_state = on_state
        self._backoff = backoff or Backoff()
        self._rng = rng or random.Random()
        self.last_good: Snapshot | None = initial
        # Digests of the last checked snapshot's services: an endpoint update's version check
        # then hashes only the services it replaced (10,000 endpoints: ~185 -> ~80 ms per update).
        self._digests = ServiceDigests()
        self.state = ConnectionState.DISCONNECTED
        self.streams = 0  # stream attempts so far (for tests and logs)
        self.last_error = ""

    def _set_state(self, state: ConnectionState) -> None:
        self.state = state
        if self._on_state is not None:
            try:
                self._on_state(state)
            except Exception:
                log.exception("on_state callback failed")

    async def run(self) -> None:
        """Keep a stream open until cancelled."""
        attempt = 0
        try:
            while True:
                self._set_state(ConnectionState.CONNECTING)
                self.streams += 1
                got_response = False
                try:
                    got_response = await self._stream()
                    self.last_error = "stream ended by the control plane"
                except _Delivered as d:
                    got_response = True
                    self.last_error = d.reason
                except grpc.aio.AioRpcError as exc:
                    self.last_error = _describe(exc)
                except Exception as exc:
                    # Per stream: whatever broke this attempt (a write on a call the server
                    # just ended, a channel error), the proxy keeps its config and retries.
                    log.warning("discovery stream failed", exc_info=True, extra={"target": self.target})
                    self.last_error = repr(exc)
                self._set_state(ConnectionState.DISCONNECTED)
                attempt = 0 if got_response else attempt + 1
                delay = self._backoff.delay(attempt, self._rng)
                log.info(
                    "discovery stream ended; reconnecting",
                    extra={"target": self.target, "error": self.last_error, "delay": round(delay, 3)},
                )
                await asyncio.sleep(delay)  # the backoff itself, not synchronisation
        finally:
            self._set_state(ConnectionState.DISCONNECTED)

    async def _stream(self) -> bool:
        """One stream attempt. Returns whether any response arrived (resets the backoff)."""
        got = False
        async with grpc.aio.insecure_channel(self.target, options=channel_options()) as channel:
            stub = discovery_pb2_grpc.ConfigDiscoveryStub(channel)  # type: ignore[no-untyped-call]
            call = stub.StreamConfig()
            version = self.last_good.version if self.last_good else ""
            try:
                await call.write(convert.first_request(self.node, version))
                while True:
                    resp = await call.read()
                    if resp is _EOF:
                        return got
                    if not got:
                        got = True
                        self._set_state(ConnectionState.CONNECTED)
                    await call.write(await self._handle(resp))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if got:
                    raise _Delivered(_describe(exc)) from exc
                raise
            finally:
                call.cancel()

    async def _handle(self, resp: Any) -> Any:
        """Validate and apply one response; returns the ACK or NACK to send."""
        last_good = self.last_good.version if self.last_good else ""
        try:
            # Converting and validating a big snapshot takes a while (10,000 endpoints: tenths
            # of a second); a worker thread lets the proxy's loop keep serving meanwhile.
            snapshot = await asyncio.to_thread(convert.received_response, resp, self.last_good, self._digests)
            if self.last_good is None or snapshot.version != self.last_good.version:
                self._apply(snapshot)
                self.last_good = snapshot
        except convert.BaseVersionMismatch as exc:
            # Not a bad config: the server resends this version in full.
            log.info(
                "cannot apply an incremental update", extra={"version": resp.version_info, "error": str(exc)}
            )
            return convert.nack(last_good, resp.nonce, str(exc), code=convert.FAILED_PRECONDITION)
        except ConfigError as exc:
            log.warning("rejecting config", extra={"version": resp.version_info, "error": str(exc)})
            return convert.nack(last_good, resp.nonce, str(exc))
        except Exception as exc:
            # A bug in apply must not kill the stream in a loop of reconnects: NACK it, keep
            # the last good config, and let the operator see the reason in meshctl.
            log.exception("applying config failed", extra={"version": resp.version_info})
            return convert.nack(last_good, resp.nonce, f"internal error applying config: {exc!r}")
        log.info("config applied", extra={"version": snapshot.version})
        return convert.ack(snapshot.version, resp.nonce)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return repr(exc)


class _Delivered(Exception):
    """A stream that had delivered at least one response broke (resets the backoff)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m meshproxy.xds.client", description="Print configs a proxy would get."
    )
    p.add_argument("target")
    p.add_argument("--pod", required=True)
    p.add_argument("--namespace", required=True)
    p.add_argument("--label", action="append", default=[], help="KEY=VALUE (repeatable)")
    args = p.parse_args(argv)
    labels = tuple(sorted((k, v) for k, _, v in (kv.partition("=") for kv in args.label)))
    node = ProxyNode(pod=args.pod, namespace=args.namespace, labels=labels)

    def apply(snapshot: Snapshot) -> None:
        services = len(snapshot.services)
        endpoints = sum(len(s.endpoints) for s in snapshot.services)
        print(f"applied {snapshot.version} services={services} endpoints={endpoints}", flush=True)

    def on_state(state: ConnectionState) -> None:
        print(f"state {state.value}", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(XdsClient(args.target, node, apply, on_state).run())
    return 0


if __name__ == "__main__":
    sys.exit(_main())
