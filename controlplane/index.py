"""The indexed cluster state: Kubernetes objects as immutable plain data.

Owns: parsing the raw objects the API server serves (camelCase JSON as dicts)
into small frozen dataclasses, the mutable ``Index`` that the watch stream
updates one event at a time (``apply``), and the immutable ``ClusterState``
view that the compile step reads.

    WatchEvent / Relist  ->  Index.apply  ->  Index.state() -> ClusterState  ->  compile

Parsing is lenient for built-in kinds (a malformed port or address is skipped:
the API server already validated them) and strict for the mesh's policy kinds
(``HTTPRoute``, ``TrafficPolicy``): a spec that cannot be understood is kept
with its ``error`` set, so ``compile.validate`` can report it in a status
condition while the rest of the mesh compiles as if it did not exist.

The ``TrafficPolicy`` spec (``policy.meshproxy.io/v1alpha1``) is documented in
``docs/controlplane.md``; ``parse_traffic_policy`` is its reference reading.

Invariants:
  * ``ClusterState`` and everything in it is immutable; ``Index.state()`` is
    cheap when nothing changed (the same object is returned) and copies only
    the kinds that changed since the last call.
  * Objects are keyed by ``(namespace, name)``; cluster-scoped kinds use "".
  * ``ClusterState.revision`` grows by one for every applied change.

Concurrency: none. The ``Index`` is owned by one task (the reconciler); the
``ClusterState`` it hands out may be read from anywhere.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from controlplane.events import ClusterEvent, Relist, WatchEvent
from meshproxy.config import model
from meshproxy.config.load import RETRY_CONDITIONS

ObjKey = tuple[str, str]  # (namespace, name)

POLICY_GROUP = "policy.meshproxy.io"
GATEWAY_GROUP = "gateway.networking.k8s.io"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
OPAQUE_PORTS_ANNOTATION = "meshproxy.io/opaque-ports"


class SpecError(ValueError):
    """A policy spec cannot be understood. ``path`` names the field, e.g. ``spec.rules[0].timeouts``."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message

    def problem(self) -> SpecProblem:
        return SpecProblem(path=self.path, message=self.message)


@dataclass(frozen=True, slots=True)
class SpecProblem:
    """Why a policy object was not accepted (comparable plain data, unlike the exception)."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


# ---------------------------------------------------------------- durations

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|µs|ns|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration(text: object) -> float:
    """A Kubernetes/Go duration string ("250ms", "2s", "1m30s") in float seconds.

    Bare numbers are refused on purpose: "5" could mean seconds or milliseconds, and a
    policy that means the other one is worse than a status condition saying so.
    """
    if not isinstance(text, str) or not text:
        raise ValueError(f"duration must be a string like '250ms' or '2s', got {text!r}")
    pos = 0
    total = 0.0
    for m in _DURATION_RE.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if pos != len(text):
        raise ValueError(f"unparsable duration {text!r} (expected e.g. '250ms', '2s', '1m30s')")
    return round(total, 9)


# ---------------------------------------------------------------- helpers


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _seq(value: Any) -> Sequence[Any]:
    return value if isinstance(value, list | tuple) else ()


def _str_pairs(value: Any) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((str(k), str(v)) for k, v in _map(value).items()))


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def object_key(obj: Mapping[str, Any]) -> ObjKey:
    meta = _map(obj.get("metadata"))
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))


# ---------------------------------------------------------------- built-in kinds


@dataclass(frozen=True, slots=True)
class NamespaceInfo:
    name: str
    labels: tuple[tuple[str, str], ...] = ()
    annotations: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str
    port: int
    target_port: int | str | None = None  # a number, a container port name, or unset (= port)
    protocol: str = "TCP"
    app_protocol: str | None = None


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    namespace: str
    name: str
    cluster_ips: tuple[str, ...] = ()  # empty for headless services
    ports: tuple[ServicePort, ...] = ()
    selector: tuple[tuple[str, str], ...] | None = None  # None: endpoints are managed by hand
    type: str = "ClusterIP"
    annotations: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class SliceEndpoint:
    addresses: tuple[str, ...]
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    pod: str = ""  # targetRef name when targetRef.kind is Pod
    zone: str = ""


@dataclass(frozen=True, slots=True)
class SlicePort:
    name: str
    port: int
    protocol: str = "TCP"
    app_protocol: str | None = None


@dataclass(frozen=True, slots=True)
class EndpointSliceInfo:
    namespace: str
    name: str
    service: str  # from the kubernetes.io/service-name label
    address_type: str = "IPv4"
    ports: tuple[SlicePort, ...] = ()
    endpoints: tuple[SliceEndpoint, ...] = ()


@dataclass(frozen=True, slots=True)
class ContainerPort:
    name: str
    port: int
    protocol: str = "TCP"


@dataclass(frozen=True, slots=True)
class PodInfo:
    namespace: str
    name: str
    labels: tuple[tuple[str, str], ...] = ()
    annotations: tuple[tuple[str, str], ...] = ()
    service_account: str = "default"
    pod_ip: str = ""
    pod_ips: tuple[str, ...] = ()
    workload: str = ""  # owner workload name: a Deployment, StatefulSet, ... or the pod itself
    workload_kind: str = "Pod"
    container_ports: tuple[ContainerPort, ...] = ()
    phase: str = ""
    ready: bool = False  # the pod's Ready condition
    deleting: bool = False  # metadata.deletionTimestamp is set

    def label_dict(self) -> dict[str, str]:
        return dict(self.labels)

    def annotation(self, name: str) -> str | None:
        return dict(self.annotations).get(name)


def workload_of(meta: Mapping[str, Any], labels: Mapping[str, str]) -> tuple[str, str]:
    """``(kind, name)`` of the workload owning a pod, from its controller owner reference.

    A ReplicaSet's name is its Deployment's name plus ``-<pod-template-hash>``; the hash
    is also the pod's ``pod-template-hash`` label, so the Deployment name is exact.
    """
    owners = [_map(o) for o in _seq(meta.get("ownerReferences"))]
    owner = next((o for o in owners if o.get("controller")), owners[0] if owners else None)
    pod_name = str(meta.get("name") or "")
    if owner is None:
        return ("Pod", pod_name)
    kind, name = str(owner.get("kind") or ""), str(owner.get("name") or "")
    if kind == "ReplicaSet":
        suffix = labels.get("pod-template-hash")
        if suffix and name.endswith("-" + suffix):
            return ("Deployment", name[: -len(suffix) - 1])
        head, sep, tail = name.rpartition("-")
        if sep and head and re.fullmatch(r"[a-z0-9]{5,10}", tail):
            return ("Deployment", head)
        return ("ReplicaSet", name)
    if kind == "Job":
        return ("Job", name)
    return (kind or "Pod", name or pod_name)


def parse_namespace(obj: Mapping[str, Any]) -> NamespaceInfo:
    meta = _map(obj.get("metadata"))
    return NamespaceInfo(
        name=str(meta.get("name") or ""),
        labels=_str_pairs(meta.get("labels")),
        annotations=_str_pairs(meta.get("annotations")),
    )


def parse_service(obj: Mapping[str, Any]) -> ServiceInfo:
    meta, spec = _map(obj.get("metadata")), _map(obj.get("spec"))
    ips = [str(ip) for ip in _seq(spec.get("clusterIPs")) if ip and ip != "None"]
    if not ips and spec.get("clusterIP") and spec.get("clusterIP") != "None":
        ips = [str(spec["clusterIP"])]
    ports = []
    for p in _seq(spec.get("ports")):
        p = _map(p)
        port = _int(p.get("port"))
        if port is None:
            continue
        tp = p.get("targetPort")
        target: int | str | None = tp if isinstance(tp, int | str) and not isinstance(tp, bool) else None
        if isinstance(target, str) and target.isdigit():
            target = int(target)
        ports.append(
            ServicePort(
                name=str(p.get("name") or ""),
                port=port,
                target_port=target,
                protocol=str(p.get("protocol") or "TCP"),
                app_protocol=str(p["appProtocol"]) if p.get("appProtocol") else None,
            )
        )
    selector = spec.get("selector")
    return ServiceInfo(
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        cluster_ips=tuple(ips),
        ports=tuple(ports),
        selector=_str_pairs(selector) if isinstance(selector, Mapping) and selector else None,
        type=str(spec.get("type") or "ClusterIP"),
        annotations=_str_pairs(meta.get("annotations")),
    )


def parse_endpoint_slice(obj: Mapping[str, Any]) -> EndpointSliceInfo:
    meta = _map(obj.get("metadata"))
    labels = _map(meta.get("labels"))
    ports = []
    for p in _seq(obj.get("ports")):
        p = _map(p)
        port = _int(p.get("port"))
        if port is None:
            continue
        ports.append(
            SlicePort(
                name=str(p.get("name") or ""),
                port=port,
                protocol=str(p.get("protocol") or "TCP"),
                app_protocol=str(p["appProtocol"]) if p.get("appProtocol") else None,
            )
        )
    endpoints = []
    for e in _seq(obj.get("endpoints")):
        e = _map(e)
        cond = _map(e.get("conditions"))
        # API semantics: an unset `ready` means ready; unset `serving` means "same as ready".
        ready = cond.get("ready") is not False
        serving = cond.get("serving") if isinstance(cond.get("serving"), bool) else ready
        ref = _map(e.get("targetRef"))
        endpoints.append(
            SliceEndpoint(
                addresses=tuple(str(a) for a in _seq(e.get("addresses")) if a),
                ready=ready,
                serving=bool(serving),
                terminating=cond.get("terminating") is True,
                pod=str(ref.get("name") or "") if ref.get("kind") == "Pod" else "",
                zone=str(e.get("zone") or ""),
            )
        )
    return EndpointSliceInfo(
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        service=str(labels.get(SERVICE_NAME_LABEL) or ""),
        address_type=str(obj.get("addressType") or "IPv4"),
        ports=tuple(ports),
        endpoints=tuple(endpoints),
    )


def parse_pod(obj: Mapping[str, Any]) -> PodInfo:
    meta, spec, status = _map(obj.get("metadata")), _map(obj.get("spec")), _map(obj.get("status"))
    labels = {str(k): str(v) for k, v in _map(meta.get("labels")).items()}
    kind, workload = workload_of(meta, labels)
    cports = []
    for c in _seq(spec.get("containers")):
        for p in _seq(_map(c).get("ports")):
            p = _map(p)
            port = _int(p.get("containerPort"))
            if port is not None:
                cports.append(
                    ContainerPort(
                        name=str(p.get("name") or ""), port=port, protocol=str(p.get("protocol") or "TCP")
                    )
                )
    ready = any(
        _map(c).get("type") == "Ready" and _map(c).get("status") == "True"
        for c in _seq(status.get("conditions"))
    )
    pod_ips = tuple(str(_map(i).get("ip")) for i in _seq(status.get("podIPs")) if _map(i).get("ip"))
    pod_ip = str(status.get("podIP") or (pod_ips[0] if pod_ips else ""))
    return PodInfo(
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        labels=tuple(sorted(labels.items())),
        annotations=_str_pairs(meta.get("annotations")),
        service_account=str(spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"),
        pod_ip=pod_ip,
        pod_ips=pod_ips or ((pod_ip,) if pod_ip else ()),
        workload=workload,
        workload_kind=kind,
        container_ports=tuple(cports),
        phase=str(status.get("phase") or ""),
        ready=ready,
        deleting=bool(meta.get("deletionTimestamp")),
    )


# ---------------------------------------------------------------- HTTPRoute (GAMMA)


@dataclass(frozen=True, slots=True)
class ParentRef:
    group: str
    kind: str
    namespace: str
    name: str
    port: int | None = None


@dataclass(frozen=True, slots=True)
class BackendRef:
    namespace: str
    name: str
    port: int | None = None
    weight: int = 1


@dataclass(frozen=True, slots=True)
class RouteRule:
    name: str
    matches: tuple[model.RouteMatch, ...] = (model.RouteMatch(),)
    backends: tuple[BackendRef, ...] = ()
    timeout: float | None = None
    request_headers: model.HeaderModifier = field(default_factory=model.HeaderModifier)
    response_headers: model.HeaderModifier = field(default_factory=model.HeaderModifier)


@dataclass(frozen=True, slots=True)
class HTTPRouteInfo:
    namespace: str
    name: str
    generation: int = 0
    created: str = ""  # creationTimestamp (RFC 3339 sorts as text): older routes win ties
    parents: tuple[ParentRef, ...] = ()
    rules: tuple[RouteRule, ...] = ()
    error: SpecProblem | None = None  # set: the spec cannot be understood (rules is then empty)

    @property
    def service_parents(self) -> tuple[ParentRef, ...]:
        """The GAMMA parents: core Services (group "" and kind Service)."""
        return tuple(p for p in self.parents if p.group == "" and p.kind == "Service")


_PATH_KINDS = {
    "PathPrefix": model.PathMatchKind.PREFIX,
    "Exact": model.PathMatchKind.EXACT,
    "RegularExpression": model.PathMatchKind.REGEX,
}
_HEADER_KINDS = {"Exact": model.HeaderMatchKind.EXACT, "RegularExpression": model.HeaderMatchKind.REGEX}
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})


def _check_regex(path: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise SpecError(path, f"invalid regular expression {pattern!r}: {e}") from None


def _parse_match(path: str, raw: Any) -> model.RouteMatch:
    m = _map(raw)
    if m.get("queryParams"):
        raise SpecError(f"{path}.queryParams", "query parameter matches are not supported")
    pm: model.PathMatch | None = None
    if "path" in m:
        p = _map(m["path"])
        ptype = str(p.get("type") or "PathPrefix")
        kind = _PATH_KINDS.get(ptype)
        if kind is None:
            raise SpecError(f"{path}.path.type", f"unknown path match type {ptype!r}")
        value = str(p.get("value") if p.get("value") is not None else "/")
        if kind is model.PathMatchKind.REGEX:
            _check_regex(f"{path}.path.value", value)
        elif not value.startswith("/"):
            raise SpecError(f"{path}.path.value", f"path must start with '/': {value!r}")
        # PathPrefix "/" matches everything: leave the condition out.
        if not (kind is model.PathMatchKind.PREFIX and value == "/"):
            pm = model.PathMatch(kind=kind, value=value)
    method = None
    if m.get("method"):
        method = str(m["method"]).upper()
        if method not in _METHODS:
            raise SpecError(f"{path}.method", f"unknown method {m['method']!r}")
    headers = []
    for j, h in enumerate(_seq(m.get("headers"))):
        h = _map(h)
        htype = str(h.get("type") or "Exact")
        hkind = _HEADER_KINDS.get(htype)
        if hkind is None:
            raise SpecError(f"{path}.headers[{j}].type", f"unknown header match type {htype!r}")
        if not h.get("name"):
            raise SpecError(f"{path}.headers[{j}].name", "header name is required")
        value = str(h.get("value") or "")
        if hkind is model.HeaderMatchKind.REGEX:
            _check_regex(f"{path}.headers[{j}].value", value)
        headers.append(model.HeaderMatch(name=str(h["name"]).lower(), value=value, kind=hkind))
    return model.RouteMatch(path=pm, method=method, headers=tuple(headers))


def _parse_header_modifier(path: str, raw: Any) -> model.HeaderModifier:
    m = _map(raw)

    def pairs(name: str) -> tuple[tuple[str, str], ...]:
        out = []
        for j, h in enumerate(_seq(m.get(name))):
            h = _map(h)
            if not h.get("name"):
                raise SpecError(f"{path}.{name}[{j}].name", "header name is required")
            out.append((str(h["name"]).lower(), str(h.get("value") or "")))
        return tuple(out)

    return model.HeaderModifier(
        set=pairs("set"), add=pairs("add"), remove=tuple(str(r).lower() for r in _seq(m.get("remove")))
    )


def _parse_rule(path: str, raw: Any, route_ns: str, route_name: str, index: int) -> RouteRule:
    r = _map(raw)
    matches = tuple(_parse_match(f"{path}.matches[{j}]", m) for j, m in enumerate(_seq(r.get("matches"))))
    req = model.HeaderModifier()
    resp = model.HeaderModifier()
    for j, f in enumerate(_seq(r.get("filters"))):
        f = _map(f)
        ftype = str(f.get("type") or "")
        if ftype == "RequestHeaderModifier":
            req = _parse_header_modifier(
                f"{path}.filters[{j}].requestHeaderModifier", f.get("requestHeaderModifier")
            )
        elif ftype == "ResponseHeaderModifier":
            resp = _parse_header_modifier(
                f"{path}.filters[{j}].responseHeaderModifier", f.get("responseHeaderModifier")
            )
        else:
            raise SpecError(f"{path}.filters[{j}].type", f"filter {ftype!r} is not supported")
    backends = []
    for j, b in enumerate(_seq(r.get("backendRefs"))):
        b = _map(b)
        bpath = f"{path}.backendRefs[{j}]"
        if str(b.get("group") or "") != "" or str(b.get("kind") or "Service") != "Service":
            raise SpecError(bpath, "only core Service backends are supported")
        if not b.get("name"):
            raise SpecError(f"{bpath}.name", "backend name is required")
        weight = _int(b.get("weight")) if "weight" in b else 1
        if weight is None or weight < 0:
            raise SpecError(
                f"{bpath}.weight", f"weight must be a non-negative integer, got {b.get('weight')!r}"
            )
        if b.get("filters"):
            raise SpecError(f"{bpath}.filters", "per-backend filters are not supported")
        port = _int(b.get("port")) if b.get("port") is not None else None
        backends.append(
            BackendRef(
                namespace=str(b.get("namespace") or route_ns), name=str(b["name"]), port=port, weight=weight
            )
        )
    timeout = None
    timeouts = _map(r.get("timeouts"))
    # `request` bounds the whole exchange, retries included; `backendRequest` one try of it.
    # The model has one route-level timeout: take `request`, else `backendRequest`.
    for tkey in ("request", "backendRequest"):
        if tkey in timeouts:
            try:
                value = parse_duration(timeouts[tkey])
            except ValueError as e:
                raise SpecError(f"{path}.timeouts.{tkey}", str(e)) from None
            timeout = value if value > 0 else None  # Gateway API: "0s" disables the timeout
            break
    name = str(r.get("name") or f"rule-{index}")
    return RouteRule(
        name=f"{route_ns}/{route_name}/{name}",
        matches=matches or (model.RouteMatch(),),
        backends=tuple(backends),
        timeout=timeout,
        request_headers=req,
        response_headers=resp,
    )


def parse_http_route(obj: Mapping[str, Any]) -> HTTPRouteInfo:
    meta, spec = _map(obj.get("metadata")), _map(obj.get("spec"))
    ns, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
    parents = []
    for p in _seq(spec.get("parentRefs")):
        p = _map(p)
        group = str(p.get("group") if p.get("group") is not None else GATEWAY_GROUP)
        parents.append(
            ParentRef(
                group=group,
                kind=str(p.get("kind") or "Gateway"),
                namespace=str(p.get("namespace") or ns),
                name=str(p.get("name") or ""),
                port=_int(p.get("port")),
            )
        )
    base = HTTPRouteInfo(
        namespace=ns,
        name=name,
        generation=_int(meta.get("generation")) or 0,
        created=str(meta.get("creationTimestamp") or ""),
        parents=tuple(parents),
    )
    try:
        rules = tuple(
            _parse_rule(f"spec.rules[{i}]", r, ns, name, i) for i, r in enumerate(_seq(spec.get("rules")))
        )
    except SpecError as e:
        return replace(base, error=e.problem())
    if not rules:
        # Gateway API: a route without rules routes everything to its parent (a default rule).
        rules = (RouteRule(name=f"{ns}/{name}/rule-0"),)
    return replace(base, rules=rules)


# ---------------------------------------------------------------- TrafficPolicy


@dataclass(frozen=True, slots=True)
class TrafficPolicyInfo:
    namespace: str
    name: str
    generation: int = 0
    created: str = ""
    target_kind: str = "Service"
    target_name: str = ""
    policy: model.TrafficPolicy = field(default_factory=model.TrafficPolicy)
    error: SpecProblem | None = None


_LB = {p.value: p for p in model.LbPolicy}
_LB.update({"roundRobin": model.LbPolicy.ROUND_ROBIN, "leastRequest": model.LbPolicy.LEAST_REQUEST})


class _Reader:
    """Typed reads of one spec object, each failure naming its field path."""

    def __init__(self, path: str, raw: Any) -> None:
        if raw is not None and not isinstance(raw, Mapping):
            raise SpecError(path, "must be an object")
        self.path = path
        self.raw: Mapping[str, Any] = raw or {}

    def has(self, key: str) -> bool:
        return key in self.raw and self.raw[key] is not None

    def sub(self, key: str) -> _Reader:
        return _Reader(f"{self.path}.{key}", self.raw.get(key))

    def duration(self, key: str, default: float) -> float:
        if not self.has(key):
            return default
        try:
            return parse_duration(self.raw[key])
        except ValueError as e:
            raise SpecError(f"{self.path}.{key}", str(e)) from None

    def integer(self, key: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
        if not self.has(key):
            return default
        value = self.raw[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise SpecError(f"{self.path}.{key}", f"must be an integer >= {minimum}, got {value!r}")
        if maximum is not None and value > maximum:
            raise SpecError(f"{self.path}.{key}", f"must be <= {maximum}, got {value!r}")
        return int(value)

    def number(self, key: str, default: float, minimum: float = 0.0, maximum: float | None = None) -> float:
        if not self.has(key):
            return default
        value = self.raw[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
            raise SpecError(f"{self.path}.{key}", f"must be a number >= {minimum}, got {value!r}")
        if maximum is not None and value > maximum:
            raise SpecError(f"{self.path}.{key}", f"must be <= {maximum}, got {value!r}")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        if not self.has(key):
            return default
        value = self.raw[key]
        if not isinstance(value, bool):
            raise SpecError(f"{self.path}.{key}", f"must be true or false, got {value!r}")
        return value


# The proxy's own list: a condition it does not know is refused here, with a status.
_RETRY_ON = RETRY_CONDITIONS


def _parse_retry(r: _Reader) -> model.RetryPolicy | None:
    d = model.RetryPolicy()
    attempts = r.integer("attempts", d.attempts, maximum=10)
    if attempts == 0:
        return None
    retry_on = d.retry_on
    if r.has("retryOn"):
        raw = r.raw["retryOn"]
        items = [s.strip() for s in raw.split(",")] if isinstance(raw, str) else list(_seq(raw))
        for j, item in enumerate(items):
            if item not in _RETRY_ON:
                raise SpecError(
                    f"{r.path}.retryOn[{j}]", f"unknown condition {item!r} (one of {sorted(_RETRY_ON)})"
                )
        retry_on = frozenset(str(i) for i in items)
    codes = d.status_codes
    if r.has("statusCodes"):
        out = set()
        for j, c in enumerate(_seq(r.raw["statusCodes"])):
            if isinstance(c, bool) or not isinstance(c, int) or not 100 <= c <= 599:
                raise SpecError(f"{r.path}.statusCodes[{j}]", f"must be an HTTP status code, got {c!r}")
            out.add(c)
        codes = frozenset(out)
    b, bo = r.sub("budget"), r.sub("backoff")
    budget = model.RetryBudget(
        ratio=b.number("ratio", d.budget.ratio, maximum=1000.0),
        min_per_second=b.number("minPerSecond", d.budget.min_per_second),
        window=b.duration("window", d.budget.window),
    )
    per_try = r.duration("perTryTimeout", 0.0)
    base, bmax = bo.duration("base", d.backoff_base), bo.duration("max", d.backoff_max)
    if bmax < base:
        raise SpecError(f"{bo.path}.max", "must not be shorter than backoff.base")
    return model.RetryPolicy(
        attempts=attempts,
        per_try_timeout=per_try if per_try > 0 else None,
        retry_on=retry_on,
        status_codes=codes,
        backoff_base=base,
        backoff_max=bmax,
        budget=budget,
        max_body_bytes=r.integer("maxBodyBytes", d.max_body_bytes),
    )


def parse_traffic_policy_spec(spec: Any) -> model.TrafficPolicy:
    """The ``spec`` of a TrafficPolicy (minus ``targetRef``) as the model's ``TrafficPolicy``.

    Unset fields keep the model's defaults, so ``spec: {targetRef: ...}`` alone means
    "the mesh defaults" and every field can be overridden independently.
    """
    s = _Reader("spec", spec)
    d = model.TrafficPolicy()
    timeout = s.duration("timeout", d.timeout or 0.0)
    retry = _parse_retry(s.sub("retries")) if s.has("retries") else d.retry
    cbr, cbd = s.sub("circuitBreaker"), model.CircuitBreaker()
    cb = model.CircuitBreaker(
        max_connections=cbr.integer("maxConnections", cbd.max_connections, minimum=1),
        max_pending_requests=cbr.integer("maxPendingRequests", cbd.max_pending_requests),
        max_requests=cbr.integer("maxRequests", cbd.max_requests, minimum=1),
        max_retries=cbr.integer("maxRetries", cbd.max_retries),
        consecutive_failures=cbr.integer("consecutiveFailures", cbd.consecutive_failures),
        open_duration=cbr.duration("openDuration", cbd.open_duration),
        max_open_duration=cbr.duration("maxOpenDuration", cbd.max_open_duration),
    )
    if cb.max_open_duration < cb.open_duration:
        raise SpecError("spec.circuitBreaker.maxOpenDuration", "must not be shorter than openDuration")
    outlier: model.OutlierDetection | None = d.outlier_detection
    if s.has("outlierDetection"):
        o, od = s.sub("outlierDetection"), model.OutlierDetection()
        outlier = (
            model.OutlierDetection(
                consecutive_5xx=o.integer("consecutive5xx", od.consecutive_5xx),
                consecutive_gateway_errors=o.integer(
                    "consecutiveGatewayErrors", od.consecutive_gateway_errors
                ),
                consecutive_connect_failures=o.integer(
                    "consecutiveConnectFailures", od.consecutive_connect_failures
                ),
                base_ejection_time=o.duration("baseEjectionTime", od.base_ejection_time),
                max_ejection_time=o.duration("maxEjectionTime", od.max_ejection_time),
                max_ejection_percent=o.integer("maxEjectionPercent", od.max_ejection_percent, maximum=100),
                min_health_percent=o.integer("minHealthPercent", od.min_health_percent, maximum=100),
            )
            if o.boolean("enabled", True)
            else None
        )
    lb = d.lb
    if s.has("loadBalancer"):
        raw_lb = s.raw["loadBalancer"]
        if not isinstance(raw_lb, str) or raw_lb not in _LB:
            raise SpecError(
                "spec.loadBalancer", f"must be one of round_robin, least_request, random, got {raw_lb!r}"
            )
        lb = _LB[raw_lb]
    rate_limit = None
    if s.has("rateLimit"):
        rl = s.sub("rateLimit")
        rps = rl.number("requestsPerSecond", 0.0)
        if rps <= 0:
            raise SpecError("spec.rateLimit.requestsPerSecond", "is required and must be > 0")
        rate_limit = model.RateLimit(
            requests_per_second=rps, burst=rl.integer("burst", max(1, int(rps)), minimum=1)
        )
    fault = None
    if s.has("fault"):
        f = s.sub("fault")
        dl, ab = f.sub("delay"), f.sub("abort")
        fault = model.FaultInjection(
            delay_percent=dl.number("percent", 0.0, maximum=100.0),
            delay=dl.duration("duration", 0.0),
            abort_percent=ab.number("percent", 0.0, maximum=100.0),
            abort_status=ab.integer("status", 503, minimum=200, maximum=599),
        )
    return model.TrafficPolicy(
        timeout=timeout if timeout > 0 else None,
        connect_timeout=s.duration("connectTimeout", d.connect_timeout),
        retry=retry,
        circuit_breaker=cb,
        outlier_detection=outlier,
        lb=lb,
        rate_limit=rate_limit,
        fault=fault,
        idle_timeout=s.duration("idleTimeout", d.idle_timeout),
    )


def parse_traffic_policy(obj: Mapping[str, Any]) -> TrafficPolicyInfo:
    meta, spec = _map(obj.get("metadata")), _map(obj.get("spec"))
    target = _map(spec.get("targetRef"))
    base = TrafficPolicyInfo(
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        generation=_int(meta.get("generation")) or 0,
        created=str(meta.get("creationTimestamp") or ""),
        target_kind=str(target.get("kind") or ""),
        target_name=str(target.get("name") or ""),
    )
    try:
        if not target:
            raise SpecError("spec.targetRef", "is required")
        if str(target.get("group") or "") != "" or base.target_kind != "Service":
            raise SpecError("spec.targetRef", "must name a core Service (group '' and kind Service)")
        if not base.target_name:
            raise SpecError("spec.targetRef.name", "is required")
        policy = parse_traffic_policy_spec(spec)
    except SpecError as e:
        return replace(base, error=e.problem())
    return replace(base, policy=policy)


# ---------------------------------------------------------------- the index


@dataclass(frozen=True, slots=True)
class ClusterState:
    """An immutable view of the cluster, as of ``revision``."""

    revision: int = 0
    namespaces: Mapping[str, NamespaceInfo] = field(default_factory=lambda: MappingProxyType({}))
    services: Mapping[ObjKey, ServiceInfo] = field(default_factory=lambda: MappingProxyType({}))
    # EndpointSlices grouped by the (namespace, service name) they belong to, sorted by name.
    endpoint_slices: Mapping[ObjKey, tuple[EndpointSliceInfo, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    pods: Mapping[ObjKey, PodInfo] = field(default_factory=lambda: MappingProxyType({}))
    http_routes: Mapping[ObjKey, HTTPRouteInfo] = field(default_factory=lambda: MappingProxyType({}))
    traffic_policies: Mapping[ObjKey, TrafficPolicyInfo] = field(default_factory=lambda: MappingProxyType({}))
    synced_kinds: frozenset[str] = frozenset()  # kinds that had at least one Relist

    @classmethod
    def from_objects(cls, objects: Iterable[Mapping[str, Any]]) -> ClusterState:
        """A state holding exactly these objects (tests, ``controlplane run --from-dir``)."""
        index = Index()
        by_kind: dict[str, list[Mapping[str, Any]]] = {k: [] for k in _PARSERS}
        for obj in objects:
            kind = str(obj.get("kind") or "")
            if kind in by_kind:
                by_kind[kind].append(obj)
        for kind, objs in by_kind.items():
            index.apply(Relist(kind=kind, objects=objs))
        return index.state()


_PARSERS: dict[str, Any] = {
    "Namespace": parse_namespace,
    "Service": parse_service,
    "EndpointSlice": parse_endpoint_slice,
    "Pod": parse_pod,
    "HTTPRoute": parse_http_route,
    "TrafficPolicy": parse_traffic_policy,
}


class Index:
    """The mutable store the watch stream updates; hands out immutable ``ClusterState`` views."""

    def __init__(self) -> None:
        self._objects: dict[str, dict[ObjKey, Any]] = {kind: {} for kind in _PARSERS}
        # EndpointSlices again, by the service they belong to, so endpoints are found in O(1).
        self._slices_by_service: dict[ObjKey, dict[str, EndpointSliceInfo]] = {}
        self._revision = 0
        self._dirty: set[str] = set(_PARSERS)
        self._synced: set[str] = set()
        self._state = ClusterState()

    @property
    def revision(self) -> int:
        return self._revision

    @property
    def synced_kinds(self) -> frozenset[str]:
        """Kinds that had at least one Relist (cheap: no state view is built)."""
        return frozenset(self._synced)

    def apply(self, event: ClusterEvent) -> bool:
        """Apply one watch event or relist. Returns whether anything changed."""
        if event.kind not in _PARSERS:
            return False
        if isinstance(event, Relist):
            changed = self._relist(event.kind, event.objects)
            self._synced.add(event.kind)
            if event.kind not in self._state.synced_kinds:
                changed = True
        elif isinstance(event, WatchEvent):
            changed = self._event(event)
        else:  # pragma: no cover - ClusterEvent is a closed union
            return False
        if changed:
            self._revision += 1
            self._dirty.add(event.kind)
        return changed

    def _relist(self, kind: str, objects: Sequence[Mapping[str, Any]]) -> bool:
        parser = _PARSERS[kind]
        new = {}
        for obj in objects:
            key = object_key(obj)
            if kind == "Namespace":
                key = ("", key[1])
            new[key] = parser(obj)
        if new == self._objects[kind]:
            return False
        self._objects[kind] = new
        if kind == "EndpointSlice":
            self._slices_by_service.clear()
            for info in new.values():
                self._slices_by_service.setdefault((info.namespace, info.service), {})[info.name] = info
        return True

    def _event(self, event: WatchEvent) -> bool:
        store = self._objects[event.kind]
        key = object_key(event.obj)
        if event.kind == "Namespace":
            key = ("", key[1])
        old = store.get(key)
        if event.type == "DELETED":
            if old is None:
                return False
            del store[key]
            if event.kind == "EndpointSlice":
                self._unindex_slice(old)
            return True
        info = _PARSERS[event.kind](event.obj)
        if info == old:
            return False  # e.g. a status-only update of a Pod we do not read
        store[key] = info
        if event.kind == "EndpointSlice":
            if old is not None:
                self._unindex_slice(old)
            self._slices_by_service.setdefault((info.namespace, info.service), {})[info.name] = info
        return True

    def _unindex_slice(self, info: EndpointSliceInfo) -> None:
        group = self._slices_by_service.get((info.namespace, info.service))
        if group is not None:
            group.pop(info.name, None)
            if not group:
                del self._slices_by_service[(info.namespace, info.service)]

    def state(self) -> ClusterState:
        """The current state; the same object while nothing changed."""
        if not self._dirty and self._state.revision == self._revision:
            return self._state
        s = self._state
        d = self._dirty

        def frozen(kind: str, current: Mapping[Any, Any]) -> Mapping[Any, Any]:
            return MappingProxyType(dict(self._objects[kind])) if kind in d else current

        slices = s.endpoint_slices
        if "EndpointSlice" in d:
            slices = MappingProxyType(
                {k: tuple(v[n] for n in sorted(v)) for k, v in self._slices_by_service.items()}
            )
        namespaces = s.namespaces
        if "Namespace" in d:
            namespaces = MappingProxyType({k[1]: v for k, v in self._objects["Namespace"].items()})
        self._state = ClusterState(
            revision=self._revision,
            namespaces=namespaces,
            services=frozen("Service", s.services),
            endpoint_slices=slices,
            pods=frozen("Pod", s.pods),
            http_routes=frozen("HTTPRoute", s.http_routes),
            traffic_policies=frozen("TrafficPolicy", s.traffic_policies),
            synced_kinds=frozenset(self._synced),
        )
        self._dirty = set()
        return self._state
