"""``meshproxy run``: the sidecar process, from flags to listeners and back to exit.

Owns: the ``run`` subcommand's flags, structured logging set-up, wiring of
every long-lived object (runtime, pipeline, upstream clients, listeners,
telemetry, admin server, control-plane client), readiness, and the shutdown order.

Lifecycle:
  1. Parse flags; with ``--config`` load and validate the YAML *before anything starts*:
     a bad file prints the error naming the field and exits with code 2.
  2. Start the admin server (``/ready`` answers 503 until a config is applied), then the
     outbound and inbound listeners. A cached snapshot (``--config-cache``) is applied
     first, so a restarted sidecar serves before the control plane answers.
  3. Apply the static config, or stream snapshots from ``--control-plane`` (each applied
     atomically; a snapshot that fails validation is NACKed and the old one stays).
  4. SIGTERM/SIGINT (or POST /quitquitquit): stop accepting, drain in-flight requests
     for up to ``--drain-seconds``, abort the rest, close pools, flush telemetry, exit 0.

Invariants: no global state besides loggers; every task created here is named and
kept until shutdown; shutdown always runs, whatever failed during start-up.

Concurrency: one asyncio event loop (uvloop when installed) for everything.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib
import json
import logging
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from meshproxy import __version__, compiled
from meshproxy.config.model import Snapshot, Workload
from meshproxy.core.clock import MonotonicClock
from meshproxy.core.errors import ConfigError
from meshproxy.io.admin import AdminServer
from meshproxy.io.app_probes import AppProbes
from meshproxy.io.exchange import UpstreamClient
from meshproxy.io.http1_client import Http1Client, PoolSettings
from meshproxy.io.http2_client import Http2Client, Http2ClientSettings
from meshproxy.io.proxy import Proxy
from meshproxy.io.runtime import Active, Runtime
from meshproxy.io.server import Listener, ListenerSettings
from meshproxy.telemetry.hop import Telemetry

log = logging.getLogger("meshproxy.app")

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_START = 1


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", type=Path, help="static config file (YAML, see docs/datapath.md)")
    src.add_argument("--control-plane", type=_hostport, metavar="HOST:PORT", help="discovery server (15010)")
    parser.add_argument("--pod-name", default=_env("POD_NAME"), help="this pod (default: $POD_NAME)")
    parser.add_argument("--pod-namespace", default=_env("POD_NAMESPACE", "default"), help="($POD_NAMESPACE)")
    parser.add_argument(
        "--service-account", default=_env("SERVICE_ACCOUNT", "default"), help="($SERVICE_ACCOUNT)"
    )
    parser.add_argument("--pod-ip", default=_env("POD_IP"), help="this pod's IP ($POD_IP)")
    parser.add_argument("--admin-port", type=int, default=int(_env("MESHPROXY_ADMIN_PORT", "15000")))
    parser.add_argument("--admin-host", default="127.0.0.1", help="0.0.0.0 to let Prometheus scrape")
    parser.add_argument("--outbound-port", type=int, default=int(_env("MESHPROXY_OUTBOUND_PORT", "15001")))
    parser.add_argument("--inbound-port", type=int, default=int(_env("MESHPROXY_INBOUND_PORT", "15006")))
    parser.add_argument("--listen-host", default="::", help="listeners' address (:: is dual-stack)")
    parser.add_argument("--drain-seconds", type=float, default=5.0, help="graceful drain on SIGTERM")
    parser.add_argument(
        "--config-cache",
        type=Path,
        default=Path(_env("MESHPROXY_CONFIG_CACHE")) if _env("MESHPROXY_CONFIG_CACHE") else None,
        help="keep the last good config here, served at restart until the control plane answers",
    )
    parser.add_argument("--log-format", choices=("json", "text"), default="json")
    parser.add_argument("--log-level", default=_env("MESHPROXY_LOG_LEVEL", "info"))
    parser.add_argument(
        "--destination-override",
        type=_hostport,
        default=None,
        metavar="HOST:PORT",
        help="original destination for connections without an iptables redirect (tests, demos)",
    )
    parser.add_argument("--no-uvloop", action="store_true", help="use the stdlib event loop")


# ---- structured logs ----------------------------------------------------------------------------

_STD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then every bound/extra field."""

    def __init__(self, bound: dict[str, str]) -> None:
        super().__init__()
        self.bound = bound

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **self.bound,
        }
        for k, v in record.__dict__.items():
            if k not in _STD_ATTRS and not k.startswith("_"):
                out[k] = v if isinstance(v, str | int | float | bool | None) else str(v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"))


class KeyValueFormatter(logging.Formatter):
    def __init__(self, bound: dict[str, str]) -> None:
        super().__init__()
        self.bound = bound

    def format(self, record: logging.LogRecord) -> str:
        extra = {k: v for k, v in record.__dict__.items() if k not in _STD_ATTRS and not k.startswith("_")}
        fields = " ".join(f"{k}={v}" for k, v in {**self.bound, **extra}.items())
        text = f"{record.levelname.lower():7} {record.name}: {record.getMessage()} {fields}".rstrip()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup_logging(fmt: str, level: str, bound: dict[str, str]) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(bound) if fmt == "json" else KeyValueFormatter(bound))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


# ---- the sidecar --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Identity:
    pod: str
    namespace: str
    service_account: str
    pod_ip: str


class Sidecar:
    """Every long-lived object of one proxy process, and the start/stop order."""

    def __init__(self, args: argparse.Namespace, static: Snapshot | None) -> None:
        self.args = args
        self.static = static
        self.identity = Identity(args.pod_name, args.pod_namespace, args.service_account, args.pod_ip)
        self.stop = asyncio.Event()
        self.clock = MonotonicClock()
        initial = static or Snapshot()
        self.telemetry = Telemetry.build(initial.telemetry, self._workload(initial))
        self.runtime = Runtime(
            clock=self.clock, rng=random.Random(), cache_path=args.config_cache, on_applied=self._applied
        )
        self.http1 = Http1Client()
        self.http2 = Http2Client()
        # To the app: separate pools, bound to the inbound passthrough source when needed.
        self.http1_inbound = Http1Client(PoolSettings(inbound=True))
        self.http2_inbound = Http2Client(Http2ClientSettings(inbound=True))
        clients: dict[str, UpstreamClient] = {"1.1": self.http1, "2": self.http2}
        inbound: dict[str, UpstreamClient] = {"1.1": self.http1_inbound, "2": self.http2_inbound}
        self.proxy = Proxy(self.runtime, clients, inbound_clients=inbound, telemetry=self.telemetry)
        self.listeners = [
            Listener(
                ListenerSettings(
                    direction=direction,
                    port=port,
                    host=args.listen_host,
                    destination_override=args.destination_override,
                ),
                self.proxy,
            )
            for direction, port in (("outbound", args.outbound_port), ("inbound", args.inbound_port))
        ]
        # kubelet's app probes, rewritten by the injector to /app-health/... on the admin port.
        self.app_probes = AppProbes.from_env(os.environ)
        self.admin = AdminServer(
            args.admin_host,
            args.admin_port,
            metrics_registry=self.telemetry.metrics.registry,
            ready=lambda: self.runtime.ready and self.serving,
            config_dump=self._config_dump,
            clusters=self._clusters,
            breakers=self._breakers,
            on_quit=self.stop.set,
            app_health=self.app_probes.check,
        )
        self.serving = False
        self.tasks: list[asyncio.Task[None]] = []
        self._destinations: set[str] = set()

    def _workload(self, snap: Snapshot) -> Workload:
        """The snapshot's workload, with this pod's name when the control plane left it out.

        The control plane compiles one snapshot per workload (all replicas share it, so its
        version is the same for each), so the pod name, which spans report as
        ``k8s.pod.name``, comes from the sidecar's own identity.
        """
        if snap.workload.pod or not self.identity.pod:
            return snap.workload
        return replace(snap.workload, pod=self.identity.pod)

    def _applied(self, active: Active) -> None:
        snap = active.snapshot
        self.telemetry.reconfigure(snap.telemetry, self._workload(snap))
        self.telemetry.metrics.set_config_version(snap.version)
        keys = {str(s.key) for s in snap.services}
        for gone in self._destinations - keys:
            self.telemetry.metrics.forget_destination(gone)
        self._destinations = keys
        log.info("config applied", extra={"version": snap.version, "services": len(snap.services)})

    def apply(self, snapshot: Snapshot) -> None:
        """The control-plane callback: raises ConfigError (-> NACK) or swaps atomically (-> ACK)."""
        try:
            self.runtime.apply(snapshot)
        except ConfigError as exc:
            self.telemetry.metrics.config_nack()
            log.warning("config rejected", extra={"version": snapshot.version, "error": str(exc)})
            raise

    def _config_dump(self) -> dict[str, Any]:
        from meshproxy.config.load import dump

        active = self.runtime.active
        return {"version": "", "ready": False} if active is None else dump(active.snapshot)

    def _clusters(self) -> list[dict[str, Any]]:
        return [
            {"service": str(key), "lb": pool.lb.value, "endpoints": [asdict(s) for s in pool.stats()]}
            for key, pool in sorted(self.runtime.pools.items())
        ]

    def _breakers(self) -> list[dict[str, Any]]:
        return [
            {"service": str(key), "state": b.state.value, "rejections": dict(b.rejections)}
            for key, b in sorted(self.runtime.breakers.items())
        ]

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop.set)
        try:
            # Which build runs: a sidecar on the interpreted data path costs more CPU per request.
            log.info("starting", extra={"version": __version__, "data_path": compiled.status()})
            await self.admin.start()
            cached = self.runtime.load_cache()
            if cached is not None and self.static is None:
                self.runtime.apply(cached)
                log.info(
                    "serving the cached config until the control plane answers",
                    extra={"version": cached.version},
                )
            for lst in self.listeners:
                await lst.start()
            self.serving = True
            if self.static is not None:
                self.runtime.apply(self.static)
            else:
                self.tasks.append(loop.create_task(self._control_plane(), name="xds-client"))
            # Everything built so far (modules, config, telemetry pipeline) lives as long as the
            # process: move it out of the collector's generations, so the full collections that
            # per-request garbage triggers do not walk it again and again.
            gc.collect()
            gc.freeze()
            await self.stop.wait()
            log.info("shutting down", extra={"drain_seconds": self.args.drain_seconds})
        finally:
            await self.shutdown()
        return EXIT_OK

    async def _control_plane(self) -> None:
        from meshproxy.xds.client import ConnectionState, XdsClient
        from meshproxy.xds.convert import ProxyNode

        host, port = self.args.control_plane
        ident = self.identity
        node = ProxyNode(
            pod=ident.pod,
            namespace=ident.namespace,
            service_account=ident.service_account,
            pod_ip=ident.pod_ip,
            proxy_version=_version(),
        )
        metrics = self.telemetry.metrics

        def on_state(state: ConnectionState) -> None:
            metrics.set_control_plane_connected(state is ConnectionState.CONNECTED)
            log.info("control plane " + state.value, extra={"control_plane": f"{host}:{port}"})

        active = self.runtime.active
        client = XdsClient(
            f"{host}:{port}",
            node,
            self.apply,
            on_state,
            initial=active.snapshot if active is not None else None,
        )
        await client.run()

    async def shutdown(self) -> None:
        self.serving = False
        deadline = float(self.args.drain_seconds)
        await asyncio.gather(*(lst.drain(deadline) for lst in self.listeners), return_exceptions=True)
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for client in (self.http1, self.http2, self.http1_inbound, self.http2_inbound):
            await client.close()
        await self.telemetry.shutdown(grace=2.0)
        await self.admin.close()


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("meshproxy")
    except Exception:
        return "dev"


def main(args: argparse.Namespace) -> int:
    bound = {"pod": args.pod_name, "namespace": args.pod_namespace} if args.pod_name else {}
    setup_logging(args.log_format, args.log_level, bound)
    static: Snapshot | None = None
    if args.config is not None:
        from meshproxy.config.load import load_file

        try:
            static = load_file(args.config)
            from meshproxy.io.runtime import validate

            validate(static)
        except ConfigError as exc:
            print(f"meshproxy: invalid config {args.config}: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        except OSError as exc:
            print(f"meshproxy: cannot read config {args.config}: {exc}", file=sys.stderr)
            return EXIT_CONFIG

    async def run() -> int:
        try:
            return await Sidecar(args, static).run()
        except OSError as exc:
            # Typically a port already in use: say which, without a traceback.
            log.error("cannot start the sidecar", extra={"error": str(exc)})
            return EXIT_START

    if not args.no_uvloop:
        try:
            uvloop = importlib.import_module("uvloop")
        except ImportError:
            uvloop = None
        if uvloop is not None:
            rc: int = uvloop.run(run())
            return rc
    return asyncio.run(run())
