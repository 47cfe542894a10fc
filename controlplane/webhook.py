"""The sidecar injection webhook: an HTTPS AdmissionReview server on port 15017.

Owns: the TLS listener (``POST /inject``; ``GET /healthz``), hot reload of the
serving certificate and of the injection template from mounted files, the
namespace lookup call, and the one place where errors become admission answers
(``WebhookServer.answer``). The decision and the patch are ``controlplane.inject``.

Invariants:
  * Never blocks pod creation: every well-formed HTTP request gets HTTP 200 with
    ``allowed: true``. Any failure -- a malformed review, a missing or invalid
    template, a namespace lookup that fails or is slow, a bug -- means "no patch"
    plus an admission warning (shown by kubectl), and is logged and counted. The
    MutatingWebhookConfiguration adds ``failurePolicy: Ignore`` for when this
    process is down.
  * Certificates and the template are re-read when their files change (a Secret
    or ConfigMap volume update swaps a symlink), so rotation needs no restart. A
    half-written or invalid new file is ignored until it becomes valid; the old
    certificate / template keeps serving.
  * Bounded: request bodies over ``max_body_bytes`` get 413, connections over
    ``max_connections`` are closed at accept, idle connections are closed after
    ``idle_timeout``, the namespace lookup is cut off after ``lookup_timeout``.

Concurrency: one asyncio event loop. One task per request (kept in a set until
done); a connection handles one request at a time (reading is paused while its
answer is computed). One named reload task polls the files.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools

from controlplane import inject

log = logging.getLogger(__name__)

NamespaceLookup = Callable[[str], Awaitable[Mapping[str, Any] | None]]
"""Returns the Namespace object (a dict as the API returns it) or None if there is none."""


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    listen_address: str = "0.0.0.0"  # in a pod: the Service forwards 443 -> 15017
    port: int = 15017  # the mesh convention (Istio's too); 0 picks a free port (tests)
    # Mounted from the chart's webhook TLS Secret (tls.crt, tls.key).
    cert_file: str = "/etc/meshproxy/webhook-tls/tls.crt"
    key_file: str = "/etc/meshproxy/webhook-tls/tls.key"
    # Mounted from the chart's injection template ConfigMap (JSON, see InjectionTemplate).
    template_file: str = "/etc/meshproxy/injection/template.json"
    # Secret/ConfigMap volume updates take up to a minute to reach the pod anyway; a few
    # seconds of polling adds nothing noticeable and costs two small reads.
    reload_interval: float = 5.0
    # The API server caps a request at ~3 MiB; a Pod is far smaller. 4 MiB never refuses a
    # real review and bounds what one connection can make us buffer.
    max_body_bytes: int = 4 * 1024 * 1024
    # The API server waits timeoutSeconds (chart: 5 s) for us; answer well before that.
    lookup_timeout: float = 2.0
    idle_timeout: float = 60.0
    max_connections: int = 256
    cluster: inject.ClusterInfo = field(default_factory=inject.ClusterInfo)


class WebhookMetrics:
    """Counters registered on a registry built at start-up (never at import time)."""

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter

        self.reviews = Counter(
            "meshproxy_webhook_reviews",
            "AdmissionReviews answered, by result (injected, skipped, error).",
            ["result"],
            registry=registry,
        )

    def count(self, result: str) -> None:
        self.reviews.labels(result=result).inc()


class _NullMetrics(WebhookMetrics):
    def __init__(self) -> None:
        pass

    def count(self, result: str) -> None:
        pass


class _Watched:
    """A file (or pair of files) whose content is re-read when it changes."""

    def __init__(self, *paths: str) -> None:
        self.paths = tuple(Path(p) for p in paths)
        self.digest: str | None = None

    def changed(self) -> bytes | None:
        """The concatenated new content if it differs from the last accepted one, else None."""
        try:
            blobs = [p.read_bytes() for p in self.paths]
        except OSError as e:
            log.warning("webhook: cannot read %s: %s", ", ".join(map(str, self.paths)), e)
            return None
        digest = hashlib.sha256(b"\0".join(blobs)).hexdigest()
        return None if digest == self.digest else b"\0".join(blobs)

    def accept(self, content: bytes) -> None:
        self.digest = hashlib.sha256(content).hexdigest()


class WebhookServer:
    """``WebhookServer(settings, namespace_lookup).start()`` / ``.stop()``."""

    def __init__(
        self,
        settings: WebhookSettings,
        namespace_lookup: NamespaceLookup,
        *,
        metrics: WebhookMetrics | None = None,
    ) -> None:
        self.settings = settings
        self._lookup = namespace_lookup
        self._metrics = metrics or _NullMetrics()
        self._ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ssl.minimum_version = ssl.TLSVersion.TLSv1_2
        # HTTP/1.1 only: the API server's webhook client is happy with it, and it keeps us to
        # one request at a time per connection.
        self._ssl.set_alpn_protocols(["http/1.1"])
        self._certs = _Watched(settings.cert_file, settings.key_file)
        self._template_file = _Watched(settings.template_file)
        self.template: inject.InjectionTemplate | None = None
        self.template_error: str | None = "injection template not loaded yet"
        self._server: asyncio.Server | None = None
        self._reload_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._connections: set[_Connection] = set()

    @property
    def port(self) -> int:
        """The bound port (useful with ``port=0``)."""
        assert self._server is not None, "not started"
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        """Load certificate and template, start listening. Raises if the certificate is unusable."""
        if not self.reload_certificate():
            raise ssl.SSLError(f"webhook: no usable certificate in {self.settings.cert_file}")
        self.reload_template()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self),
            self.settings.listen_address,
            self.settings.port,
            ssl=self._ssl,
            ssl_handshake_timeout=10.0,
        )
        self._reload_task = asyncio.create_task(self._reload_loop(), name="webhook-reload")
        log.info("webhook: serving on %s:%d", self.settings.listen_address, self.port)

    async def stop(self) -> None:
        """Stop accepting, close connections, cancel in-flight work and the reload task."""
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.close()
        tasks = [*self._tasks, *([self._reload_task] if self._reload_task else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # ---- reload -------------------------------------------------------------------------------------

    def reload_certificate(self) -> bool:
        """Load the certificate if it changed; True if a valid one is loaded."""
        content = self._certs.changed()
        if content is None:
            return self._certs.digest is not None
        try:
            # Loading into the live context affects only new handshakes: open connections
            # keep the session they negotiated.
            self._ssl.load_cert_chain(self.settings.cert_file, self.settings.key_file)
        except (OSError, ssl.SSLError) as e:
            # Typically the Secret volume swapped one file but not yet the other.
            log.warning("webhook: new certificate not usable yet (%s); keeping the old one", e)
            return self._certs.digest is not None
        self._certs.accept(content)
        log.info("webhook: certificate loaded from %s", self.settings.cert_file)
        return True

    def reload_template(self) -> None:
        content = self._template_file.changed()
        if content is None:
            return
        try:
            template = inject.InjectionTemplate.from_json(json.loads(content))
        except (ValueError, inject.TemplateError) as e:
            self.template_error = f"invalid injection template {self.settings.template_file}: {e}"
            log.error("webhook: %s; keeping the previous one", self.template_error)
            return
        self._template_file.accept(content)
        self.template, self.template_error = template, None
        log.info("webhook: injection template loaded (image %s)", template.image)

    async def _reload_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_interval)
            try:
                self.reload_certificate()
                self.reload_template()
            except Exception:  # a reload bug must not end reloading for good
                log.exception("webhook: reload failed")

    # ---- the one place errors become admission answers -------------------------------------------

    async def answer(self, body: bytes) -> dict[str, Any]:
        """AdmissionReview in (raw JSON), AdmissionReview out; always ``allowed: true``."""
        uid = ""
        try:
            review = json.loads(body)
            uid = inject.review_uid(review)
            req = inject.parse_review(review)
            template = self.template
            if template is None:
                if req.kind != "Pod" or req.operation != "CREATE":
                    self._metrics.count("skipped")
                    return inject.admission_response(uid, None)
                raise inject.TemplateError("", self.template_error or "no injection template")
            namespace = await self._namespace(req)
            outcome = inject.review(review, namespace, template, self.settings.cluster)
        except (ValueError, inject.InjectionError) as e:
            # ValueError: not JSON. Not our pod's fault, but the user should know it was skipped.
            log.warning("webhook: request %s not injected: %s", uid or "?", e)
            self._metrics.count("error")
            return inject.admission_response(uid, None, [f"meshproxy: sidecar not injected: {e}"])
        except Exception as e:
            log.exception("webhook: request %s: internal error", uid or "?")
            self._metrics.count("error")
            warning = f"meshproxy: sidecar not injected: internal error ({type(e).__name__})"
            return inject.admission_response(uid, None, [warning])
        self._metrics.count("injected" if outcome.patch is not None else "skipped")
        log.info(
            "webhook: %s %s/%s: %s",
            "injected" if outcome.patch is not None else "skipped",
            req.namespace,
            inject.pod_display_name(req.pod),
            outcome.reason,
        )
        return inject.admission_response(outcome.uid, outcome.patch, outcome.warnings)

    async def _namespace(self, req: inject.AdmissionRequest) -> Mapping[str, Any] | None:
        if req.kind != "Pod" or not req.namespace:
            return None
        try:
            return await asyncio.wait_for(self._lookup(req.namespace), self.settings.lookup_timeout)
        except TimeoutError:
            raise inject.InjectionError(f"namespace {req.namespace} lookup timed out") from None
        except Exception as e:
            raise inject.InjectionError(f"namespace {req.namespace} lookup failed: {e}") from e

    # ---- connection bookkeeping ---------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: httptools parses, one request at a time."""

    def __init__(self, server: WebhookServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body = bytearray()
        self.too_large = False
        self.idle: asyncio.TimerHandle | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if len(self.server._connections) >= self.server.settings.max_connections:
            log.warning("webhook: too many connections, closing a new one")
            transport.close()
            return
        self.server._connections.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._connections.discard(self)
        if self.idle is not None:
            self.idle.cancel()

    def data_received(self, data: bytes) -> None:
        self._arm_idle()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._respond(400, b'{"error":"upgrade not supported"}', close=True)
        except httptools.HttpParserError:
            self._respond(400, b'{"error":"malformed HTTP request"}', close=True)

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.url = b""
        self.body = bytearray()
        self.too_large = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        if len(self.body) + len(body) > self.server.settings.max_body_bytes:
            self.too_large = True
            return
        self.body += body

    def on_message_complete(self) -> None:
        assert self.transport is not None
        method = self.parser.get_method()
        path = self.url.split(b"?", 1)[0]
        keep_alive = self.parser.should_keep_alive()
        if self.too_large:
            self._respond(413, b'{"error":"request body too large"}', close=True)
        elif method == b"GET" and path == b"/healthz":
            self._respond(200, b'{"status":"ok"}', close=not keep_alive)
        elif path != b"/inject":
            self._respond(404, b'{"error":"not found"}', close=not keep_alive)
        elif method != b"POST":
            self._respond(405, b'{"error":"method not allowed"}', close=not keep_alive)
        else:
            # One request at a time: no more parsing until this one is answered.
            self.transport.pause_reading()
            body = bytes(self.body)
            self.server._spawn(self._handle(body, keep_alive), "webhook-request")

    async def _handle(self, body: bytes, keep_alive: bool) -> None:
        reply = await self.server.answer(body)
        self._respond(200, json.dumps(reply, separators=(",", ":")).encode(), close=not keep_alive)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    # helpers

    def _respond(self, status: int, body: bytes, *, close: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        reason = {
            200: "OK",
            400: "Bad Request",
            404: "Not Found",
            405: "Method Not Allowed",
            413: "Payload Too Large",
        }
        head = (
            f"HTTP/1.1 {status} {reason.get(status, '')}\r\n"
            "content-type: application/json\r\n"
            f"content-length: {len(body)}\r\n" + ("connection: close\r\n" if close else "") + "\r\n"
        )
        self.transport.write(head.encode() + body)
        if close:
            self.transport.close()

    def _arm_idle(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
        loop = asyncio.get_running_loop()
        self.idle = loop.call_later(self.server.settings.idle_timeout, self.close)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def api_namespace_lookup(core_v1: Any) -> NamespaceLookup:
    """A lookup backed by ``kubernetes.client.CoreV1Api`` (run in a thread).

    The control plane may pass its informer-backed index instead; this is the simple form
    for when it has none (and for tests). It lists with a field selector rather than
    reading the namespace so that it needs only the ``list`` verb the chart's ClusterRole
    grants, not ``get``.
    """

    async def lookup(name: str) -> Mapping[str, Any] | None:
        def read() -> Mapping[str, Any] | None:
            found = core_v1.list_namespace(field_selector=f"metadata.name={name}", limit=1)
            if not found.items:
                return None
            result: Mapping[str, Any] = core_v1.api_client.sanitize_for_serialization(found.items[0])
            return result

        return await asyncio.to_thread(read)

    return lookup


async def fetch_cluster_info(version_api: Any) -> inject.ClusterInfo:
    """The API server's version via ``kubernetes.client.VersionApi`` (unknown on failure)."""
    try:
        info = await asyncio.to_thread(version_api.get_code)
    except Exception as e:
        log.warning("webhook: cannot read the API server version (%s); injecting regular sidecars", e)
        return inject.ClusterInfo(None)
    return inject.ClusterInfo.from_version_info(str(info.major), str(info.minor))


# ---- standalone entry point -------------------------------------------------------------------------
# ``python -m controlplane.webhook``: the webhook alone, for development (a control plane
# outside the cluster, see the chart's webhook.url) and for the chart's integration test.
# In a deployment the control plane's app wiring starts WebhookServer itself.


def main(argv: list[str] | None = None) -> int:
    import argparse
    import signal

    parser = argparse.ArgumentParser(
        prog="python -m controlplane.webhook", description=__doc__.splitlines()[0]
    )
    d = WebhookSettings()
    parser.add_argument("--listen-address", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=d.port)
    parser.add_argument("--cert-file", default=d.cert_file)
    parser.add_argument("--key-file", default=d.key_file)
    parser.add_argument("--template-file", default=d.template_file)
    parser.add_argument("--reload-interval", type=float, default=d.reload_interval)
    parser.add_argument("--kubeconfig", default=None, help="default: in-cluster config")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")

    async def run() -> None:
        import kubernetes

        if args.kubeconfig:
            api = kubernetes.config.new_client_from_config(config_file=args.kubeconfig)  # type: ignore[no-untyped-call]
        else:
            kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
            api = kubernetes.client.ApiClient()
        cluster = await fetch_cluster_info(kubernetes.client.VersionApi(api))
        settings = WebhookSettings(
            listen_address=args.listen_address,
            port=args.port,
            cert_file=args.cert_file,
            key_file=args.key_file,
            template_file=args.template_file,
            reload_interval=args.reload_interval,
            cluster=cluster,
        )
        server = WebhookServer(settings, api_namespace_lookup(kubernetes.client.CoreV1Api(api)))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await server.start()
        try:
            await stop.wait()
        finally:
            await server.stop()
            api.close()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
