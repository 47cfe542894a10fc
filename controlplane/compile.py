"""The pure compile step: cluster state + proxy identity -> one config snapshot.

Owns: ``compile_snapshot(state, node, settings) -> Snapshot`` and
``validate(state) -> list[PolicyStatus]``, and the two stages they are made of,
which the reconciler calls separately so a change is compiled once for the
whole mesh and once per distinct workload, never once per proxy:

    compile_mesh(state, settings) -> MeshConfig       services, routes, policies, statuses
    node_shape(state, node)       -> NodeShape        what the snapshot depends on of a node
    compile_for_shape(mesh, state, shape, settings) -> Snapshot

What becomes what:
  * each TCP port of each Service -> ``model.Service`` (VIPs = ClusterIPs,
    hostnames ``name.ns``, ``name.ns.svc``, ``name.ns.svc.<cluster domain>`` and,
    for proxies in the same namespace, ``name``); endpoints from its
    EndpointSlices (or, when it has none, from the Pods its selector picks,
    resolving named target ports); the protocol from ``appProtocol``, else the
    port name prefix, else sniffed.
  * GAMMA HTTPRoutes (parentRefs to a Service) -> the parent's routes, one
    ``model.Route`` per (rule, match), ordered by Gateway API precedence.
  * TrafficPolicy (``policy.meshproxy.io``) -> the target service's policy; its
    ``rateLimit`` is also enforced inbound by the pods serving that service.
  * the node's Pod -> ``model.Workload`` and ``model.Inbound``.

Invalid policy objects (unparsable, unknown backend, missing target, conflict)
are left out and reported by ``validate``; everything else compiles as if they
did not exist.

Scoping: every proxy gets every service of the mesh for now (no Sidecar-like
scoping yet). ``Workload.pod`` is left empty so that all replicas of a workload
share one snapshot and one version; a proxy knows its own pod name.

Versions: a content hash in the scheme the proxy asked for (``NodeShape.
digest_versions``, from ``Node.features``): ``VERSION_SCHEME_DIGEST`` hashes the
per-workload part and one digest per service, each service hashed once per
change of it (``_Compiled.digest``); proxies that did not ask get
``model.content_version`` (the whole snapshot's JSON hashed per workload).

Invariants: pure (no I/O, no clock, no randomness); output ordering is
deterministic (sorted by namespace, name, port), so equal input gives an equal
snapshot and an equal version in either scheme. A snapshot is checked for
consistency (``check_consistency``) before it is returned.

Concurrency: none; plain functions over immutable data.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace

from controlplane.index import (
    OPAQUE_PORTS_ANNOTATION,
    ClusterState,
    EndpointSliceInfo,
    HTTPRouteInfo,
    ObjKey,
    PodInfo,
    RouteRule,
    ServiceInfo,
    ServicePort,
    TrafficPolicyInfo,
)
from controlplane.settings import MeshSettings
from meshproxy.config import model
from meshproxy.xds.version import DIGEST_FEATURE, digest_version_of, head_json, service_digest


class CompileError(Exception):
    """A compiled snapshot is inconsistent: a bug in the compiler, never the user's input."""


@dataclass(frozen=True, slots=True)
class ProxyNode:
    """Who a proxy says it is (the ``Node`` of its first discovery request)."""

    pod: str
    namespace: str
    service_account: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    proxy_version: str = ""
    pod_ip: str = ""
    workload: str = ""
    features: tuple[str, ...] = ()  # optional parts of the stream contract it understands

    @property
    def node_id(self) -> str:
        return f"{self.pod}.{self.namespace}"

    @property
    def digest_versions(self) -> bool:
        """Whether its snapshots are versioned in ``VERSION_SCHEME_DIGEST``."""
        return DIGEST_FEATURE in self.features


class Reason(enum.Enum):
    """Condition reasons, spelled as the Gateway API spells them where it has one."""

    ACCEPTED = "Accepted"
    INVALID = "Invalid"  # the spec cannot be understood (bad duration, regex, ...)
    UNSUPPORTED = "UnsupportedValue"
    NO_MATCHING_PARENT = "NoMatchingParent"  # HTTPRoute parent Service (or its port) missing
    BACKEND_NOT_FOUND = "BackendNotFound"  # HTTPRoute backend Service (or its port) missing
    TARGET_NOT_FOUND = "TargetNotFound"  # TrafficPolicy target Service missing
    CONFLICTED = "Conflicted"  # an older TrafficPolicy targets the same Service


@dataclass(frozen=True, slots=True)
class PolicyStatus:
    """Whether one HTTPRoute or TrafficPolicy is in effect, and if not, why not."""

    kind: str  # "HTTPRoute" or "TrafficPolicy"
    namespace: str
    name: str
    generation: int
    accepted: bool
    reason: Reason
    message: str = ""


@dataclass(frozen=True, slots=True)
class MeshConfig:
    """The node-independent part of every snapshot, compiled once per cluster state."""

    revision: int
    services: tuple[model.Service, ...]
    statuses: tuple[PolicyStatus, ...]
    policies: Mapping[ObjKey, model.TrafficPolicy]  # accepted policy per (namespace, service)
    # Canonical JSON of each service (aligned with ``services``), so the content hash of
    # each workload's snapshot costs a concatenation, not a walk over every endpoint.
    service_json: tuple[str, ...] = ()
    # The same services as seen from their own namespace (with the short hostname), built
    # once per mesh so every workload of that namespace shares the objects and their JSON.
    local_services: tuple[model.Service, ...] = ()
    local_json: tuple[str, ...] = ()
    # SHA-256 of each JSON above (``VERSION_SCHEME_DIGEST``), likewise aligned.
    service_digests: tuple[bytes, ...] = ()
    local_digests: tuple[bytes, ...] = ()
    # What each service port was compiled from, so the next ``compile_mesh`` reuses the
    # service, its local variant and their JSON when none of it changed: an endpoint
    # change then costs the services it touched, not the whole mesh.
    reuse: Mapping[model.ServiceKey, _Compiled] = field(default_factory=dict, compare=False, repr=False)
    # Memos, never part of equality, for the namespace asked for last (the reconciler
    # visits nodes by namespace, so one entry serves them all and bounds the memory):
    # what every workload of one namespace shares (``_NamespaceView``), and the services'
    # part of a content version's input (about 1.5 MB at 10,000 endpoints), built only
    # for proxies that still take content versions.
    view_memo: dict[str, _NamespaceView] = field(default_factory=dict, compare=False, repr=False)
    blob_memo: dict[str, bytes] = field(default_factory=dict, compare=False, repr=False)
    # A memo of each shape's own part (``_Head``), valid for the state's ``services`` mapping
    # and the settings in ``head_inputs``, and taken over by the next ``compile_mesh`` when
    # those and the policies are unchanged: an endpoint change then costs each workload a
    # lookup and a small hash, not its inbound ports and their JSON again (1000 workloads:
    # that was half of what was left of the reconcile). Bounded by ``_MAX_HEADS``.
    heads: dict[NodeShape, _Head] = field(default_factory=dict, compare=False, repr=False)
    head_inputs: tuple[object, ...] = field(default=(), compare=False, repr=False)

    def head(self, state: ClusterState, shape: NodeShape, settings: MeshSettings) -> _Head:
        """``shape``'s inbound, telemetry and their JSON for this mesh; memoized."""
        usable = (
            len(self.head_inputs) == 2
            and self.head_inputs[0] is state.services
            and self.head_inputs[1] == settings
        )
        head = self.heads.get(shape) if usable else None
        if head is None:
            inbound = _inbound(self, state, shape)
            _check_inbound(inbound)
            telemetry = _telemetry(settings)
            own = model.Snapshot(workload=shape.workload, inbound=inbound, telemetry=telemetry)
            head = _Head(inbound=inbound, telemetry=telemetry, json=head_json(own))
            if usable:
                if len(self.heads) >= _MAX_HEADS:
                    self.heads.clear()
                self.heads[shape] = head
        return head

    def view(self, namespace: str) -> _NamespaceView:
        """``services`` as seen from ``namespace``, checked, with their digests; built once."""
        view = self.view_memo.get(namespace)
        if view is None:
            own = [svc.namespace == namespace for svc in self.services]
            services = tuple(
                self.local_services[i] if mine else svc
                for i, (svc, mine) in enumerate(zip(self.services, own, strict=True))
            )
            _check_services(services)
            digests = b"".join(
                self.local_digests[i] if mine else self.service_digests[i] for i, mine in enumerate(own)
            )
            view = _NamespaceView(services=services, digests=digests)
            self.view_memo.clear()
            self.view_memo[namespace] = view
        return view

    def services_blob(self, namespace: str) -> bytes:
        """``services`` as seen from ``namespace``, in canonical JSON, comma-joined, encoded."""
        blob = self.blob_memo.get(namespace)
        if blob is None:
            blob = ",".join(
                self.local_json[i] if svc.namespace == namespace else self.service_json[i]
                for i, svc in enumerate(self.services)
            ).encode()
            self.blob_memo.clear()
            self.blob_memo[namespace] = blob
        return blob


@dataclass(frozen=True, slots=True)
class _Head:
    """A workload's own part of its snapshot (besides ``Workload`` itself), checked."""

    inbound: model.Inbound
    telemetry: model.Telemetry
    json: str  # ``head_json`` of the snapshot: the digest version's per-workload input


_MAX_HEADS = 16384  # distinct node shapes remembered across changes (pods churn): a few MB at most


@dataclass(frozen=True, slots=True)
class _NamespaceView:
    """The part of every snapshot in one namespace that does not depend on the workload.

    One tuple of services shared by all of them (a short name means the service of the
    client's own namespace), checked for consistency once, and their digests joined
    (32 bytes each): a workload's digest version hashes its own small part and these.
    """

    services: tuple[model.Service, ...]
    digests: bytes


@dataclass(frozen=True, slots=True, eq=False)
class _Compiled:
    """One compiled service port and its inputs, compared by identity where the Index keeps
    unchanged objects (``ServiceInfo``, each ``EndpointSliceInfo``, the pods mapping)."""

    info: ServiceInfo
    slices: tuple[EndpointSliceInfo, ...]
    pods: Mapping[ObjKey, PodInfo]
    policy: model.TrafficPolicy
    routes: tuple[model.Route, ...]
    cluster_domain: str
    service: model.Service
    text: str
    local: model.Service
    local_text: str
    digest: bytes
    local_digest: bytes

    def still_valid(
        self,
        info: ServiceInfo,
        slices: tuple[EndpointSliceInfo, ...],
        pods: Mapping[ObjKey, PodInfo],
        policy: model.TrafficPolicy,
        routes: tuple[model.Route, ...],
        cluster_domain: str,
    ) -> bool:
        return (
            self.info is info
            and self.pods is pods  # endpoints carry their pod's workload; pod-selected ones more
            and len(self.slices) == len(slices)
            and all(a is b for a, b in zip(self.slices, slices, strict=True))
            and self.cluster_domain == cluster_domain
            and self.policy == policy
            and self.routes == routes
        )


@dataclass(frozen=True, slots=True)
class NodeShape:
    """Everything of a node its snapshot depends on; equal shapes get the same snapshot."""

    workload: model.Workload
    pod_labels: tuple[tuple[str, str], ...]  # all labels: Service selectors match these
    container_ports: tuple[tuple[str, int], ...]  # (name, port) for named target ports
    opaque_ports: frozenset[int]
    digest_versions: bool = False  # the version's scheme: what the proxy asked for


# ---------------------------------------------------------------- protocols and hostnames

_HTTP1 = frozenset({"http", "http1", "kubernetes.io/http", "grpc-web", "kubernetes.io/ws"})
_HTTP2 = frozenset({"http2", "h2c", "grpc", "kubernetes.io/h2c"})
_OPAQUE = frozenset({"tcp", "tls", "https", "kubernetes.io/wss", "mysql", "mongo", "redis", "postgres"})


def protocol_of(port: ServicePort, opaque: bool = False) -> model.Protocol:
    """``appProtocol`` first (the Kubernetes field for this), else the Istio-style name prefix."""
    if opaque:
        return model.Protocol.TCP
    hints = [(port.app_protocol or "").lower()]
    name = port.name.lower()
    hints.append(name.split("-", 1)[0])
    for hint in hints:
        if hint in _HTTP1:
            return model.Protocol.HTTP1
        if hint in _HTTP2:
            return model.Protocol.HTTP2
        if hint in _OPAQUE:
            return model.Protocol.TCP
    return model.Protocol.AUTO


def _port_list(text: str | None) -> frozenset[int]:
    out = set()
    for part in (text or "").split(","):
        part = part.strip()
        if part.isdigit() and 0 < int(part) < 65536:
            out.add(int(part))
    return frozenset(out)


def hostnames_of(name: str, namespace: str, cluster_domain: str) -> tuple[str, ...]:
    return (f"{name}.{namespace}", f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.{cluster_domain}")


def _service_key(namespace: str, name: str, port: int) -> model.ServiceKey:
    return model.ServiceKey(f"{name}.{namespace}:{port}")


def _meshable(svc: ServiceInfo) -> bool:
    # ExternalName services have no endpoints to balance over; DNS answers for them.
    return svc.type != "ExternalName"


def _tcp_ports(svc: ServiceInfo) -> list[ServicePort]:
    return [p for p in svc.ports if p.protocol.upper() == "TCP"]


def _resolve_target(port: ServicePort, container_ports: Iterable[tuple[str, int]]) -> int | None:
    if port.target_port is None:
        return port.port
    if isinstance(port.target_port, int):
        return port.target_port
    return next((p for n, p in container_ports if n == port.target_port), None)


# ---------------------------------------------------------------- endpoints


def _endpoints_from_slices(
    state: ClusterState, svc: ServiceInfo, port: ServicePort
) -> tuple[model.Endpoint, ...] | None:
    slices = state.endpoint_slices.get((svc.namespace, svc.name))
    if not slices:
        return None
    best: dict[tuple[str, int], model.Endpoint] = {}
    for sl in slices:
        if sl.address_type not in ("IPv4", "IPv6"):
            continue
        # The EndpointSlice controller already resolved the target port (named or not) per
        # pod; its port carries the Service port's name.
        sport = next((p for p in sl.ports if p.name == port.name and p.protocol.upper() == "TCP"), None)
        if sport is None:
            continue
        for ep in sl.endpoints:
            pod = state.pods.get((svc.namespace, ep.pod)) if ep.pod else None
            for address in ep.addresses:
                candidate = model.Endpoint(
                    address=address,
                    port=sport.port,
                    ready=ep.ready,
                    serving=ep.serving,
                    terminating=ep.terminating,
                    pod=ep.pod,
                    workload=pod.workload if pod else "",
                    zone=ep.zone,
                )
                key = (address, sport.port)
                old = best.get(key)
                # The same address can sit in two slices while one is being updated: keep the
                # most usable view of it.
                if old is None or (candidate.ready, candidate.serving) > (old.ready, old.serving):
                    best[key] = candidate
    return tuple(best[k] for k in sorted(best))


def _selects(selector: tuple[tuple[str, str], ...], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector)


def _endpoints_from_pods(
    pods: Iterable[PodInfo], svc: ServiceInfo, port: ServicePort
) -> tuple[model.Endpoint, ...]:
    """Endpoints as the EndpointSlice controller would make them (no slices: --from-dir)."""
    if svc.selector is None:
        return ()
    out = {}
    for pod in pods:
        if (
            not pod.pod_ip
            or pod.phase in ("Succeeded", "Failed")
            or not _selects(svc.selector, pod.label_dict())
        ):
            continue
        target = _resolve_target(port, ((c.name, c.port) for c in pod.container_ports))
        if target is None:
            continue
        for address in pod.pod_ips:
            out[(address, target)] = model.Endpoint(
                address=address,
                port=target,
                ready=pod.ready and not pod.deleting,
                serving=pod.ready,
                terminating=pod.deleting,
                pod=pod.name,
                workload=pod.workload,
            )
    return tuple(out[k] for k in sorted(out))


# ---------------------------------------------------------------- HTTPRoutes


@dataclass(frozen=True, slots=True)
class _Attached:
    """One (rule, match) of an accepted HTTPRoute, attached to one service port."""

    sort_key: tuple[object, ...]
    route: model.Route


def _match_rank(match: model.RouteMatch) -> tuple[int, int, int, int]:
    # Gateway API precedence: exact path, then the longest prefix, then a method, then the
    # most header matches. Regex paths are implementation-specific: after exact, before prefix.
    path = match.path
    if path is None:
        kind, length = 1, 1  # PathPrefix "/"
    elif path.kind is model.PathMatchKind.EXACT:
        kind, length = 3, len(path.value)
    elif path.kind is model.PathMatchKind.REGEX:
        kind, length = 2, len(path.value)
    else:
        kind, length = 1, len(path.value)
    return (-kind, -length, 0 if match.method else 1, -len(match.headers))


def _backend_port(backend: ServiceInfo, wanted: int | None, parent_port: int) -> int | None:
    ports = [p.port for p in _tcp_ports(backend)]
    if wanted is not None:
        return wanted if wanted in ports else None
    if parent_port in ports:
        return parent_port
    return ports[0] if len(ports) == 1 else None


def _resolve_route(
    state: ClusterState, route: HTTPRouteInfo
) -> tuple[PolicyStatus, dict[model.ServiceKey, list[_Attached]]]:
    def status(reason: Reason, message: str = "") -> PolicyStatus:
        return PolicyStatus(
            kind="HTTPRoute",
            namespace=route.namespace,
            name=route.name,
            generation=route.generation,
            accepted=reason is Reason.ACCEPTED,
            reason=reason,
            message=message,
        )

    if route.error is not None:
        reason = Reason.UNSUPPORTED if "not supported" in route.error.message else Reason.INVALID
        return status(reason, str(route.error)), {}
    attached: dict[model.ServiceKey, list[_Attached]] = {}
    done: set[model.ServiceKey] = set()  # two parentRefs may name the same service port
    for pi, parent in enumerate(route.service_parents):
        if parent.namespace != route.namespace:
            # GAMMA "consumer routes" only apply to clients in the route's namespace; every
            # proxy gets the same routes here, so such a route would leak to other namespaces.
            return status(
                Reason.UNSUPPORTED,
                f"spec.parentRefs[{pi}]: a parent Service in another namespace (consumer route) is not supported",
            ), {}
        svc = state.services.get((parent.namespace, parent.name))
        if svc is None or not _meshable(svc):
            return status(
                Reason.NO_MATCHING_PARENT,
                f"spec.parentRefs[{pi}]: Service {parent.namespace}/{parent.name} not found",
            ), {}
        ports = [p for p in _tcp_ports(svc) if parent.port is None or p.port == parent.port]
        if not ports:
            return status(
                Reason.NO_MATCHING_PARENT,
                f"spec.parentRefs[{pi}]: Service {parent.namespace}/{parent.name} has no TCP port {parent.port}",
            ), {}
        for sport in ports:
            key = _service_key(svc.namespace, svc.name, sport.port)
            if key in done:
                continue
            done.add(key)
            for ri, rule in enumerate(route.rules):
                backends = []
                for bi, ref in enumerate(rule.backends):
                    backend = state.services.get((ref.namespace, ref.name))
                    bport = (
                        _backend_port(backend, ref.port, sport.port)
                        if backend and _meshable(backend)
                        else None
                    )
                    if backend is None or bport is None:
                        where = f"{ref.namespace}/{ref.name}" + (f" port {ref.port}" if ref.port else "")
                        return status(
                            Reason.BACKEND_NOT_FOUND,
                            f"spec.rules[{ri}].backendRefs[{bi}]: Service {where} not found",
                        ), {}
                    backends.append(
                        model.WeightedBackend(
                            service=_service_key(ref.namespace, ref.name, bport), weight=ref.weight
                        )
                    )
                if backends and not any(b.weight > 0 for b in backends):
                    return status(
                        Reason.INVALID, f"spec.rules[{ri}].backendRefs: weights must not all be 0"
                    ), {}
                for mi, match in enumerate(rule.matches):
                    # One model route per match, so precedence can interleave the matches of
                    # several rules; names stay unique per service (the proxy checks that).
                    name = rule.name if len(rule.matches) == 1 else f"{rule.name}/match-{mi}"
                    order = (*_match_rank(match), route.created, route.namespace, route.name, ri, mi)
                    attached.setdefault(key, []).append(
                        _Attached(sort_key=order, route=_route_of(name, rule, match, tuple(backends)))
                    )
    return status(Reason.ACCEPTED), attached


def _route_of(
    name: str, rule: RouteRule, match: model.RouteMatch, backends: tuple[model.WeightedBackend, ...]
) -> model.Route:
    return model.Route(
        name=name,
        matches=(match,),
        backends=backends,
        timeout=rule.timeout,
        request_headers=rule.request_headers,
        response_headers=rule.response_headers,
    )


# ---------------------------------------------------------------- TrafficPolicies


def _resolve_policies(state: ClusterState) -> tuple[list[PolicyStatus], dict[ObjKey, model.TrafficPolicy]]:
    statuses = []
    winners: dict[ObjKey, TrafficPolicyInfo] = {}
    # Oldest first (then by name), so the policy in effect does not flip when a newer one
    # targeting the same Service appears: the newer one is the one marked Conflicted.
    ordered = sorted(state.traffic_policies.values(), key=lambda p: (p.created, p.namespace, p.name))
    for tp in ordered:

        def status(reason: Reason, message: str = "", tp: TrafficPolicyInfo = tp) -> PolicyStatus:
            return PolicyStatus(
                kind="TrafficPolicy",
                namespace=tp.namespace,
                name=tp.name,
                generation=tp.generation,
                accepted=reason is Reason.ACCEPTED,
                reason=reason,
                message=message,
            )

        if tp.error is not None:
            statuses.append(status(Reason.INVALID, str(tp.error)))
            continue
        target = (tp.namespace, tp.target_name)
        svc = state.services.get(target)
        if svc is None or not _meshable(svc):
            statuses.append(
                status(
                    Reason.TARGET_NOT_FOUND,
                    f"spec.targetRef: Service {tp.namespace}/{tp.target_name} not found",
                )
            )
            continue
        if target in winners:
            other = winners[target]
            statuses.append(
                status(
                    Reason.CONFLICTED,
                    f"TrafficPolicy {other.namespace}/{other.name} already targets Service {tp.target_name}",
                )
            )
            continue
        winners[target] = tp
        statuses.append(status(Reason.ACCEPTED))
    return statuses, {k: v.policy for k, v in winners.items()}


def validate(state: ClusterState) -> list[PolicyStatus]:
    """The status of every GAMMA HTTPRoute and every TrafficPolicy, sorted by kind, namespace, name."""
    return list(compile_mesh(state, MeshSettings()).statuses)


# ---------------------------------------------------------------- the mesh


def compile_mesh(
    state: ClusterState, settings: MeshSettings, previous: MeshConfig | None = None
) -> MeshConfig:
    """Every service of the mesh, with its endpoints, routes and policy, plus policy statuses.

    ``previous`` (the mesh compiled before, with the same settings) only saves work: each
    service port whose inputs are the very objects it was compiled from is taken over
    as it was; the result equals a compile without it.
    """
    statuses, policies = _resolve_policies(state)
    attached: dict[model.ServiceKey, list[_Attached]] = {}
    for rkey in sorted(state.http_routes):
        route = state.http_routes[rkey]
        if not route.service_parents:
            continue  # a north-south route for a Gateway: some gateway controller's business
        st, parts = _resolve_route(state, route)
        statuses.append(st)
        for skey, items in parts.items():
            attached.setdefault(skey, []).extend(items)

    pods_by_ns: dict[str, list[PodInfo]] = {}
    for (ns, _), pod in sorted(state.pods.items()):
        pods_by_ns.setdefault(ns, []).append(pod)

    services: list[model.Service] = []
    texts: list[str] = []
    local: list[model.Service] = []
    local_texts: list[str] = []
    digests: list[bytes] = []
    local_digests: list[bytes] = []
    reuse: dict[model.ServiceKey, _Compiled] = {}
    before = previous.reuse if previous is not None else {}
    for okey in sorted(state.services):
        svc = state.services[okey]
        if not _meshable(svc):
            continue
        opaque = _port_list(dict(svc.annotations).get(OPAQUE_PORTS_ANNOTATION))
        policy = policies.get(okey, model.TrafficPolicy())
        slices = state.endpoint_slices.get((svc.namespace, svc.name)) or ()
        for port in sorted(_tcp_ports(svc), key=lambda p: p.port):
            skey = _service_key(svc.namespace, svc.name, port.port)
            routes = tuple(a.route for a in sorted(attached.get(skey, []), key=lambda a: a.sort_key))
            done = before.get(skey)
            if done is None or not done.still_valid(
                svc, slices, state.pods, policy, routes, settings.cluster_domain
            ):
                endpoints = _endpoints_from_slices(state, svc, port)
                if endpoints is None:
                    endpoints = _endpoints_from_pods(pods_by_ns.get(svc.namespace, ()), svc, port)
                service = model.Service(
                    name=svc.name,
                    namespace=svc.namespace,
                    port=port.port,
                    protocol=protocol_of(port, port.port in opaque),
                    vips=svc.cluster_ips,
                    hostnames=hostnames_of(svc.name, svc.namespace, settings.cluster_domain),
                    endpoints=endpoints,
                    routes=routes,
                    policy=policy,
                    target_port=port.target_port if isinstance(port.target_port, int) else None,
                )
                text = _canonical(service)
                local_service = replace(service, hostnames=(service.name, *service.hostnames))
                local_text = _rehost(text, service, local_service)
                done = _Compiled(
                    info=svc,
                    slices=slices,
                    pods=state.pods,
                    policy=policy,
                    routes=routes,
                    cluster_domain=settings.cluster_domain,
                    service=service,
                    text=text,
                    local=local_service,
                    local_text=local_text,
                    digest=service_digest(text),
                    local_digest=service_digest(local_text),
                )
            reuse[skey] = done
            services.append(done.service)
            texts.append(done.text)
            local.append(done.local)
            local_texts.append(done.local_text)
            digests.append(done.digest)
            local_digests.append(done.local_digest)
    statuses.sort(key=lambda s: (s.kind, s.namespace, s.name))
    heads: dict[NodeShape, _Head] = {}
    if (
        previous is not None
        and len(previous.head_inputs) == 2
        and previous.head_inputs[0] is state.services
        and previous.head_inputs[1] == settings
        and previous.policies == policies
    ):
        heads = previous.heads  # nothing a shape's inbound depends on changed
    return MeshConfig(
        revision=state.revision,
        services=tuple(services),
        statuses=tuple(statuses),
        policies=policies,
        service_json=tuple(texts),
        local_services=tuple(local),
        local_json=tuple(local_texts),
        service_digests=tuple(digests),
        local_digests=tuple(local_digests),
        reuse=reuse,
        heads=heads,
        head_inputs=(state.services, settings),
    )


def _rehost(text: str, old: model.Service, new: model.Service) -> str:
    """``_canonical(new)`` from ``_canonical(old)`` when only the hostnames differ (no re-walk)."""
    before = '"hostnames":' + json.dumps(list(old.hostnames), separators=(",", ":"))
    after = '"hostnames":' + json.dumps(list(new.hostnames), separators=(",", ":"))
    if text.count(before) != 1:
        return _canonical(new)
    return text.replace(before, after)


# ---------------------------------------------------------------- the node

# Labels that differ per pod or per rollout and carry nothing a span or metric should be
# split by; leaving them out also lets replicas share one snapshot.
_VOLATILE_LABELS = frozenset(
    {
        "pod-template-hash",
        "controller-revision-hash",
        "pod-template-generation",
        "statefulset.kubernetes.io/pod-name",
        "apps.kubernetes.io/pod-index",
        "batch.kubernetes.io/controller-uid",
        "controller-uid",
    }
)


def node_shape(state: ClusterState, node: ProxyNode) -> NodeShape:
    """What a node's snapshot depends on: its Pod as the index knows it, else what it says."""
    pod = state.pods.get((node.namespace, node.pod))
    if pod is not None:
        labels = pod.labels
        workload = model.Workload(
            name=pod.workload or pod.name,
            namespace=pod.namespace,
            service_account=pod.service_account,
            labels=tuple((k, v) for k, v in labels if k not in _VOLATILE_LABELS),
        )
        return NodeShape(
            workload=workload,
            pod_labels=labels,
            container_ports=tuple((c.name, c.port) for c in pod.container_ports if c.name),
            opaque_ports=_port_list(pod.annotation(OPAQUE_PORTS_ANNOTATION)),
            digest_versions=node.digest_versions,
        )
    # The proxy may connect before the watch has seen its Pod: trust what it says until then.
    labels = tuple(sorted(node.labels))
    return NodeShape(
        workload=model.Workload(
            name=node.workload or node.pod,
            namespace=node.namespace,
            service_account=node.service_account or "default",
            labels=tuple((k, v) for k, v in labels if k not in _VOLATILE_LABELS),
        ),
        pod_labels=labels,
        container_ports=(),
        opaque_ports=frozenset(),
        digest_versions=node.digest_versions,
    )


def _inbound(mesh: MeshConfig, state: ClusterState, shape: NodeShape) -> model.Inbound:
    ns = shape.workload.namespace
    labels = dict(shape.pod_labels)
    ports: dict[int, model.InboundPort] = {}
    for (sns, sname), svc in sorted(state.services.items()):
        if sns != ns or svc.selector is None or not _meshable(svc) or not _selects(svc.selector, labels):
            continue
        policy = mesh.policies.get((sns, sname))
        opaque = _port_list(dict(svc.annotations).get(OPAQUE_PORTS_ANNOTATION))
        for port in sorted(_tcp_ports(svc), key=lambda p: p.port):
            target = _resolve_target(port, shape.container_ports)
            if target is None or target in ports:
                continue  # first Service (by name) to claim a pod port names it
            ports[target] = model.InboundPort(
                port=target,
                protocol=protocol_of(port, port.port in opaque or target in shape.opaque_ports),
                service=sname,
                rate_limit=policy.rate_limit if policy else None,
            )
    return model.Inbound(ports=tuple(ports[p] for p in sorted(ports)), opaque_ports=shape.opaque_ports)


def _telemetry(settings: MeshSettings) -> model.Telemetry:
    return model.Telemetry(
        tracing=model.Tracing(
            sampling_ratio=settings.sampling_ratio,
            propagation=settings.propagation,
            otlp_grpc_endpoint=settings.otlp_grpc_endpoint,
            otlp_http_endpoint=settings.otlp_http_endpoint,
            zipkin_endpoint=settings.zipkin_endpoint,
        ),
        access_log=settings.access_log,
        metrics=settings.metrics,
    )


def compile_for_shape(
    mesh: MeshConfig, state: ClusterState, shape: NodeShape, settings: MeshSettings
) -> model.Snapshot:
    view = mesh.view(shape.workload.namespace)  # services checked once per namespace
    head = mesh.head(state, shape, settings)  # inbound checked once per shape and mesh inputs
    if shape.digest_versions:
        version = digest_version_of(head.json, view.digests)
    else:
        unversioned = model.Snapshot(
            workload=shape.workload, services=view.services, inbound=head.inbound, telemetry=head.telemetry
        )
        version = _version(unversioned, mesh.services_blob(shape.workload.namespace))
    return model.Snapshot(
        workload=shape.workload,
        services=view.services,
        inbound=head.inbound,
        telemetry=head.telemetry,
        version=version,
    )


def _canonical(value: object) -> str:
    """``model.content_version``'s serialisation of one part of a snapshot."""
    return json.dumps(model.to_plain(value), sort_keys=True, separators=(",", ":"))


_SNAPSHOT_FIELDS = sorted(f.name for f in fields(model.Snapshot) if f.name != "version")


def _version(snapshot: model.Snapshot, services_blob: bytes) -> str:
    """Exactly ``model.content_version(snapshot)``, reusing the services' serialisation."""
    if _SNAPSHOT_FIELDS != ["inbound", "services", "telemetry", "workload"]:
        return model.content_version(snapshot)  # the model grew: take the slow, certain path
    h = hashlib.sha256(f'{{"inbound":{_canonical(snapshot.inbound)},"services":['.encode())
    h.update(services_blob)
    h.update(
        f'],"telemetry":{_canonical(snapshot.telemetry)},"workload":{_canonical(snapshot.workload)}}}'.encode()
    )
    return h.hexdigest()[:16]


def compile_snapshot(state: ClusterState, node: ProxyNode, settings: MeshSettings) -> model.Snapshot:
    """The snapshot for one proxy. Pure and deterministic; the version is the content hash."""
    return compile_for_shape(compile_mesh(state, settings), state, node_shape(state, node), settings)


def check_consistency(snapshot: model.Snapshot) -> None:
    """Refuse to publish a snapshot a proxy could not use (duplicate keys, dangling backends)."""
    _check_services(snapshot.services)
    _check_inbound(snapshot.inbound)


def _check_services(services: tuple[model.Service, ...]) -> None:
    keys: set[model.ServiceKey] = set()
    listeners: dict[tuple[str, int], model.ServiceKey] = {}
    for s in services:
        if s.key in keys:
            raise CompileError(f"duplicate service key {s.key}")
        keys.add(s.key)
        if not 0 < s.port < 65536:
            raise CompileError(f"{s.key}: port out of range")
        for vip in s.vips:
            if (vip, s.port) in listeners:
                raise CompileError(f"{s.key}: {vip}:{s.port} already belongs to {listeners[(vip, s.port)]}")
            listeners[(vip, s.port)] = s.key
    for s in services:
        for r in s.routes:
            for b in r.backends:
                if b.service not in keys:
                    raise CompileError(f"{s.key}: route {r.name} names unknown backend {b.service}")


def _check_inbound(inbound: model.Inbound) -> None:
    seen_ports = set()
    for p in inbound.ports:
        if p.port in seen_ports:
            raise CompileError(f"inbound port {p.port} declared twice")
        seen_ports.add(p.port)
