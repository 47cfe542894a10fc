"""Model -> protobuf for the discovery server (the control plane's side of the wire).

Owns: building every generated message the control plane sends
(``DiscoveryResponse`` with a ``Snapshot``, ``ListProxiesResponse``,
``GetProxyConfigResponse``) and reading the ``Node`` a proxy sends. With
``meshproxy.xds.convert`` (the reverse direction) it is the only code that
imports ``discovery_pb2`` (an import-linter contract); ``server.py`` and
``meshctl`` pass the messages through without looking inside.

Mapping conventions (the ``.proto`` mirrors ``meshproxy/config/model.py``):
  * float seconds <-> ``google.protobuf.Duration`` (rounded to the nanosecond);
    ``None`` <-> an unset message field.
  * ``None`` strings and ports <-> "" and 0; frozensets -> sorted repeated fields;
    label / header pairs -> maps or repeated ``Header`` in order.

Invariants: pure functions, no I/O. ``snapshot_to_proto`` never mutates its
input and, for a given snapshot, always produces an equal message.
Concurrency: none.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from google.protobuf.duration_pb2 import Duration

from controlplane.compile import ProxyNode
from meshapi.discovery.v1 import discovery_pb2 as pb
from meshproxy.config import model

_PROTOCOL = {
    model.Protocol.AUTO: pb.PROTOCOL_AUTO,
    model.Protocol.HTTP1: pb.PROTOCOL_HTTP1,
    model.Protocol.HTTP2: pb.PROTOCOL_HTTP2,
    model.Protocol.TCP: pb.PROTOCOL_TCP,
}
_LB = {
    model.LbPolicy.LEAST_REQUEST: pb.LB_LEAST_REQUEST,
    model.LbPolicy.ROUND_ROBIN: pb.LB_ROUND_ROBIN,
    model.LbPolicy.RANDOM: pb.LB_RANDOM,
}
_PATH = {
    model.PathMatchKind.PREFIX: pb.PathMatch.PREFIX,
    model.PathMatchKind.EXACT: pb.PathMatch.EXACT,
    model.PathMatchKind.REGEX: pb.PathMatch.REGEX,
}
_HEADER = {
    model.HeaderMatchKind.EXACT: pb.HeaderMatch.EXACT,
    model.HeaderMatchKind.REGEX: pb.HeaderMatch.REGEX,
}


def _duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def _headers(pairs: Iterable[tuple[str, str]]) -> list[pb.Header]:
    return [pb.Header(name=n, value=v) for n, v in pairs]


def _modifier(m: model.HeaderModifier) -> pb.HeaderModifier:
    return pb.HeaderModifier(set=_headers(m.set), add=_headers(m.add), remove=list(m.remove))


def _retry(r: model.RetryPolicy) -> pb.RetryPolicy:
    msg = pb.RetryPolicy(
        attempts=r.attempts,
        retry_on=sorted(r.retry_on),
        status_codes=sorted(r.status_codes),
        backoff_base=_duration(r.backoff_base),
        backoff_max=_duration(r.backoff_max),
        budget=pb.RetryBudget(
            ratio=r.budget.ratio, min_per_second=r.budget.min_per_second, window=_duration(r.budget.window)
        ),
        max_body_bytes=r.max_body_bytes,
    )
    if r.per_try_timeout is not None:
        msg.per_try_timeout.CopyFrom(_duration(r.per_try_timeout))
    return msg


def _rate_limit(rl: model.RateLimit) -> pb.RateLimit:
    return pb.RateLimit(requests_per_second=rl.requests_per_second, burst=rl.burst)


def _policy(p: model.TrafficPolicy) -> pb.TrafficPolicy:
    cb = p.circuit_breaker
    msg = pb.TrafficPolicy(
        connect_timeout=_duration(p.connect_timeout),
        circuit_breaker=pb.CircuitBreaker(
            max_connections=cb.max_connections,
            max_pending_requests=cb.max_pending_requests,
            max_requests=cb.max_requests,
            max_retries=cb.max_retries,
            consecutive_failures=cb.consecutive_failures,
            open_duration=_duration(cb.open_duration),
            max_open_duration=_duration(cb.max_open_duration),
        ),
        lb=_LB[p.lb],
        idle_timeout=_duration(p.idle_timeout),
    )
    if p.timeout is not None:
        msg.timeout.CopyFrom(_duration(p.timeout))
    if p.retry is not None:
        msg.retry.CopyFrom(_retry(p.retry))
    od = p.outlier_detection
    if od is not None:
        msg.outlier_detection.CopyFrom(
            pb.OutlierDetection(
                consecutive_5xx=od.consecutive_5xx,
                consecutive_gateway_errors=od.consecutive_gateway_errors,
                consecutive_connect_failures=od.consecutive_connect_failures,
                base_ejection_time=_duration(od.base_ejection_time),
                max_ejection_time=_duration(od.max_ejection_time),
                max_ejection_percent=od.max_ejection_percent,
                min_health_percent=od.min_health_percent,  # always set: 0 is "panic off"
            )
        )
    if p.rate_limit is not None:
        msg.rate_limit.CopyFrom(_rate_limit(p.rate_limit))
    if p.fault is not None:
        f = p.fault
        msg.fault.CopyFrom(
            pb.FaultInjection(
                delay_percent=f.delay_percent,
                delay=_duration(f.delay),
                abort_percent=f.abort_percent,
                abort_status=f.abort_status,
            )
        )
    return msg


def _match(m: model.RouteMatch) -> pb.RouteMatch:
    msg = pb.RouteMatch(
        method=m.method or "",
        headers=[pb.HeaderMatch(name=h.name, value=h.value, kind=_HEADER[h.kind]) for h in m.headers],
    )
    if m.path is not None:
        msg.path.CopyFrom(pb.PathMatch(kind=_PATH[m.path.kind], value=m.path.value))
    return msg


def _route(r: model.Route) -> pb.Route:
    msg = pb.Route(
        name=r.name,
        matches=[_match(m) for m in r.matches],
        backends=[pb.WeightedBackend(service=b.service, weight=b.weight) for b in r.backends],
        request_headers=_modifier(r.request_headers),
        response_headers=_modifier(r.response_headers),
    )
    if r.timeout is not None:
        msg.timeout.CopyFrom(_duration(r.timeout))
    if r.retry is not None:
        msg.retry.CopyFrom(_retry(r.retry))
    return msg


def _endpoint(e: model.Endpoint) -> pb.Endpoint:
    return pb.Endpoint(
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


def _service(s: model.Service) -> pb.Service:
    return pb.Service(
        name=s.name,
        namespace=s.namespace,
        port=s.port,
        protocol=_PROTOCOL[s.protocol],
        vips=list(s.vips),
        hostnames=list(s.hostnames),
        endpoints=[_endpoint(e) for e in s.endpoints],
        routes=[_route(r) for r in s.routes],
        policy=_policy(s.policy),
        target_port=s.target_port or 0,
    )


class ServiceProtoCache:
    """Converted services, reused across the snapshots that share them.

    Compiling gives every workload's snapshot the very same ``Service`` objects (except
    the few of its own namespace), so converting per object, not per snapshot, turns
    "once per workload" into "once per cluster change". Entries hold the model object
    itself, so an ``id`` cannot be reused while its entry lives. Bounded (LRU).
    """

    def __init__(self, max_entries: int = 50_000) -> None:
        self._max = max_entries
        self._entries: OrderedDict[int, tuple[model.Service, pb.Service]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, svc: model.Service) -> pb.Service:
        entry = self._entries.get(id(svc))
        if entry is not None and entry[0] is svc:
            self._entries.move_to_end(id(svc))
            self.hits += 1
            return entry[1]
        self.misses += 1
        msg = _service(svc)
        self._entries[id(svc)] = (svc, msg)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)
        return msg


def snapshot_to_proto(s: model.Snapshot, services: ServiceProtoCache | None = None) -> pb.Snapshot:
    w, t = s.workload, s.telemetry.tracing
    inbound_ports = []
    for p in s.inbound.ports:
        ip = pb.InboundPort(port=p.port, protocol=_PROTOCOL[p.protocol], service=p.service)
        if p.rate_limit is not None:
            ip.rate_limit.CopyFrom(_rate_limit(p.rate_limit))
        inbound_ports.append(ip)
    return pb.Snapshot(
        workload=pb.Workload(
            name=w.name,
            namespace=w.namespace,
            service_account=w.service_account,
            pod=w.pod,
            labels=dict(w.labels),
        ),
        services=[services.get(svc) if services else _service(svc) for svc in s.services],
        inbound=pb.Inbound(
            ports=inbound_ports,
            app_address=s.inbound.app_address,
            opaque_ports=sorted(s.inbound.opaque_ports),
        ),
        telemetry=pb.Telemetry(
            tracing=pb.Tracing(
                sampling_ratio=t.sampling_ratio,
                propagation=[p.value for p in t.propagation],
                otlp_grpc_endpoint=t.otlp_grpc_endpoint or "",
                otlp_http_endpoint=t.otlp_http_endpoint or "",
                zipkin_endpoint=t.zipkin_endpoint or "",
                max_queue_size=t.max_queue_size,
            ),
            access_log=s.telemetry.access_log.value,
            metrics=s.telemetry.metrics,
        ),
    )


def response(snapshot: pb.Snapshot, version: str, nonce: str) -> pb.DiscoveryResponse:
    return pb.DiscoveryResponse(version_info=version, nonce=nonce, snapshot=snapshot)


# ---------------------------------------------------------------- the wire, pre-encoded

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["ConfigDiscovery"].full_name


def encode_snapshot(snapshot: pb.Snapshot) -> bytes:
    """A ``DiscoveryResponse`` holding only ``snapshot``, encoded: done once per version."""
    return pb.DiscoveryResponse(snapshot=snapshot).SerializeToString()


def encode_response(
    encoded_snapshot: bytes, version: str, nonce: str, *, digest_version: bool = False
) -> bytes:
    """A full ``DiscoveryResponse`` on the wire, without re-encoding the snapshot.

    Protobuf parses concatenated encodings of one message type as their merge, so the
    small per-response header (version, its scheme, nonce) is encoded and put in front
    of the big snapshot encoded once for every proxy of that version.
    """
    scheme = pb.VERSION_SCHEME_DIGEST if digest_version else pb.VERSION_SCHEME_CONTENT
    head = pb.DiscoveryResponse(version_info=version, nonce=nonce, version_scheme=scheme)
    return head.SerializeToString() + encoded_snapshot


# ---------------------------------------------------------------- the wire, per service

_SNAPSHOT_FIELD: int = pb.DiscoveryResponse.DESCRIPTOR.fields_by_name["snapshot"].number
_SERVICES_FIELD: int = pb.Snapshot.DESCRIPTOR.fields_by_name["services"].number
_ENDPOINTS_FIELD: int = pb.DiscoveryResponse.DESCRIPTOR.fields_by_name["endpoints"].number
_BASE_VERSION_FIELD: int = pb.EndpointUpdate.DESCRIPTOR.fields_by_name["base_version"].number
_UPDATE_SERVICES_FIELD: int = pb.EndpointUpdate.DESCRIPTOR.fields_by_name["services"].number


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _length_delimited(number: int, payload: bytes) -> bytes:
    """One field of wire type 2 (a message, string or bytes) as protobuf encodes it."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


class ServiceBytesCache:
    """Each service encoded once, as one entry of ``Snapshot.services`` on the wire.

    Every workload's snapshot holds the very same ``Service`` objects, and a cluster
    change alters a few services while compiling builds new, equal objects for all the
    others. So lookups go by identity first (one dict lookup) and then by content (a
    frozen ``Service`` hashes far faster than it encodes): after a change only the
    services that changed are encoded. Bounded: an LRU by total encoded bytes, and the
    identity index (which keeps its objects alive, so ids are never reused while
    indexed) is dropped whenever it grows past ``max_ids``.
    """

    def __init__(self, max_bytes: int = 64 * 1024 * 1024, max_ids: int = 4096) -> None:
        self._max_bytes = max_bytes
        self._max_ids = max_ids
        self._by_content: OrderedDict[model.Service, bytes] = OrderedDict()
        self._by_id: dict[int, tuple[model.Service, bytes]] = {}
        self._bytes = 0
        # Each service's endpoint list as one ``EndpointUpdate.services`` entry. An endpoint
        # change is sent to every workload as its own (base, new) pair of versions, but the
        # changed service is the same object in all of them: building its ~100 Endpoint
        # messages per pair was a tenth of the control plane's CPU with 1000 workloads.
        # By identity only (the entry keeps the object alive), bounded like ``_by_id``.
        self._endpoints: dict[int, tuple[model.Service, bytes]] = {}
        # Whether two services differ in endpoints only, by the pair's identities: every
        # workload's update compares the same two objects (``dataclasses.replace`` twice
        # per workload was a tenth of an endpoint change's cost with 1000 workloads).
        self._endpoints_only: dict[tuple[int, int], tuple[model.Service, model.Service, bool]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._by_content)

    def get(self, svc: model.Service) -> bytes:
        entry = self._by_id.get(id(svc))
        if entry is not None and entry[0] is svc:
            self.hits += 1
            return entry[1]
        data = self._by_content.get(svc)
        if data is None:
            self.misses += 1
            data = _length_delimited(_SERVICES_FIELD, _service(svc).SerializeToString())
            self._by_content[svc] = data
            self._bytes += len(data)
            while self._bytes > self._max_bytes and len(self._by_content) > 1:
                _, old = self._by_content.popitem(last=False)
                self._bytes -= len(old)
        else:
            self.hits += 1
            self._by_content.move_to_end(svc)
        if len(self._by_id) >= self._max_ids:
            self._by_id.clear()
        self._by_id[id(svc)] = (svc, data)
        return data

    def endpoints_only(self, old: model.Service, new: model.Service) -> bool:
        """Whether ``old`` and ``new`` are equal but for their endpoint lists."""
        key = (id(old), id(new))
        entry = self._endpoints_only.get(key)
        if entry is not None and entry[0] is old and entry[1] is new:
            return entry[2]
        same = replace(old, endpoints=()) == replace(new, endpoints=())
        if len(self._endpoints_only) >= self._max_ids:
            self._endpoints_only.clear()
        self._endpoints_only[key] = (old, new, same)
        return same

    def endpoints(self, svc: model.Service) -> bytes:
        """``svc``'s key and endpoints as one encoded ``EndpointUpdate.services`` entry."""
        entry = self._endpoints.get(id(svc))
        if entry is not None and entry[0] is svc:
            return entry[1]
        msg = pb.ServiceEndpoints(service_key=svc.key, endpoints=[_endpoint(e) for e in svc.endpoints])
        data = _length_delimited(_UPDATE_SERVICES_FIELD, msg.SerializeToString())
        if len(self._endpoints) >= self._max_ids:
            self._endpoints.clear()
        self._endpoints[id(svc)] = (svc, data)
        return data


def encode_snapshot_model(s: model.Snapshot, services: ServiceBytesCache) -> bytes:
    """What ``encode_snapshot(snapshot_to_proto(s))`` is to a parser, from per-service encodings.

    A parser takes a message's fields in any order and the entries of a repeated field
    need not be adjacent, so the small per-workload part (workload, inbound, telemetry)
    is encoded here and the services are appended as the cache's bytes: no message with
    every endpoint is ever built or copied, per version or per proxy.
    """
    head = snapshot_to_proto(replace(s, services=())).SerializeToString()
    return _length_delimited(_SNAPSHOT_FIELD, b"".join([head, *map(services.get, s.services)]))


# ---------------------------------------------------------------- incremental endpoint updates


def encode_endpoint_update(
    base: model.Snapshot, new: model.Snapshot, services: ServiceBytesCache
) -> bytes | None:
    """The ``EndpointUpdate`` payload that turns ``base`` into ``new``, or None if a full snapshot is needed.

    Only when the two differ in nothing but endpoint lists (same services in the same
    order, same routes, policies, workload, inbound and telemetry): then a proxy that
    holds ``base`` rebuilds ``new`` exactly, content-hash version included. Services
    are compared by their cached encodings, so an unchanged service costs a lookup.
    """
    if (
        len(base.services) != len(new.services)
        or base.workload != new.workload
        or base.inbound != new.inbound
        or base.telemetry != new.telemetry
    ):
        return None
    changed = []
    for old, svc in zip(base.services, new.services, strict=True):
        if old is svc or services.get(old) == services.get(svc):
            continue
        if not services.endpoints_only(old, svc):
            return None  # something besides the endpoints changed
        changed.append(services.endpoints(svc))
    if not changed:
        return None
    # The encoding of EndpointUpdate(base_version=..., services=changed), assembled from the
    # cached entries (field order as SerializeToString writes it; tested against it).
    head = _length_delimited(_BASE_VERSION_FIELD, base.version.encode()) if base.version else b""
    update = b"".join([head, *changed])
    return _length_delimited(_ENDPOINTS_FIELD, update)


decode_discovery_request = pb.DiscoveryRequest.FromString
decode_list_proxies_request = pb.ListProxiesRequest.FromString
decode_get_proxy_config_request = pb.GetProxyConfigRequest.FromString


def encode_message(msg: pb.ListProxiesResponse | pb.GetProxyConfigResponse) -> bytes:
    return msg.SerializeToString()


# ---------------------------------------------------------------- the proxy's side


def node_from_proto(n: pb.Node) -> ProxyNode:
    return ProxyNode(
        pod=n.pod,
        namespace=n.namespace,
        service_account=n.service_account,
        labels=tuple(sorted(n.labels.items())),
        proxy_version=n.proxy_version,
        pod_ip=n.pod_ip,
        workload=n.workload,
        features=tuple(n.features),
    )


def _node_to_proto(n: ProxyNode) -> pb.Node:
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


# ---------------------------------------------------------------- operator views


@dataclass(frozen=True, slots=True)
class ProxyStatusView:
    """One row of ``meshctl proxy-status`` (``ProxyStatus`` as plain data)."""

    node: ProxyNode
    sent_version: str
    acked_version: str
    desired_version: str
    state: str  # SYNCED, STALE, NOT_SENT
    last_nack: str
    connected_since: str  # RFC 3339


def list_proxies_request() -> pb.ListProxiesRequest:
    return pb.ListProxiesRequest()


def list_proxies_response(rows: Sequence[ProxyStatusView]) -> pb.ListProxiesResponse:
    return pb.ListProxiesResponse(
        proxies=[
            pb.ProxyStatus(
                node=_node_to_proto(r.node),
                sent_version=r.sent_version,
                acked_version=r.acked_version,
                desired_version=r.desired_version,
                state=r.state,
                last_nack=r.last_nack,
                connected_since=r.connected_since,
            )
            for r in rows
        ]
    )


def proxy_statuses_from_proto(msg: pb.ListProxiesResponse) -> list[ProxyStatusView]:
    return [
        ProxyStatusView(
            node=node_from_proto(p.node),
            sent_version=p.sent_version,
            acked_version=p.acked_version,
            desired_version=p.desired_version,
            state=p.state,
            last_nack=p.last_nack,
            connected_since=p.connected_since,
        )
        for p in msg.proxies
    ]


def get_proxy_config_request(pod: str, namespace: str) -> pb.GetProxyConfigRequest:
    return pb.GetProxyConfigRequest(pod=pod, namespace=namespace)


def get_proxy_config_response(version: str, snapshot_json: str) -> pb.GetProxyConfigResponse:
    return pb.GetProxyConfigResponse(version_info=version, snapshot_json=snapshot_json)
