"""Protobuf -> model for the sidecar's discovery client (the proxy's side of the wire).

Owns: turning a received ``Snapshot`` message into a validated
``meshproxy.config.model.Snapshot``, and building the ``DiscoveryRequest``
messages the proxy sends (first request with its ``Node``, ACK, NACK). With
``controlplane.convert`` it is the only code that imports ``discovery_pb2``.

How: the message is turned straight into the frozen model (durations in float
seconds, exactly as the control plane had them, so the content hash matches)
and then checked by the static config loader's validation, so a snapshot from
the control plane passes exactly the checks a hand-written ``--config`` file
does, and every problem is a ``ConfigError`` naming the field path
(``services[3].routes[0].backends[0].service``). Built directly rather than
through the loader's generic reader: a 10,000-endpoint snapshot must not stall
the proxy for seconds.

Mapping conventions (the reverse of ``controlplane.convert``): an unset optional
message (``timeout``, ``retry``, ``outlier_detection``, ``rate_limit``,
``fault``, ``path``) is ``None``; "" strings and 0 ports that mean "unset" are
``None``; an unset required message keeps the model's default, and so does an
unset ``optional`` scalar (``min_health_percent``, where 0 is a real value).

Versions: a response names its ``VersionScheme``; the proxy recomputes the
version of what it built in that scheme (``meshproxy.xds.version``) and refuses
a mismatch. The first request lists ``ProxyNode.features`` (by default
"digest-versions", the cheaper scheme for the control plane); a control plane
that does not know it sends content versions, which are checked as before.

Invariants: pure functions, no I/O; ``snapshot_from_proto(controlplane.convert.
snapshot_to_proto(s)) == s`` for every valid snapshot (a tested round trip),
including the content-hash version. Concurrency: none.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from google.protobuf.duration_pb2 import Duration

from meshapi.discovery.v1 import discovery_pb2 as pb
from meshproxy.config import model
from meshproxy.config.load import _validate  # see snapshot_from_proto
from meshproxy.core.errors import ConfigError
from meshproxy.xds.version import DIGEST_FEATURE, ServiceDigests, digest_version

INVALID_ARGUMENT = 3  # google.rpc.Code
# A NACK with this code says "I cannot apply this incremental update" (not "this config
# is bad"): the server answers with the full snapshot of the same version.
FAILED_PRECONDITION = 9


class BaseVersionMismatch(ConfigError):
    """An incremental update for a snapshot this proxy does not hold (NACKed with FAILED_PRECONDITION)."""


_PROTOCOL: dict[int, str] = {
    pb.PROTOCOL_AUTO: model.Protocol.AUTO.value,
    pb.PROTOCOL_HTTP1: model.Protocol.HTTP1.value,
    pb.PROTOCOL_HTTP2: model.Protocol.HTTP2.value,
    pb.PROTOCOL_TCP: model.Protocol.TCP.value,
}
_LB: dict[int, str] = {
    pb.LB_LEAST_REQUEST: model.LbPolicy.LEAST_REQUEST.value,
    pb.LB_ROUND_ROBIN: model.LbPolicy.ROUND_ROBIN.value,
    pb.LB_RANDOM: model.LbPolicy.RANDOM.value,
}
_PATH: dict[int, str] = {
    pb.PathMatch.PREFIX: model.PathMatchKind.PREFIX.value,
    pb.PathMatch.EXACT: model.PathMatchKind.EXACT.value,
    pb.PathMatch.REGEX: model.PathMatchKind.REGEX.value,
}
_HEADER: dict[int, str] = {
    pb.HeaderMatch.EXACT: model.HeaderMatchKind.EXACT.value,
    pb.HeaderMatch.REGEX: model.HeaderMatchKind.REGEX.value,
}


@dataclass(frozen=True, slots=True)
class ProxyNode:
    """Who this proxy is, as it introduces itself on every new stream."""

    pod: str
    namespace: str
    service_account: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    proxy_version: str = ""
    pod_ip: str = ""
    workload: str = ""
    # Optional parts of the stream contract this client implements (``Node.features``);
    # a test may send fewer to act as an older proxy.
    features: tuple[str, ...] = (DIGEST_FEATURE,)


def _seconds(d: Duration) -> float:
    # Exact integer nanoseconds, then one correctly rounded division: "0.1s" comes back as
    # the float 0.1, so the content hash matches the sender's.
    return (d.seconds * 1_000_000_000 + d.nanos) / 1e9


def _enum(table: dict[int, str], value: int, path: str) -> str:
    try:
        return table[value]
    except KeyError:
        raise ConfigError(path, f"unknown enum value {value}") from None


def _pairs(headers: Any) -> tuple[tuple[str, str], ...]:
    return tuple((h.name, h.value) for h in headers)


def _modifier(m: pb.HeaderModifier) -> model.HeaderModifier:
    return model.HeaderModifier(set=_pairs(m.set), add=_pairs(m.add), remove=tuple(m.remove))


def _retry(r: pb.RetryPolicy) -> model.RetryPolicy:
    d = model.RetryPolicy()
    budget = d.budget
    if r.HasField("budget"):
        b = r.budget
        budget = model.RetryBudget(
            ratio=b.ratio,
            min_per_second=b.min_per_second,
            window=_seconds(b.window) if b.HasField("window") else d.budget.window,
        )
    return model.RetryPolicy(
        attempts=r.attempts,
        per_try_timeout=_seconds(r.per_try_timeout) if r.HasField("per_try_timeout") else None,
        retry_on=frozenset(r.retry_on),
        status_codes=frozenset(r.status_codes),
        backoff_base=_seconds(r.backoff_base) if r.HasField("backoff_base") else d.backoff_base,
        backoff_max=_seconds(r.backoff_max) if r.HasField("backoff_max") else d.backoff_max,
        budget=budget,
        max_body_bytes=r.max_body_bytes,
    )


_DEFAULT_MIN_HEALTH_PERCENT = model.OutlierDetection().min_health_percent  # for an unset field


def _rate_limit(rl: pb.RateLimit) -> model.RateLimit:
    return model.RateLimit(requests_per_second=rl.requests_per_second, burst=rl.burst)


def _policy(p: pb.TrafficPolicy, path: str) -> model.TrafficPolicy:
    d = model.TrafficPolicy()
    cb = d.circuit_breaker
    if p.HasField("circuit_breaker"):
        c = p.circuit_breaker
        cb = model.CircuitBreaker(
            max_connections=c.max_connections,
            max_pending_requests=c.max_pending_requests,
            max_requests=c.max_requests,
            max_retries=c.max_retries,
            consecutive_failures=c.consecutive_failures,
            open_duration=_seconds(c.open_duration) if c.HasField("open_duration") else cb.open_duration,
            max_open_duration=_seconds(c.max_open_duration)
            if c.HasField("max_open_duration")
            else cb.max_open_duration,
        )
    outlier = None
    if p.HasField("outlier_detection"):
        od = p.outlier_detection
        outlier = model.OutlierDetection(
            consecutive_5xx=od.consecutive_5xx,
            consecutive_gateway_errors=od.consecutive_gateway_errors,
            consecutive_connect_failures=od.consecutive_connect_failures,
            base_ejection_time=_seconds(od.base_ejection_time),
            max_ejection_time=_seconds(od.max_ejection_time),
            max_ejection_percent=od.max_ejection_percent,
            min_health_percent=od.min_health_percent
            if od.HasField("min_health_percent")
            else _DEFAULT_MIN_HEALTH_PERCENT,
        )
    fault = None
    if p.HasField("fault"):
        f = p.fault
        fault = model.FaultInjection(
            delay_percent=f.delay_percent,
            delay=_seconds(f.delay),
            abort_percent=f.abort_percent,
            abort_status=f.abort_status,
        )
    return model.TrafficPolicy(
        timeout=_seconds(p.timeout) if p.HasField("timeout") else None,
        connect_timeout=_seconds(p.connect_timeout) if p.HasField("connect_timeout") else d.connect_timeout,
        retry=_retry(p.retry) if p.HasField("retry") else None,
        circuit_breaker=cb,
        outlier_detection=outlier,
        lb=model.LbPolicy(_enum(_LB, p.lb, f"{path}.lb")),
        rate_limit=_rate_limit(p.rate_limit) if p.HasField("rate_limit") else None,
        fault=fault,
        idle_timeout=_seconds(p.idle_timeout) if p.HasField("idle_timeout") else d.idle_timeout,
    )


def _match(m: pb.RouteMatch, path: str) -> model.RouteMatch:
    return model.RouteMatch(
        path=model.PathMatch(
            model.PathMatchKind(_enum(_PATH, m.path.kind, f"{path}.path.kind")), m.path.value
        )
        if m.HasField("path")
        else None,
        method=m.method or None,
        headers=tuple(
            model.HeaderMatch(
                name=h.name,
                value=h.value,
                kind=model.HeaderMatchKind(_enum(_HEADER, h.kind, f"{path}.headers[{i}].kind")),
            )
            for i, h in enumerate(m.headers)
        ),
    )


def _route(r: pb.Route, path: str) -> model.Route:
    return model.Route(
        name=r.name,
        matches=tuple(_match(m, f"{path}.matches[{i}]") for i, m in enumerate(r.matches)),
        backends=tuple(model.WeightedBackend(model.ServiceKey(b.service), b.weight) for b in r.backends),
        timeout=_seconds(r.timeout) if r.HasField("timeout") else None,
        retry=_retry(r.retry) if r.HasField("retry") else None,
        request_headers=_modifier(r.request_headers),
        response_headers=_modifier(r.response_headers),
    )


def _endpoints(msgs: Any) -> tuple[model.Endpoint, ...]:
    return tuple(
        model.Endpoint(
            address=e.address,
            port=e.port,
            ready=e.ready,
            serving=e.serving,
            terminating=e.terminating,
            weight=e.weight,
            pod=e.pod,
            workload=e.workload,
            zone=e.zone,
        )
        for e in msgs
    )


def _service(s: pb.Service, path: str) -> model.Service:
    return model.Service(
        name=s.name,
        namespace=s.namespace,
        port=s.port,
        protocol=model.Protocol(_enum(_PROTOCOL, s.protocol, f"{path}.protocol")),
        vips=tuple(s.vips),
        hostnames=tuple(s.hostnames),
        endpoints=_endpoints(s.endpoints),
        routes=tuple(_route(r, f"{path}.routes[{i}]") for i, r in enumerate(s.routes)),
        policy=_policy(s.policy, f"{path}.policy") if s.HasField("policy") else model.TrafficPolicy(),
        target_port=s.target_port or None,
    )


def _telemetry(t: pb.Telemetry) -> model.Telemetry:
    tr = t.tracing
    propagation = []
    for i, name in enumerate(tr.propagation):
        try:
            propagation.append(model.Propagation(name))
        except ValueError:
            raise ConfigError(
                f"telemetry.tracing.propagation[{i}]", f"unknown propagation {name!r}"
            ) from None
    try:
        access_log = model.AccessLogMode(t.access_log) if t.access_log else model.AccessLogMode.OFF
    except ValueError:
        raise ConfigError("telemetry.access_log", f"unknown mode {t.access_log!r}") from None
    return model.Telemetry(
        tracing=model.Tracing(
            sampling_ratio=tr.sampling_ratio,
            propagation=tuple(propagation),
            otlp_grpc_endpoint=tr.otlp_grpc_endpoint or None,
            otlp_http_endpoint=tr.otlp_http_endpoint or None,
            zipkin_endpoint=tr.zipkin_endpoint or None,
            max_queue_size=tr.max_queue_size,
        ),
        access_log=access_log,
        metrics=t.metrics,
    )


def _versioned(snapshot: model.Snapshot, scheme: int, memo: ServiceDigests | None = None) -> model.Snapshot:
    """``snapshot`` with its version in the response's ``VersionScheme``."""
    if scheme == pb.VERSION_SCHEME_CONTENT:
        return snapshot.with_version()
    if scheme == pb.VERSION_SCHEME_DIGEST:
        return replace(snapshot, version=digest_version(snapshot, memo))
    raise ConfigError("version_scheme", f"unknown version scheme {scheme}")


def snapshot_from_proto(
    msg: pb.Snapshot, scheme: int = pb.VERSION_SCHEME_CONTENT, memo: ServiceDigests | None = None
) -> model.Snapshot:
    """A validated snapshot, versioned in ``scheme``; raises ``ConfigError(path, message)`` if it is not usable.

    ``memo`` (digest versions only) remembers the services' digests for the next update.
    """
    w = msg.workload
    snapshot = model.Snapshot(
        workload=model.Workload(
            name=w.name,
            namespace=w.namespace,
            service_account=w.service_account,
            pod=w.pod,
            labels=tuple(sorted(w.labels.items())),
        ),
        services=tuple(_service(s, f"services[{i}]") for i, s in enumerate(msg.services)),
        inbound=model.Inbound(
            ports=tuple(
                model.InboundPort(
                    port=p.port,
                    protocol=model.Protocol(_enum(_PROTOCOL, p.protocol, f"inbound.ports[{i}].protocol")),
                    service=p.service,
                    rate_limit=_rate_limit(p.rate_limit) if p.HasField("rate_limit") else None,
                )
                for i, p in enumerate(msg.inbound.ports)
            ),
            app_address=msg.inbound.app_address or model.Inbound().app_address,
            opaque_ports=frozenset(msg.inbound.opaque_ports),
        ),
        telemetry=_telemetry(msg.telemetry) if msg.HasField("telemetry") else model.Telemetry(),
    )
    # The same checks as a static --config file, with the same field paths. (The loader
    # does not export its validation step yet; it is the one rule set both paths must share.)
    _validate(snapshot)
    return _versioned(snapshot, scheme, memo)


def received_snapshot(resp: pb.DiscoveryResponse, memo: ServiceDigests | None = None) -> model.Snapshot:
    """The snapshot a response carries; its version, in the response's scheme, must be the one claimed."""
    if resp.WhichOneof("payload") != "snapshot":
        # Incremental updates need the proxy's base snapshot: ``received_response``.
        raise ConfigError("payload", "not a full snapshot")
    snapshot = snapshot_from_proto(resp.snapshot, resp.version_scheme, memo)
    if resp.version_info and snapshot.version != resp.version_info:
        raise ConfigError(
            "version_info",
            f"content hash {snapshot.version} does not match the announced {resp.version_info}",
        )
    return snapshot


def received_response(
    resp: pb.DiscoveryResponse, base: model.Snapshot | None, memo: ServiceDigests | None = None
) -> model.Snapshot:
    """The snapshot a response gives this proxy, which holds ``base`` (its last good snapshot).

    A full snapshot stands alone. An ``EndpointUpdate`` replaces the endpoint lists of the
    services it names in ``base`` and must give exactly the announced version (the
    content hash), validated like a full snapshot. An update for a snapshot this proxy
    does not hold raises ``BaseVersionMismatch``.
    """
    if resp.WhichOneof("payload") != "endpoints":
        return received_snapshot(resp, memo)
    update = resp.endpoints
    if base is None or update.base_version != base.version:
        raise BaseVersionMismatch(
            "endpoints.base_version",
            f"update for {update.base_version or '(none)'}, but this proxy holds "
            f"{base.version if base else 'no snapshot'}",
        )
    position = {str(svc.key): i for i, svc in enumerate(base.services)}
    services = list(base.services)
    for j, entry in enumerate(update.services):
        i = position.get(entry.service_key)
        if i is None:
            raise BaseVersionMismatch(
                f"endpoints.services[{j}].service_key", f"{entry.service_key!r} is not in the base snapshot"
            )
        services[i] = replace(services[i], endpoints=_endpoints(entry.endpoints))
    snapshot = replace(base, services=tuple(services), version="")
    _validate(snapshot)
    snapshot = _versioned(snapshot, resp.version_scheme, memo)
    if resp.version_info and snapshot.version != resp.version_info:
        raise ConfigError(
            "version_info",
            f"content hash {snapshot.version} after the update does not match the announced {resp.version_info}",
        )
    return snapshot


# ---------------------------------------------------------------- requests


def _node(n: ProxyNode) -> pb.Node:
    return pb.Node(
        pod=n.pod,
        namespace=n.namespace,
        service_account=n.service_account,
        labels=dict(n.labels),
        proxy_version=n.proxy_version,
        pod_ip=n.pod_ip,
        workload=n.workload,
        features=list(n.features),
    )


def first_request(node: ProxyNode, version: str) -> pb.DiscoveryRequest:
    return pb.DiscoveryRequest(node=_node(node), version_info=version)


def ack(version: str, nonce: str) -> pb.DiscoveryRequest:
    return pb.DiscoveryRequest(version_info=version, response_nonce=nonce)


def nack(
    last_good_version: str, nonce: str, message: str, code: int = INVALID_ARGUMENT
) -> pb.DiscoveryRequest:
    return pb.DiscoveryRequest(
        version_info=last_good_version,
        response_nonce=nonce,
        error_detail=pb.ErrorDetail(code=code, message=message),
    )
