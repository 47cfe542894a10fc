"""Protobuf -> model for the sidecar's discovery client (the proxy's side of the wire).

Owns: turning a received ``Snapshot`` message into a validated
``meshproxy.config.model.Snapshot``, and building the ``DiscoveryRequest``
messages the proxy sends (first request with its ``Node``, ACK, NACK). With
``controlplane.convert`` it is the only code that imports ``discovery_pb2``.

How: the message is first turned into the plain-data schema of a static config
file (model field names, durations in seconds) and then handed to
``meshproxy.config.load.load_dict``, so a snapshot from the control plane passes
exactly the checks a hand-written ``--config`` file does, and every problem is a
``ConfigError`` naming the field path (``services[3].routes[0].backends[0].service``).

Mapping conventions (the reverse of ``controlplane.convert``): an unset optional
message (``timeout``, ``retry``, ``outlier_detection``, ``rate_limit``,
``fault``, ``path``) is ``None``; "" strings and 0 ports that mean "unset" are
``None``; an unset required message keeps the model's default.

Invariants: pure functions, no I/O; ``snapshot_from_proto(controlplane.convert.
snapshot_to_proto(s)) == s`` for every valid snapshot (a tested round trip),
including the content-hash version. Concurrency: none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.protobuf.duration_pb2 import Duration

from meshapi.discovery.v1 import discovery_pb2 as pb
from meshproxy.config import model
from meshproxy.config.load import load_dict
from meshproxy.core.errors import ConfigError

INVALID_ARGUMENT = 3  # google.rpc.Code

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


def _seconds(d: Duration) -> float:
    # Exact integer nanoseconds, then one correctly rounded division: "0.1s" comes back as
    # the float 0.1, so the content hash matches the sender's.
    return (d.seconds * 1_000_000_000 + d.nanos) / 1e9


def _enum(table: dict[int, str], value: int, path: str) -> str:
    try:
        return table[value]
    except KeyError:
        raise ConfigError(path, f"unknown enum value {value}") from None


def _modifier(m: pb.HeaderModifier) -> dict[str, Any]:
    return {
        "set": [[h.name, h.value] for h in m.set],
        "add": [[h.name, h.value] for h in m.add],
        "remove": list(m.remove),
    }


def _retry(r: pb.RetryPolicy) -> dict[str, Any]:
    out: dict[str, Any] = {
        "attempts": r.attempts,
        "per_try_timeout": _seconds(r.per_try_timeout) if r.HasField("per_try_timeout") else None,
        "retry_on": list(r.retry_on),
        "status_codes": list(r.status_codes),
        "max_body_bytes": r.max_body_bytes,
    }
    if r.HasField("backoff_base"):
        out["backoff_base"] = _seconds(r.backoff_base)
    if r.HasField("backoff_max"):
        out["backoff_max"] = _seconds(r.backoff_max)
    if r.HasField("budget"):
        b = r.budget
        out["budget"] = {"ratio": b.ratio, "min_per_second": b.min_per_second}
        if b.HasField("window"):
            out["budget"]["window"] = _seconds(b.window)
    return out


def _rate_limit(rl: pb.RateLimit) -> dict[str, Any]:
    return {"requests_per_second": rl.requests_per_second, "burst": rl.burst}


def _policy(p: pb.TrafficPolicy, path: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "timeout": _seconds(p.timeout) if p.HasField("timeout") else None,
        "retry": _retry(p.retry) if p.HasField("retry") else None,
        "lb": _enum(_LB, p.lb, f"{path}.lb"),
        "rate_limit": _rate_limit(p.rate_limit) if p.HasField("rate_limit") else None,
        "outlier_detection": None,
        "fault": None,
    }
    for name in ("connect_timeout", "idle_timeout"):
        if p.HasField(name):
            out[name] = _seconds(getattr(p, name))
    if p.HasField("circuit_breaker"):
        cb = p.circuit_breaker
        out["circuit_breaker"] = {
            "max_connections": cb.max_connections,
            "max_pending_requests": cb.max_pending_requests,
            "max_requests": cb.max_requests,
            "max_retries": cb.max_retries,
            "consecutive_failures": cb.consecutive_failures,
        }
        for name in ("open_duration", "max_open_duration"):
            if cb.HasField(name):
                out["circuit_breaker"][name] = _seconds(getattr(cb, name))
    if p.HasField("outlier_detection"):
        od = p.outlier_detection
        out["outlier_detection"] = {
            "consecutive_5xx": od.consecutive_5xx,
            "consecutive_gateway_errors": od.consecutive_gateway_errors,
            "consecutive_connect_failures": od.consecutive_connect_failures,
            "base_ejection_time": _seconds(od.base_ejection_time),
            "max_ejection_time": _seconds(od.max_ejection_time),
            "max_ejection_percent": od.max_ejection_percent,
        }
    if p.HasField("fault"):
        f = p.fault
        out["fault"] = {
            "delay_percent": f.delay_percent,
            "delay": _seconds(f.delay),
            "abort_percent": f.abort_percent,
            "abort_status": f.abort_status,
        }
    return out


def _match(m: pb.RouteMatch, path: str) -> dict[str, Any]:
    return {
        "path": {"kind": _enum(_PATH, m.path.kind, f"{path}.path.kind"), "value": m.path.value}
        if m.HasField("path")
        else None,
        "method": m.method or None,
        "headers": [
            {"name": h.name, "value": h.value, "kind": _enum(_HEADER, h.kind, f"{path}.headers[{i}].kind")}
            for i, h in enumerate(m.headers)
        ],
    }


def _route(r: pb.Route, path: str) -> dict[str, Any]:
    return {
        "name": r.name,
        "matches": [_match(m, f"{path}.matches[{i}]") for i, m in enumerate(r.matches)],
        "backends": [{"service": b.service, "weight": b.weight} for b in r.backends],
        "timeout": _seconds(r.timeout) if r.HasField("timeout") else None,
        "retry": _retry(r.retry) if r.HasField("retry") else None,
        "request_headers": _modifier(r.request_headers),
        "response_headers": _modifier(r.response_headers),
    }


def _endpoint(e: pb.Endpoint) -> dict[str, Any]:
    return {
        "address": e.address,
        "port": e.port,
        "ready": e.ready,
        "serving": e.serving,
        "terminating": e.terminating,
        "weight": e.weight,
        "pod": e.pod,
        "workload": e.workload,
        "zone": e.zone,
    }


def _service(s: pb.Service, path: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": s.name,
        "namespace": s.namespace,
        "port": s.port,
        "protocol": _enum(_PROTOCOL, s.protocol, f"{path}.protocol"),
        "vips": list(s.vips),
        "hostnames": list(s.hostnames),
        "endpoints": [_endpoint(e) for e in s.endpoints],
        "routes": [_route(r, f"{path}.routes[{i}]") for i, r in enumerate(s.routes)],
        "target_port": s.target_port or None,
    }
    if s.HasField("policy"):
        out["policy"] = _policy(s.policy, f"{path}.policy")
    return out


def snapshot_to_plain(msg: pb.Snapshot) -> dict[str, Any]:
    """The message in the static config schema (what ``load_dict`` reads)."""
    w = msg.workload
    out: dict[str, Any] = {
        "workload": {
            "name": w.name,
            "namespace": w.namespace,
            "service_account": w.service_account,
            "pod": w.pod,
            "labels": sorted(w.labels.items()),
        },
        "services": [_service(s, f"services[{i}]") for i, s in enumerate(msg.services)],
        "inbound": {
            "ports": [
                {
                    "port": p.port,
                    "protocol": _enum(_PROTOCOL, p.protocol, f"inbound.ports[{i}].protocol"),
                    "service": p.service,
                    "rate_limit": _rate_limit(p.rate_limit) if p.HasField("rate_limit") else None,
                }
                for i, p in enumerate(msg.inbound.ports)
            ],
            "opaque_ports": list(msg.inbound.opaque_ports),
        },
    }
    if msg.inbound.app_address:
        out["inbound"]["app_address"] = msg.inbound.app_address
    if msg.HasField("telemetry"):
        t, tr = msg.telemetry, msg.telemetry.tracing
        out["telemetry"] = {
            "tracing": {
                "sampling_ratio": tr.sampling_ratio,
                "propagation": list(tr.propagation),
                "otlp_grpc_endpoint": tr.otlp_grpc_endpoint or None,
                "otlp_http_endpoint": tr.otlp_http_endpoint or None,
                "zipkin_endpoint": tr.zipkin_endpoint or None,
                "max_queue_size": tr.max_queue_size,
            },
            "metrics": t.metrics,
        }
        if t.access_log:
            out["telemetry"]["access_log"] = t.access_log
    return out


def snapshot_from_proto(msg: pb.Snapshot) -> model.Snapshot:
    """A validated, versioned snapshot; raises ``ConfigError(path, message)`` if it is not usable."""
    return load_dict(snapshot_to_plain(msg))


def received_snapshot(resp: pb.DiscoveryResponse) -> model.Snapshot:
    """The snapshot a response carries; its version must be the content hash the server claims."""
    if resp.WhichOneof("payload") != "snapshot":
        # Incremental endpoint updates are reserved in the contract; this proxy NACKs them,
        # which makes the server fall back to full snapshots.
        raise ConfigError("payload", "only full snapshots are supported by this proxy")
    snapshot = snapshot_from_proto(resp.snapshot)
    if resp.version_info and snapshot.version != resp.version_info:
        raise ConfigError(
            "version_info",
            f"content hash {snapshot.version} does not match the announced {resp.version_info}",
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
    )


def first_request(node: ProxyNode, version: str) -> pb.DiscoveryRequest:
    return pb.DiscoveryRequest(node=_node(node), version_info=version)


def ack(version: str, nonce: str) -> pb.DiscoveryRequest:
    return pb.DiscoveryRequest(version_info=version, response_nonce=nonce)


def nack(last_good_version: str, nonce: str, message: str) -> pb.DiscoveryRequest:
    return pb.DiscoveryRequest(
        version_info=last_good_version,
        response_nonce=nonce,
        error_detail=pb.ErrorDetail(code=INVALID_ARGUMENT, message=message),
    )
