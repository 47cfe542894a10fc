"""The cluster watch: the only module that reads the Kubernetes API.

Owns: one list+watch loop per kind (Namespaces, Services, EndpointSlices, Pods,
HTTPRoutes, TrafficPolicies) and the hand-off of what it sees, as
``controlplane.events`` values, to a sink on the asyncio loop.

Per kind the loop is (kopf / client-go reflector style):

  1. LIST (paged with ``limit``/``continue``, a consistent read) and deliver one
     ``Relist(kind, objects)``: the index replaces everything of that kind.
  2. WATCH from the list's resourceVersion with ``allowWatchBookmarks`` and a
     server-side ``timeoutSeconds``; deliver each ADDED/MODIFIED/DELETED as a
     ``WatchEvent``; BOOKMARKs only move the resume point.
  3. When a watch ends normally (timeout) re-watch from the last resourceVersion
     seen: no event is lost and nothing is listed again.
  4. 410 Gone (our resourceVersion is older than the server's history: etcd
     compacted, API server restarted) -> back to 1 at once. Because step 1
     delivers a full ``Relist``, a deletion that happened while we were away is
     not lost: the object is simply absent from the new list.
  5. Any other error (connection refused, 5xx, 403, a read that stayed silent
     longer than the client timeout) -> jittered exponential back-off, then
     resume the watch from the last resourceVersion (3).
  6. 404 on the kind's path (a CRD such as HTTPRoute not installed, or deleted)
     -> deliver an empty ``Relist`` (so ``synced`` is not held up and objects of
     a deleted CRD disappear), log once per outage, retry every
     ``missing_kind_retry`` seconds. Other kinds are not affected.

Objects are delivered as the API server serves them (camelCase JSON decoded to
dicts); list items get the ``apiVersion``/``kind`` the list response leaves out,
so every object looks the same whether it came from a list or a watch.

Concurrency: the ``kubernetes`` client is synchronous, so each kind runs in its
own thread. Threads hand events to the asyncio loop with
``call_soon_threadsafe``; a semaphore bounds the events in flight
(``WatchSettings.max_pending_events``), so a slow sink makes the watch threads
wait (TCP back-pressure on the API server) instead of growing a queue without
limit. The sink is called on the loop thread, in order per kind. Stopping
(cancel ``run()``) sets a stop flag, shuts down every open HTTP response so a
blocked read returns at once, and joins the threads. ``on_restart`` is called
from the kind's thread and must be thread-safe (a prometheus Counter is).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import random
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import kubernetes
import urllib3

from controlplane.events import ClusterEvent, Relist, WatchEvent

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class KindSpec:
    """Where a kind lives in the API."""

    kind: str
    group: str  # "" for the core group
    version: str
    plural: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def path(self) -> str:
        """The all-namespaces collection path."""
        if self.group:
            return f"/apis/{self.group}/{self.version}/{self.plural}"
        return f"/api/{self.version}/{self.plural}"


KIND_SPECS: Final[Mapping[str, KindSpec]] = {
    s.kind: s
    for s in (
        KindSpec("Namespace", "", "v1", "namespaces"),
        KindSpec("Service", "", "v1", "services"),
        KindSpec("EndpointSlice", "discovery.k8s.io", "v1", "endpointslices"),
        KindSpec("Pod", "", "v1", "pods"),
        KindSpec("HTTPRoute", "gateway.networking.k8s.io", "v1", "httproutes"),
        KindSpec("TrafficPolicy", "policy.meshproxy.io", "v1alpha1", "trafficpolicies"),
    )
}


@dataclass(frozen=True, slots=True)
class WatchSettings:
    """How the watch talks to the API server. Every default says why."""

    # The API server ends each watch after this long and we re-watch from the last
    # resourceVersion. Ending it ourselves regularly bounds how long a silently broken
    # stream (a half-open TCP connection through a dead load balancer) can go unnoticed,
    # and is cheap: no relist. 5 minutes is what client-go's reflector uses on average.
    server_timeout: float = 300.0
    # Client-side read timeout: a watch that sends nothing (no event, no bookmark) for
    # longer than the server promised to keep it open is dead. The margin covers a busy
    # API server that closes the stream a little late.
    client_timeout_margin: float = 30.0
    # A TCP+TLS connect to the API server takes milliseconds in a cluster; 10 s means the
    # server is overloaded or unreachable, and the back-off takes over.
    connect_timeout: float = 10.0
    # A LIST of one 500-item page must come back in this long, or we retry.
    list_timeout: float = 60.0
    # Paging keeps one response below a few MB and the API server's memory per request
    # bounded; 500 is what kubectl and client-go use.
    list_page_size: int = 500
    # Back-off after an error: starts small so a blip (API server restart) costs little,
    # doubles up to 30 s so a long outage is not hammered; each delay is drawn in
    # [delay*(1-jitter), delay] so many control plane replicas do not reconnect in step.
    backoff_initial: float = 0.2
    backoff_max: float = 30.0
    backoff_jitter: float = 0.5
    # A kind whose API is absent (HTTPRoute CRDs not installed yet) is re-checked this often:
    # short enough that installing Gateway API takes effect quickly, long enough to cost
    # nothing.
    missing_kind_retry: float = 5.0
    # Events handed to the asyncio loop and not yet consumed by the sink. Back-pressure,
    # not a cache: when the sink is slow the watch threads wait.
    max_pending_events: int = 1024
    # A single watch event larger than this is a protocol error (etcd refuses objects over
    # 1.5 MiB; the JSON of one is well below this).
    max_event_bytes: int = 16 * 1024 * 1024
    # How long stop waits for the threads to notice (they are woken by shutting down their
    # sockets, so this only matters if the client is stuck elsewhere).
    stop_timeout: float = 5.0


RestartReason = Literal["gone", "error", "missing"]
"""Why a kind's loop started over: 410 Gone (relist), an error (back-off, resume), absent API."""

Sink = Callable[[ClusterEvent], Awaitable[None] | None]
OnRestart = Callable[[str, RestartReason], None]


class WatchError(Exception):
    """Base of the watch's internal errors (never escapes ``run``)."""


class GoneError(WatchError):
    """410: the resourceVersion is too old; relist."""


class KindMissingError(WatchError):
    """404 on the kind's collection: its API (CRD) is not installed."""


class ApiStatusError(WatchError):
    """Any other non-2xx answer or ERROR event."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class _Stopped(Exception):
    """The watcher is stopping; unwind the kind's thread."""


class Backoff:
    """Jittered exponential back-off. Pure: the caller sleeps."""

    def __init__(self, settings: WatchSettings, rng: random.Random) -> None:
        self._settings = settings
        self._rng = rng
        self._failures = 0

    def reset(self) -> None:
        self._failures = 0

    def next_delay(self) -> float:
        s = self._settings
        delay = min(s.backoff_max, s.backoff_initial * (2.0**self._failures))
        self._failures = min(self._failures + 1, 62)
        return delay * (1.0 - s.backoff_jitter * self._rng.random())


def iter_lines(chunks: Iterator[bytes], max_line: int) -> Iterator[bytes]:
    """Split a byte stream into newline-terminated lines; a line over ``max_line`` is an error."""
    buf = bytearray()
    for chunk in chunks:
        buf += chunk
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                break
            line = bytes(buf[:nl])
            del buf[: nl + 1]
            if line.strip():
                yield line
        if len(buf) > max_line:
            raise ApiStatusError(0, f"watch event larger than {max_line} bytes")
    if buf.strip():
        yield bytes(buf)


def _status_message(body: bytes) -> str:
    try:
        status = json.loads(body)
        return str(status.get("message") or status.get("reason") or body[:200])
    except ValueError:
        return body[:200].decode(errors="replace")


def _check_status(status: int, body: bytes) -> None:
    if status == 410:
        raise GoneError(_status_message(body))
    if status == 404:
        raise KindMissingError(_status_message(body))
    if not 200 <= status <= 299:
        raise ApiStatusError(status, _status_message(body))


class ClusterWatcher:
    """Watches ``kinds`` and feeds a sink; ``synced`` is set once every kind was listed."""

    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        kinds: Sequence[str],
        sink: Sink,
        settings: WatchSettings | None = None,
        *,
        on_restart: OnRestart | None = None,
        rng: random.Random | None = None,
    ) -> None:
        unknown = [k for k in kinds if k not in KIND_SPECS]
        if unknown:
            raise ValueError(f"unknown kinds {unknown}; known: {sorted(KIND_SPECS)}")
        self._client = api_client
        self._specs = [KIND_SPECS[k] for k in kinds]
        self._sink = sink
        self._settings = settings or WatchSettings()
        self._on_restart = on_restart
        self._rng = rng or random.Random()
        self.synced = asyncio.Event()
        self._synced_kinds: set[str] = set()
        self._stop = threading.Event()
        self._slots = threading.BoundedSemaphore(self._settings.max_pending_events)
        self._responses: dict[str, urllib3.BaseHTTPResponse] = {}
        self._responses_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[ClusterEvent] | None = None
        self._watches_opened: dict[str, int] = dict.fromkeys(kinds, 0)

    def watches_opened(self, kind: str) -> int:
        """How many watch streams the kind has opened (one per resume); for tests and debugging."""
        return self._watches_opened[kind]

    # ---- asyncio side -------------------------------------------------------------

    async def run(self) -> None:
        """Watch until cancelled. Can be run once."""
        if self._loop is not None:
            raise RuntimeError("ClusterWatcher.run() can only be called once")
        self._loop = asyncio.get_running_loop()
        # Unbounded as a container, bounded by the semaphore the producers take.
        self._queue = asyncio.Queue()
        threads = [
            threading.Thread(target=self._kind_main, args=(spec,), name=f"watch-{spec.kind}", daemon=True)
            for spec in self._specs
        ]
        for t in threads:
            t.start()
        try:
            while True:
                event = await self._queue.get()
                try:
                    result = self._sink(event)
                    if inspect.isawaitable(result):
                        await result
                finally:
                    self._slots.release()
                if isinstance(event, Relist) and event.kind not in self._synced_kinds:
                    self._synced_kinds.add(event.kind)
                    if len(self._synced_kinds) == len(self._specs):
                        log.info("watch synced", extra={"kinds": [s.kind for s in self._specs]})
                        self.synced.set()
        finally:
            self._stop.set()
            self._shutdown_responses()
            await asyncio.to_thread(self._join, threads)

    def _join(self, threads: Sequence[threading.Thread]) -> None:
        for t in threads:
            t.join(self._settings.stop_timeout)
            if t.is_alive():
                log.warning("watch thread did not stop in time", extra={"thread": t.name})

    def _shutdown_responses(self) -> None:
        with self._responses_lock:
            responses = list(self._responses.values())
        for resp in responses:
            # shutdown() (urllib3 >= 2.3) closes the socket under a blocked read, so the
            # thread's read returns now instead of at the read timeout.
            with contextlib.suppress(Exception):
                resp.shutdown()

    # ---- thread side --------------------------------------------------------------

    def _emit(self, event: ClusterEvent) -> None:
        while not self._slots.acquire(timeout=0.25):
            if self._stop.is_set():
                raise _Stopped
        if self._stop.is_set():
            self._slots.release()
            raise _Stopped
        loop, queue = self._loop, self._queue
        assert loop is not None and queue is not None
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError as exc:  # the loop is closed: we are stopping
            self._slots.release()
            raise _Stopped from exc

    def _restarted(self, kind: str, reason: RestartReason) -> None:
        if self._on_restart is not None:
            try:
                self._on_restart(kind, reason)
            except Exception:
                log.exception("on_restart callback failed", extra={"kind": kind})

    def _kind_main(self, spec: KindSpec) -> None:
        try:
            self._kind_loop(spec)
        except _Stopped:
            pass
        except Exception:
            # A bug, not an API condition: the loop below handles every API outcome.
            log.exception("watch thread crashed", extra={"kind": spec.kind})

    def _kind_loop(self, spec: KindSpec) -> None:
        s = self._settings
        backoff = Backoff(s, self._rng)
        resource_version: str | None = None
        missing_logged = False
        gone_streak = False
        while not self._stop.is_set():
            try:
                if resource_version is None:
                    objects, resource_version = self._list(spec)
                    self._emit(Relist(spec.kind, objects))
                    if missing_logged:
                        log.info("kind is served again", extra={"kind": spec.kind})
                    missing_logged = False
                    log.debug("listed", extra={"kind": spec.kind, "count": len(objects)})
                resource_version = self._watch(spec, resource_version)
                backoff.reset()
                gone_streak = False
            except GoneError as exc:
                log.info("resourceVersion expired, relisting", extra={"kind": spec.kind, "detail": str(exc)})
                self._restarted(spec.kind, "gone")
                resource_version = None
                # The first relist is immediate; a server that keeps answering 410 (even to
                # a fresh list) gets the back-off instead of a tight loop.
                if gone_streak:
                    self._stop.wait(backoff.next_delay())
                gone_streak = True
                continue
            except KindMissingError:
                if not missing_logged:
                    log.warning(
                        "kind not served by the API server (CRD not installed?); retrying",
                        extra={"kind": spec.kind, "path": spec.path},
                    )
                    missing_logged = True
                    # Everything of a kind whose API vanished is gone too.
                    self._emit(Relist(spec.kind, ()))
                self._restarted(spec.kind, "missing")
                resource_version = None
                self._stop.wait(s.missing_kind_retry)
            except _Stopped:
                raise
            except Exception as exc:
                if self._stop.is_set():
                    break
                delay = backoff.next_delay()
                log.warning(
                    "watch failed, retrying",
                    extra={"kind": spec.kind, "error": repr(exc), "retry_in": round(delay, 3)},
                )
                self._restarted(spec.kind, "error")
                self._stop.wait(delay)

    def _request(
        self, spec: KindSpec, query: list[tuple[str, str]], read_timeout: float
    ) -> urllib3.BaseHTTPResponse:
        method, url, headers, body, post = self._client.param_serialize(
            "GET",
            spec.path,
            query_params=query,
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        rest = self._client.call_api(
            method, url, headers, body, post, _request_timeout=(self._settings.connect_timeout, read_timeout)
        )
        resp: urllib3.BaseHTTPResponse = rest.response
        return resp

    @contextlib.contextmanager
    def _tracked(
        self, spec: KindSpec, resp: urllib3.BaseHTTPResponse, *, drained: bool = False
    ) -> Iterator[urllib3.BaseHTTPResponse]:
        with self._responses_lock:
            self._responses[spec.kind] = resp
        complete = False
        try:
            if self._stop.is_set():
                raise _Stopped
            yield resp
            complete = drained
        finally:
            with self._responses_lock:
                self._responses.pop(spec.kind, None)
            # A watch is usually left mid-stream (and a failed read leaves anything): close
            # the socket rather than return a connection with unread data to the pool.
            if not complete:
                resp.close()
            resp.release_conn()

    def _list(self, spec: KindSpec) -> tuple[list[Mapping[str, Any]], str]:
        """All objects of the kind and the resourceVersion of the (paged) list."""
        objects: list[Mapping[str, Any]] = []
        cont = ""
        while True:
            query = [("limit", str(self._settings.list_page_size))]
            if cont:
                query.append(("continue", cont))
            resp = self._request(spec, query, self._settings.list_timeout)
            with self._tracked(spec, resp, drained=True):
                body = resp.read()
            # A 410 on a continue token means the page's snapshot expired: GoneError relists
            # from scratch, which is the right answer here too.
            _check_status(resp.status, body)
            page = json.loads(body)
            for item in page.get("items") or ():
                objects.append({"apiVersion": spec.api_version, "kind": spec.kind, **item})
            meta = page.get("metadata") or {}
            cont = meta.get("continue") or ""
            if not cont:
                return objects, str(meta.get("resourceVersion") or "")

    def _watch(self, spec: KindSpec, resource_version: str) -> str:
        """One watch stream; returns the resourceVersion to resume from when it ends."""
        s = self._settings
        query = [
            ("watch", "true"),
            ("allowWatchBookmarks", "true"),
            ("resourceVersion", resource_version),
            ("timeoutSeconds", str(int(s.server_timeout))),
        ]
        resp = self._request(spec, query, s.server_timeout + s.client_timeout_margin)
        with self._tracked(spec, resp):
            if resp.status != 200:
                _check_status(resp.status, resp.read())
            # Only written by this kind's thread; readers tolerate a stale value.
            self._watches_opened[spec.kind] += 1
            for line in iter_lines(resp.stream(64 * 1024, decode_content=True), s.max_event_bytes):
                if self._stop.is_set():
                    raise _Stopped
                event = json.loads(line)
                etype = event.get("type")
                obj = event.get("object") or {}
                if etype == "ERROR":
                    code = int(obj.get("code") or 0)
                    _check_status(code if code else 500, json.dumps(obj).encode())
                    raise ApiStatusError(code, str(obj))  # a 2xx ERROR event: still an error
                rv = (obj.get("metadata") or {}).get("resourceVersion")
                if etype in ("ADDED", "MODIFIED", "DELETED"):
                    self._emit(WatchEvent(spec.kind, etype, obj))
                elif etype != "BOOKMARK":
                    log.warning("unknown watch event type", extra={"kind": spec.kind, "type": etype})
                    continue
                if rv:
                    resource_version = str(rv)
        return resource_version
