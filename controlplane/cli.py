"""The ``controlplane`` command line.

    controlplane run [--kubeconfig FILE]      watch the cluster (in-cluster config by default)
    controlplane run --from-dir DIR           YAML manifests in DIR are the cluster (no API server)

Owns: turning flags into ``ControlPlaneSettings`` (the only place that reads
them), choosing the event source, building the API-server-backed parts
(``controlplane.watch.ClusterWatcher``, ``controlplane.status.StatusWriter``,
``controlplane.webhook.WebhookServer``) and running ``controlplane.app.serve``
until SIGTERM/SIGINT. Once listening it prints one line to stdout:
``listening grpc=HOST:PORT metrics=HOST:PORT`` (useful with ``--grpc-port 0``).

Concurrency: one asyncio loop (``asyncio.run``); signals cancel the main task.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import pathlib
import signal
import sys
from collections.abc import Sequence
from typing import Any

from controlplane.app import ControlPlane, Service, SourceFactory, StatusSink, build, directory_source, serve
from controlplane.compile import PolicyStatus, Reason
from controlplane.events import KINDS
from controlplane.metrics import ControlPlaneMetrics
from controlplane.settings import ControlPlaneSettings, MeshSettings
from meshproxy.config.model import AccessLogMode, Propagation

log = logging.getLogger("controlplane")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="controlplane", description="The mesh's control plane.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the control plane")
    d, m = ControlPlaneSettings(), MeshSettings()
    src = run.add_mutually_exclusive_group()
    src.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster service account)")
    src.add_argument("--from-dir", type=pathlib.Path, help="serve the manifests in DIR instead of a cluster")
    run.add_argument("--poll-interval", type=float, default=1.0, help="--from-dir: seconds between re-reads")
    run.add_argument("--listen-address", default=d.listen_address)
    run.add_argument("--grpc-port", type=int, default=d.grpc_port, help="discovery (0: any free port)")
    run.add_argument("--metrics-port", type=int, default=d.metrics_port, help="/metrics, /healthz, /ready")
    run.add_argument(
        "--webhook",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="serve the injection webhook (default: on with a cluster if its certificate exists, "
        "off with --from-dir)",
    )
    run.add_argument("--webhook-port", type=int, default=d.webhook_port)
    run.add_argument("--webhook-cert-file", default=None)
    run.add_argument("--webhook-key-file", default=None)
    run.add_argument("--webhook-template-file", default=None)
    run.add_argument("--no-status", action="store_true", help="do not write policy status to the cluster")
    run.add_argument("--cluster-domain", default=m.cluster_domain)
    run.add_argument("--sampling-ratio", type=float, default=m.sampling_ratio)
    run.add_argument(
        "--propagation",
        default=",".join(p.value for p in m.propagation),
        help="comma-separated: w3c, b3, b3multi",
    )
    run.add_argument("--otlp-grpc-endpoint", default=None)
    run.add_argument("--otlp-http-endpoint", default=None)
    run.add_argument("--zipkin-endpoint", default=None)
    run.add_argument("--access-log", choices=[a.value for a in AccessLogMode], default=m.access_log.value)
    run.add_argument("--debounce-quiet", type=float, default=d.debounce_quiet)
    run.add_argument("--debounce-max-delay", type=float, default=d.debounce_max_delay)
    run.add_argument(
        "--debounce-leading",
        action=argparse.BooleanOptionalAction,
        default=d.debounce_leading,
        help="compile the first change after a quiet period at once",
    )
    run.add_argument("--log-level", default="info")
    return parser


def settings_from(args: argparse.Namespace) -> ControlPlaneSettings:
    mesh = MeshSettings(
        cluster_domain=args.cluster_domain,
        sampling_ratio=float(args.sampling_ratio),
        propagation=tuple(Propagation(p.strip()) for p in args.propagation.split(",") if p.strip()),
        otlp_grpc_endpoint=args.otlp_grpc_endpoint,
        otlp_http_endpoint=args.otlp_http_endpoint,
        zipkin_endpoint=args.zipkin_endpoint,
        access_log=AccessLogMode(args.access_log),
    )
    return ControlPlaneSettings(
        mesh=mesh,
        listen_address=args.listen_address,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        webhook_port=args.webhook_port,
        debounce_quiet=args.debounce_quiet,
        debounce_max_delay=args.debounce_max_delay,
        debounce_leading=args.debounce_leading,
    )


class _KubeStatusSink:
    """PolicyStatus -> the status subresource, through ``controlplane.status.StatusWriter``."""

    def __init__(self, api: Any, plane_ref: list[ControlPlane]) -> None:
        from controlplane import status

        self._status = status
        self._writer = status.StatusWriter(api)
        self._plane = plane_ref

    async def write(self, s: PolicyStatus) -> None:
        st = self._status
        accepted = st.Condition("Accepted", "True" if s.accepted else "False", s.reason.value, s.message)
        if s.kind == "TrafficPolicy":
            await self._writer.set_policy_conditions(s.namespace, s.name, [accepted], s.generation)
            return
        route = self._plane[0].reconciler.state.http_routes.get((s.namespace, s.name))
        if route is None:
            return
        missing = s.reason is Reason.BACKEND_NOT_FOUND
        resolved = st.Condition(
            "ResolvedRefs",
            "False" if missing else "True",
            "BackendNotFound" if missing else "ResolvedRefs",
            s.message if missing else "",
        )
        parents = [
            st.ParentStatus(
                parent_ref={"group": p.group, "kind": p.kind, "namespace": p.namespace, "name": p.name}
                | ({"port": p.port} if p.port is not None else {}),
                conditions=(accepted, resolved),
            )
            for p in route.service_parents
        ]
        await self._writer.set_route_parents(s.namespace, s.name, parents, s.generation)


async def _run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    services: dict[str, Service] = {}
    api: Any = None
    plane_ref: list[ControlPlane] = []
    source: SourceFactory
    status_sink: StatusSink | None = None
    if args.from_dir is not None:
        if not args.from_dir.is_dir():
            print(f"controlplane: --from-dir {args.from_dir}: not a directory", file=sys.stderr)
            return 2
        source = directory_source(args.from_dir, args.poll_interval)
    else:
        import kubernetes

        from controlplane.watch import ClusterWatcher

        if args.kubeconfig:
            api = kubernetes.config.new_client_from_config(config_file=args.kubeconfig)  # type: ignore[no-untyped-call]
        else:
            kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
            api = kubernetes.client.ApiClient()

        def source(sink: Any, metrics: ControlPlaneMetrics) -> ClusterWatcher:
            return ClusterWatcher(api, KINDS, sink, on_restart=metrics.watch_restarted)

        if not args.no_status:
            status_sink = _KubeStatusSink(api, plane_ref)
    if _want_webhook(args):
        services["webhook"] = await _webhook_service(args, api)

    plane = build(settings, status_sink)
    plane_ref.append(plane)

    def started(p: ControlPlane) -> None:
        host = settings.listen_address
        print(f"listening grpc={host}:{p.grpc_port} metrics={host}:{p.metrics_port}", flush=True)

    main = asyncio.current_task()
    assert main is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, main.cancel)
    try:
        await serve(plane, source, services, started=started)
    except asyncio.CancelledError:
        log.info("stopping")
    except ExceptionGroup as failed:
        # One part of the pipeline died (a webhook without a usable certificate, a port in
        # use): exit non-zero with the reason, and let the orchestrator restart us.
        for exc in failed.exceptions:
            log.error("control plane stopped: %s", exc, exc_info=exc)
        return 1
    except OSError as exc:  # a listener could not bind
        log.error("control plane cannot start: %s", exc)
        return 1
    finally:
        if api is not None:
            api.close()
    return 0


def _want_webhook(args: argparse.Namespace) -> bool:
    """--webhook/--no-webhook if given; else on with a cluster when its certificate exists.

    In a pod the chart mounts the certificate; a developer running against a cluster from a
    laptop has none and should not need a flag to get a working control plane.
    """
    if args.webhook is not None:
        return bool(args.webhook)
    if args.from_dir is not None:
        return False
    from controlplane.webhook import WebhookSettings

    cert = pathlib.Path(args.webhook_cert_file or WebhookSettings().cert_file)
    if not cert.exists():
        log.warning("injection webhook off: no certificate at %s (--webhook requires it)", cert)
        return False
    return True


async def _webhook_service(args: argparse.Namespace, api: Any) -> Service:
    from controlplane import webhook

    d = webhook.WebhookSettings()
    cluster = d.cluster
    lookup: webhook.NamespaceLookup
    if api is not None:
        import kubernetes

        cluster = await webhook.fetch_cluster_info(kubernetes.client.VersionApi(api))
        lookup = webhook.api_namespace_lookup(kubernetes.client.CoreV1Api(api))
    else:

        async def lookup(name: str) -> None:
            return None

    ws = webhook.WebhookSettings(
        listen_address=args.listen_address,
        port=args.webhook_port,
        cert_file=args.webhook_cert_file or d.cert_file,
        key_file=args.webhook_key_file or d.key_file,
        template_file=args.webhook_template_file or d.template_file,
        cluster=cluster,
    )

    async def run_webhook() -> None:
        server = webhook.WebhookServer(ws, lookup)
        await server.start()
        try:
            await asyncio.Event().wait()  # serve until cancelled
        finally:
            await server.stop()

    return run_webhook


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    return asyncio.run(_run(args))


if __name__ == "__main__":
    sys.exit(main())
