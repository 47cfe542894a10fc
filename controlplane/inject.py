"""Sidecar injection: AdmissionReview (admission.k8s.io/v1) Pod CREATE -> JSONPatch.

Owns: the pure decision "inject this pod or not" and the RFC 6902 patch that adds
the ``meshproxy-init`` init container (iptables interception) and the ``meshproxy``
sidecar, rewrites the app's HTTP probes so kubelet reaches them through the
sidecar's admin port, and marks the pod as injected. ``controlplane.webhook`` is
the thin HTTPS shell around it.

Invariants:
  * Never blocks a pod: every outcome here is ``allowed: true``. A reason not to
    inject (opt-out, hostNetwork, bad annotation, ...) yields an allowed response
    without a patch, plus an admission warning when the user should hear about it.
  * Never injects twice: a pod that already carries ``meshproxy.io/status`` or a
    container named ``meshproxy``/``meshproxy-init`` is left alone, so the API
    server's reinvocation and a re-submitted pod are no-ops.
  * Never injects into kube-system (and the other system namespaces), the mesh's
    own namespace, or hostNetwork pods (their iptables rules would be the node's).
  * The output is deterministic: same review + namespace + template + cluster
    version -> byte-identical response (golden tests rely on it).

Where the sidecar lives (``native_sidecar``):
  * Kubernetes >= 1.29: a native sidecar, i.e. an init container with
    ``restartPolicy: Always`` placed right after ``meshproxy-init``, with a
    startupProbe on the admin ``/ready`` so kubelet starts the app's init
    containers and containers only once the proxy is ready, and stops the proxy
    after the app on shutdown.
  * Older clusters: a regular container, first in ``spec.containers``;
    ``meshproxy-init`` then goes *last* among the init containers so the app's own
    init containers (which run before any regular container) still have a network.

Probe rewriting contract (served by the sidecar's admin server on the admin port):
  Every httpGet, tcpSocket and grpc liveness/readiness/startup probe of an app
  container becomes ``httpGet /app-health/<container>/<livez|readyz|startupz>`` on
  the admin port (everything else in the probe -- periods, thresholds -- is kept).
  Kubelet's probe would otherwise hit the pod IP and be redirected to the inbound
  listener (a tcp probe would then always pass, an http probe would need the mesh).
  The sidecar finds the original in the ``MESHPROXY_APP_PROBES`` env var, a JSON
  object keyed by that path, one of:
      {"kind": "http", "port": 8080, "path": "/healthz", "scheme": "HTTP"|"HTTPS",
       "headers": [["name", "value"], ...], "timeoutSeconds": 1}
      {"kind": "tcp", "port": 8080, "timeoutSeconds": 1}
      {"kind": "grpc", "port": 9090, "service": "", "timeoutSeconds": 1}
  performs it against ``127.0.0.1:<port>`` (HTTPS without certificate checks, as
  kubelet does; grpc = grpc.health.v1.Health/Check) and answers 200 on success,
  503 on failure (a non-2xx/3xx status, refused connection, timeout or
  NOT_SERVING), 404 for an unknown path. Probes with an explicit ``host`` are left
  alone (they do not target the pod), as are exec probes. A named port is resolved
  from the container's ports; an unresolvable one leaves the probe unchanged.

Operator environment (``extraEnv`` in the template, the chart's ``sidecar.extraEnv``):
  Kubernetes EnvVar objects appended, in order, to the sidecar's ``env`` after the
  injector's own (typically ``OTEL_*`` variables). They are validated when the
  template is loaded, with the same rules as the chart's schema, because a patch the
  API server rejects would fail the pod's creation: a name matching
  ``[-._a-zA-Z][-._a-zA-Z0-9]*`` and exactly one of ``value`` (a string) or
  ``valueFrom`` (an object with one source). The injector's own variables cannot be
  overridden: ``RESERVED_ENV_NAMES`` and any name starting with
  ``RESERVED_ENV_PREFIX`` (``MESHPROXY_``) are rejected, so a later injector variable
  can never be shadowed by, or silently shadow, an operator's entry.

Concurrency: none; pure functions over plain JSON data.
"""

from __future__ import annotations

import base64
import enum
import ipaddress
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Json = dict[str, Any]
JsonPatch = list[Json]

ANNOTATION_INJECT = "meshproxy.io/inject"
ANNOTATION_STATUS = "meshproxy.io/status"
ANNOTATION_EXCLUDE_INBOUND_PORTS = "meshproxy.io/exclude-inbound-ports"
ANNOTATION_EXCLUDE_OUTBOUND_PORTS = "meshproxy.io/exclude-outbound-ports"
ANNOTATION_EXCLUDE_OUTBOUND_CIDRS = "meshproxy.io/exclude-outbound-cidrs"
ANNOTATION_DEFAULT_CONTAINER = "kubectl.kubernetes.io/default-container"

SIDECAR_NAME = "meshproxy"
INIT_NAME = "meshproxy-init"
TMP_VOLUME = "meshproxy-tmp"
APP_PROBES_ENV = "MESHPROXY_APP_PROBES"

# The sidecar's downward-API variables. Every other variable the injector sets starts
# with RESERVED_ENV_PREFIX; together they are what the template's extraEnv may not name.
_FIELD_ENV = (
    ("POD_NAME", "metadata.name"),
    ("POD_NAMESPACE", "metadata.namespace"),
    ("POD_IP", "status.podIP"),
    ("SERVICE_ACCOUNT", "spec.serviceAccountName"),
    ("NODE_NAME", "spec.nodeName"),
)
RESERVED_ENV_NAMES = frozenset(name for name, _ in _FIELD_ENV)
RESERVED_ENV_PREFIX = "MESHPROXY_"
# Kubernetes' classic EnvVar name rule (accepted by every supported version; 1.34's
# relaxed rule accepts more, but a name outside this one would break older clusters).
_ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")

SYSTEM_NAMESPACES = frozenset({"kube-system", "kube-public", "kube-node-lease"})
# Kubernetes made native sidecars (SidecarContainers) beta and on by default in 1.29.
NATIVE_SIDECAR_MIN_VERSION = (1, 29)
_PROBE_KINDS = (("livenessProbe", "livez"), ("readinessProbe", "readyz"), ("startupProbe", "startupz"))


class InjectionError(Exception):
    """Base of the injector's errors; the webhook turns each into an allowed response + warning."""


class MalformedReviewError(InjectionError):
    """The AdmissionReview or the pod in it is not what admission.k8s.io/v1 promises."""


class TemplateError(InjectionError):
    """The injection template (the chart's ConfigMap) is invalid. ``path`` names the field."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


class AnnotationError(InjectionError):
    """A pod annotation the injector reads has a value it cannot use."""


class NativeSidecarMode(enum.Enum):
    AUTO = "auto"  # native when the cluster is >= 1.29
    ALWAYS = "always"
    NEVER = "never"


@dataclass(frozen=True, slots=True)
class Ports:
    admin: int = 15000
    outbound: int = 15001
    inbound: int = 15006


@dataclass(frozen=True, slots=True)
class TracingTemplate:
    sampling: float = 0.01  # low by default: every sampled request costs an exported span
    otlp_grpc_endpoint: str = ""
    otlp_http_endpoint: str = ""
    zipkin_endpoint: str = ""


@dataclass(frozen=True, slots=True)
class EnvVar:
    """One validated ``extraEnv`` entry: a Kubernetes EnvVar with ``value`` or ``valueFrom``.

    ``value_from`` is the ``valueFrom`` object as canonical JSON text (sorted keys), so
    the template stays deeply immutable and hashable; ``to_json`` gives the EnvVar back.
    """

    name: str
    value: str | None = None
    value_from: str | None = None

    def to_json(self) -> Json:
        if self.value_from is not None:
            value_from: Json = json.loads(self.value_from)
            return {"name": self.name, "valueFrom": value_from}
        return {"name": self.name, "value": self.value}


@dataclass(frozen=True, slots=True)
class InjectionTemplate:
    """What the chart's values say every injected pod gets (the mounted ConfigMap)."""

    image: str = "meshproxy:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    proxy_uid: int = 1357  # not 1337/2102/5678: those belong to other meshes
    log_level: str = "info"
    control_plane_address: str = "meshproxy-controlplane.meshproxy-system.svc:15010"
    mesh_namespace: str = "meshproxy-system"
    native_sidecar: NativeSidecarMode = NativeSidecarMode.AUTO
    ports: Ports = field(default_factory=Ports)
    # Kubernetes ResourceRequirements, kept as JSON (already validated by the chart's schema).
    resources: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()
    init_resources: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()
    tracing: TracingTemplate = field(default_factory=TracingTemplate)
    prometheus_annotations: bool = True
    exclude_outbound_cidrs: tuple[str, ...] = ()  # mesh-wide, added to each pod's own
    # Send kubelet's probes through the sidecar's /app-health (see the module docstring).
    # Off: probes stay as written and reach the app through the inbound listener.
    rewrite_probes: bool = True
    # Appended to the sidecar's env after the injector's own (see the module docstring).
    extra_env: tuple[EnvVar, ...] = ()

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> InjectionTemplate:
        """Build from the ConfigMap's JSON (camelCase keys, as rendered by the chart)."""
        if not isinstance(data, Mapping):
            raise TemplateError("", "the injection template must be a JSON object")
        known = {
            "image",
            "imagePullPolicy",
            "proxyUID",
            "logLevel",
            "controlPlaneAddress",
            "meshNamespace",
            "nativeSidecar",
            "ports",
            "resources",
            "initResources",
            "tracing",
            "prometheusAnnotations",
            "excludeOutboundCIDRs",
            "rewriteProbes",
            "extraEnv",
        }
        unknown = sorted(set(data) - known)
        if unknown:
            raise TemplateError(unknown[0], "unknown field")
        d = InjectionTemplate()
        ports = _obj(data, "ports")
        tracing = _obj(data, "tracing")
        try:
            native = NativeSidecarMode(data.get("nativeSidecar", d.native_sidecar.value))
        except ValueError:
            raise TemplateError("nativeSidecar", "must be one of auto, always, never") from None
        sampling = tracing.get("sampling", d.tracing.sampling)
        if not isinstance(sampling, int | float) or isinstance(sampling, bool) or not 0.0 <= sampling <= 1.0:
            raise TemplateError("tracing.sampling", "must be a number in [0, 1]")
        cidrs = data.get("excludeOutboundCIDRs", [])
        if not isinstance(cidrs, list):
            raise TemplateError("excludeOutboundCIDRs", "must be a list")
        try:
            cidr_list = _cidrs(",".join(str(c) for c in cidrs))
        except AnnotationError as e:
            raise TemplateError("excludeOutboundCIDRs", str(e)) from None
        return InjectionTemplate(
            image=_str(data, "image", d.image, required=True),
            image_pull_policy=_str(data, "imagePullPolicy", d.image_pull_policy),
            proxy_uid=_int(data, "proxyUID", d.proxy_uid, 1, 2**31 - 1),
            log_level=_str(data, "logLevel", d.log_level),
            control_plane_address=_str(data, "controlPlaneAddress", d.control_plane_address, nonempty=True),
            mesh_namespace=_str(data, "meshNamespace", d.mesh_namespace, nonempty=True),
            native_sidecar=native,
            ports=Ports(
                admin=_int(ports, "admin", d.ports.admin, 1, 65535, "ports."),
                outbound=_int(ports, "outbound", d.ports.outbound, 1, 65535, "ports."),
                inbound=_int(ports, "inbound", d.ports.inbound, 1, 65535, "ports."),
            ),
            resources=_resources(data, "resources"),
            init_resources=_resources(data, "initResources"),
            tracing=TracingTemplate(
                sampling=float(sampling),
                otlp_grpc_endpoint=_str(tracing, "otlpGrpcEndpoint", "", prefix="tracing."),
                otlp_http_endpoint=_str(tracing, "otlpHttpEndpoint", "", prefix="tracing."),
                zipkin_endpoint=_str(tracing, "zipkinEndpoint", "", prefix="tracing."),
            ),
            prometheus_annotations=bool(data.get("prometheusAnnotations", d.prometheus_annotations)),
            exclude_outbound_cidrs=tuple(cidr_list),
            rewrite_probes=bool(data.get("rewriteProbes", d.rewrite_probes)),
            extra_env=_extra_env(data.get("extraEnv")),
        )


@dataclass(frozen=True, slots=True)
class ClusterInfo:
    """What the injector knows about the cluster: the API server's version (None: unknown)."""

    server_version: tuple[int, int] | None = None

    @staticmethod
    def from_version_info(major: str, minor: str) -> ClusterInfo:
        """From ``/version``'s ``major``/``minor`` (minor may carry a ``+``, e.g. ``"29+"`` on GKE)."""
        try:
            return ClusterInfo((int(major.strip("+")), int(minor.strip("+"))))
        except ValueError:
            return ClusterInfo(None)


@dataclass(frozen=True, slots=True)
class Decision:
    inject: bool
    reason: str  # why (for logs and, when not injected by a pod's own error, the warning)
    warn: bool = False  # tell the user (admission warning): they probably expected injection


@dataclass(frozen=True, slots=True)
class AdmissionRequest:
    """The parts of ``AdmissionReview.request`` the injector uses."""

    uid: str
    kind: str
    operation: str
    namespace: str
    pod: Json


@dataclass(frozen=True, slots=True)
class Outcome:
    """The injector's answer for one request: a patch (or none) and warnings."""

    uid: str
    patch: JsonPatch | None
    warnings: tuple[str, ...] = ()
    reason: str = ""


# ---- parsing ------------------------------------------------------------------------------------------


def parse_review(review: Any) -> AdmissionRequest:
    """Validate the envelope of an ``admission.k8s.io/v1`` AdmissionReview."""
    if not isinstance(review, dict):
        raise MalformedReviewError("AdmissionReview must be a JSON object")
    if review.get("apiVersion") != "admission.k8s.io/v1" or review.get("kind") != "AdmissionReview":
        raise MalformedReviewError("expected apiVersion admission.k8s.io/v1, kind AdmissionReview")
    request = review.get("request")
    if not isinstance(request, dict):
        raise MalformedReviewError("AdmissionReview has no request")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise MalformedReviewError("request.uid is missing")
    kind = request.get("kind") or {}
    obj = request.get("object")
    return AdmissionRequest(
        uid=uid,
        kind=str(kind.get("kind", "")) if isinstance(kind, dict) else "",
        operation=str(request.get("operation", "")),
        namespace=str(request.get("namespace") or ""),
        pod=obj if isinstance(obj, dict) else {},
    )


def review_uid(review: Any) -> str:
    """The request uid if there is one (for answering even a malformed review)."""
    if isinstance(review, dict):
        request = review.get("request")
        if isinstance(request, dict) and isinstance(request.get("uid"), str):
            return str(request["uid"])
    return ""


# ---- decision -----------------------------------------------------------------------------------------


def decide(
    req: AdmissionRequest, namespace: Mapping[str, Any] | None, template: InjectionTemplate
) -> Decision:
    """Whether to inject. ``namespace`` is the Namespace object (None: not found)."""
    if req.kind != "Pod" or req.operation != "CREATE":
        return Decision(False, f"not a Pod CREATE ({req.kind} {req.operation})")
    ns = req.namespace or str(_meta(req.pod).get("namespace") or "")
    if ns in SYSTEM_NAMESPACES or ns == template.mesh_namespace:
        return Decision(False, f"namespace {ns} is never injected")
    spec = req.pod.get("spec")
    if not isinstance(spec, dict):
        raise MalformedReviewError("pod has no spec")
    if spec.get("hostNetwork") is True:
        return Decision(False, "hostNetwork pod")
    annotations = _labels(req.pod, "annotations")
    if ANNOTATION_STATUS in annotations or _has_mesh_container(spec):
        return Decision(False, "already injected")
    pod_choice = annotations.get(ANNOTATION_INJECT, _labels(req.pod, "labels").get(ANNOTATION_INJECT))
    if pod_choice == "disabled":
        return Decision(False, "pod opted out (meshproxy.io/inject: disabled)")
    ns_obj: Mapping[str, Any] = namespace or {}
    ns_choice = _labels(ns_obj, "annotations").get(
        ANNOTATION_INJECT, _labels(ns_obj, "labels").get(ANNOTATION_INJECT)
    )
    if ns_choice == "disabled":
        return Decision(False, f"namespace {ns} opted out")
    if pod_choice == "enabled":
        return Decision(True, "pod opted in (meshproxy.io/inject: enabled)")
    if ns_choice == "enabled":
        return Decision(True, f"namespace {ns} has meshproxy.io/inject: enabled")
    return Decision(False, f"namespace {ns} is not enabled for injection")


# ---- the patch ----------------------------------------------------------------------------------------


def build_patch(pod: Json, template: InjectionTemplate, cluster: ClusterInfo) -> JsonPatch:
    """The JSONPatch that injects ``pod``. Raises AnnotationError for unusable exclusion annotations."""
    spec: Json = pod["spec"]
    annotations = _labels(pod, "annotations")
    containers: list[Json] = list(spec.get("containers") or [])
    if not containers:
        raise MalformedReviewError("pod has no containers")
    init_containers: list[Json] = list(spec.get("initContainers") or [])
    native = _use_native(template, cluster)

    inbound_excl = _ports(
        annotations.get(ANNOTATION_EXCLUDE_INBOUND_PORTS, ""), ANNOTATION_EXCLUDE_INBOUND_PORTS
    )
    outbound_excl = _ports(
        annotations.get(ANNOTATION_EXCLUDE_OUTBOUND_PORTS, ""), ANNOTATION_EXCLUDE_OUTBOUND_PORTS
    )
    cidrs = [
        *template.exclude_outbound_cidrs,
        *_cidrs(annotations.get(ANNOTATION_EXCLUDE_OUTBOUND_CIDRS, "")),
    ]

    probe_ops: JsonPatch = []
    app_probes: Json = {}
    if template.rewrite_probes:
        probe_ops, app_probes = _rewrite_probes(containers, template.ports.admin)

    init = _init_container(template, inbound_excl, outbound_excl, cidrs)
    sidecar = _sidecar_container(template, app_probes, native)
    ops: JsonPatch = []

    status = {
        "version": 1,
        "initContainers": [INIT_NAME, SIDECAR_NAME] if native else [INIT_NAME],
        "containers": [] if native else [SIDECAR_NAME],
        "volumes": [TMP_VOLUME],
        "nativeSidecar": native,
    }
    new_annotations: list[tuple[str, str]] = [(ANNOTATION_STATUS, json.dumps(status, sort_keys=True))]
    if not native and ANNOTATION_DEFAULT_CONTAINER not in annotations:
        # The sidecar becomes containers[0]; keep `kubectl logs/exec` defaulting to the app.
        new_annotations.append((ANNOTATION_DEFAULT_CONTAINER, str(containers[0].get("name", ""))))
    if template.prometheus_annotations and "prometheus.io/scrape" not in annotations:
        new_annotations += [
            ("prometheus.io/scrape", "true"),
            ("prometheus.io/port", str(template.ports.admin)),
            ("prometheus.io/path", "/metrics"),
        ]
    if "annotations" not in (pod.get("metadata") or {}) or pod["metadata"]["annotations"] is None:
        if "metadata" not in pod:
            ops.append({"op": "add", "path": "/metadata", "value": {}})
        ops.append({"op": "add", "path": "/metadata/annotations", "value": dict(new_annotations)})
    else:
        for key, value in new_annotations:
            ops.append({"op": "add", "path": "/metadata/annotations/" + _escape(key), "value": value})

    if native:
        # Right at the start: interception first, then the proxy, then the app's own init
        # containers, which thereby already run with a working mesh.
        if init_containers:
            ops.append({"op": "add", "path": "/spec/initContainers/0", "value": init})
            ops.append({"op": "add", "path": "/spec/initContainers/1", "value": sidecar})
        else:
            ops.append({"op": "add", "path": "/spec/initContainers", "value": [init, sidecar]})
    else:
        if init_containers:
            ops.append({"op": "add", "path": "/spec/initContainers/-", "value": init})
        else:
            ops.append({"op": "add", "path": "/spec/initContainers", "value": [init]})

    # Probe paths index spec.containers as submitted; apply them before the sidecar shifts indexes.
    ops += probe_ops
    if not native:
        ops.append({"op": "add", "path": "/spec/containers/0", "value": sidecar})

    tmp_volume = {"name": TMP_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}}
    if spec.get("volumes"):
        ops.append({"op": "add", "path": "/spec/volumes/-", "value": tmp_volume})
    else:
        ops.append({"op": "add", "path": "/spec/volumes", "value": [tmp_volume]})
    return ops


def review(
    review_obj: Any,
    namespace: Mapping[str, Any] | None,
    template: InjectionTemplate,
    cluster: ClusterInfo,
) -> Outcome:
    """Decide and, if injecting, build the patch. Raises InjectionError subclasses."""
    req = parse_review(review_obj)
    decision = decide(req, namespace, template)
    if not decision.inject:
        return Outcome(req.uid, None, reason=decision.reason)
    try:
        patch = build_patch(req.pod, template, cluster)
    except AnnotationError as e:
        return Outcome(req.uid, None, (f"meshproxy: sidecar not injected: {e}",), reason=str(e))
    return Outcome(req.uid, patch, reason=decision.reason)


def admission_response(uid: str, patch: JsonPatch | None, warnings: Sequence[str] = ()) -> Json:
    """The AdmissionReview v1 reply: always allowed; the patch base64-encoded when there is one."""
    response: Json = {"uid": uid, "allowed": True}
    if patch is not None:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch, separators=(",", ":")).encode()).decode()
    if warnings:
        response["warnings"] = list(warnings)
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}


def pod_display_name(pod: Mapping[str, Any]) -> str:
    """The pod's name for logs; ``generateName`` + ``*`` when the API server has not named it yet."""
    meta = _meta(pod)
    return str(meta.get("name") or (str(meta.get("generateName") or "") + "*"))


# ---- containers ---------------------------------------------------------------------------------------


def _use_native(template: InjectionTemplate, cluster: ClusterInfo) -> bool:
    if template.native_sidecar is NativeSidecarMode.ALWAYS:
        return True
    if template.native_sidecar is NativeSidecarMode.NEVER:
        return False
    # Unknown version: the regular-container form works everywhere.
    return cluster.server_version is not None and cluster.server_version >= NATIVE_SIDECAR_MIN_VERSION


def _init_container(
    t: InjectionTemplate, inbound_excl: list[int], outbound_excl: list[int], cidrs: list[str]
) -> Json:
    args = [
        "iptables",
        "install",
        "--proxy-uid",
        str(t.proxy_uid),
        "--inbound-port",
        str(t.ports.inbound),
        "--outbound-port",
        str(t.ports.outbound),
        # Never intercepted: kubelet probes the admin port (and, through it, the app).
        "--admin-port",
        str(t.ports.admin),
    ]
    if inbound_excl:
        args += ["--exclude-inbound-ports", ",".join(str(p) for p in inbound_excl)]
    if outbound_excl:
        args += ["--exclude-outbound-ports", ",".join(str(p) for p in outbound_excl)]
    if cidrs:
        args += ["--exclude-outbound-cidrs", ",".join(cidrs)]
    c: Json = {
        "name": INIT_NAME,
        "image": t.image,
        "imagePullPolicy": t.image_pull_policy,
        "command": ["meshproxy"],
        "args": args,
        "securityContext": {
            # Root only for the iptables call, and only the two network capabilities.
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "privileged": False,
            "allowPrivilegeEscalation": False,
            # iptables may take its xtables lock under /run.
            "readOnlyRootFilesystem": False,
            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]},
        },
    }
    if t.init_resources:
        c["resources"] = _resources_json(t.init_resources)
    return c


def _sidecar_container(t: InjectionTemplate, app_probes: Json, native: bool) -> Json:
    def field_env(name: str, path: str) -> Json:
        return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}

    env: list[Json] = [
        *(field_env(name, path) for name, path in _FIELD_ENV),
        {"name": "MESHPROXY_CONTROL_PLANE", "value": t.control_plane_address},
        {"name": "MESHPROXY_LOG_LEVEL", "value": t.log_level},
        {"name": "MESHPROXY_ADMIN_PORT", "value": str(t.ports.admin)},
        {"name": "MESHPROXY_INBOUND_PORT", "value": str(t.ports.inbound)},
        {"name": "MESHPROXY_OUTBOUND_PORT", "value": str(t.ports.outbound)},
        {"name": "MESHPROXY_TRACING_SAMPLING", "value": repr(t.tracing.sampling)},
        # On the pod's emptyDir: a restarted sidecar serves its last good config at once.
        {"name": "MESHPROXY_CONFIG_CACHE", "value": "/tmp/meshproxy-config-cache.json"},
    ]
    for name, value in (
        ("MESHPROXY_OTLP_GRPC_ENDPOINT", t.tracing.otlp_grpc_endpoint),
        ("MESHPROXY_OTLP_HTTP_ENDPOINT", t.tracing.otlp_http_endpoint),
        ("MESHPROXY_ZIPKIN_ENDPOINT", t.tracing.zipkin_endpoint),
    ):
        if value:
            env.append({"name": name, "value": value})
    if app_probes:
        env.append(
            {"name": APP_PROBES_ENV, "value": json.dumps(app_probes, sort_keys=True, separators=(",", ":"))}
        )
    # Last, so the order is the injector's then the operator's (names never collide:
    # from_json rejects the reserved ones).
    env += [e.to_json() for e in t.extra_env]

    ready = {"httpGet": {"path": "/ready", "port": t.ports.admin, "scheme": "HTTP"}}
    c: Json = {
        "name": SIDECAR_NAME,
        "image": t.image,
        "imagePullPolicy": t.image_pull_policy,
        "command": ["meshproxy"],
        # The admin server binds loopback by default; kubelet's probes and Prometheus come
        # from outside the pod (/quitquitquit still refuses non-loopback peers).
        "args": ["run", "--control-plane", t.control_plane_address, "--admin-host", "0.0.0.0"],
        "env": env,
        "ports": [{"name": "mesh-admin", "containerPort": t.ports.admin, "protocol": "TCP"}],
        "readinessProbe": {**ready, "periodSeconds": 5, "failureThreshold": 3, "timeoutSeconds": 1},
        "securityContext": {
            "runAsUser": t.proxy_uid,
            "runAsGroup": t.proxy_uid,
            "runAsNonRoot": True,
            "privileged": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": TMP_VOLUME, "mountPath": "/tmp"}],
    }
    if native:
        c["restartPolicy"] = "Always"
        # kubelet starts the next container only once this probe succeeds: the app never
        # starts with its traffic redirected to a proxy that is not listening yet.
        c["startupProbe"] = {**ready, "periodSeconds": 1, "failureThreshold": 600, "timeoutSeconds": 1}
    if t.resources:
        c["resources"] = _resources_json(t.resources)
    return c


def _rewrite_probes(containers: list[Json], admin_port: int) -> tuple[JsonPatch, Json]:
    """Patch ops for the app's probes, and the originals for ``MESHPROXY_APP_PROBES``."""
    ops: JsonPatch = []
    originals: Json = {}
    for i, container in enumerate(containers):
        name = str(container.get("name", ""))
        for field_name, short in _PROBE_KINDS:
            probe = container.get(field_name)
            if not isinstance(probe, dict):
                continue
            original = _original_probe(container, probe)
            if original is None:
                continue
            path = f"/app-health/{name}/{short}"
            originals[path] = original
            new_probe = {k: v for k, v in probe.items() if k not in ("httpGet", "tcpSocket", "grpc", "exec")}
            new_probe["httpGet"] = {"path": path, "port": admin_port, "scheme": "HTTP"}
            ops.append({"op": "replace", "path": f"/spec/containers/{i}/{field_name}", "value": new_probe})
    return ops, originals


def _original_probe(container: Mapping[str, Any], probe: Mapping[str, Any]) -> Json | None:
    timeout = probe.get("timeoutSeconds", 1)
    timeout = timeout if isinstance(timeout, int) and not isinstance(timeout, bool) and timeout > 0 else 1
    http, tcp, grpc = probe.get("httpGet"), probe.get("tcpSocket"), probe.get("grpc")
    if isinstance(http, dict):
        port = _resolve_port(container, http.get("port"))
        scheme = str(http.get("scheme") or "HTTP").upper()
        if port is None or http.get("host") or scheme not in ("HTTP", "HTTPS"):
            return None
        headers = [[str(h.get("name", "")), str(h.get("value", ""))] for h in http.get("httpHeaders") or []]
        path = str(http.get("path") or "/")
        return {
            "kind": "http",
            "port": port,
            "path": path,
            "scheme": scheme,
            "headers": headers,
            "timeoutSeconds": timeout,
        }
    if isinstance(tcp, dict):
        port = _resolve_port(container, tcp.get("port"))
        if port is None or tcp.get("host"):
            return None
        return {"kind": "tcp", "port": port, "timeoutSeconds": timeout}
    if isinstance(grpc, dict):
        port = _resolve_port(container, grpc.get("port"))
        if port is None:
            return None
        return {
            "kind": "grpc",
            "port": port,
            "service": str(grpc.get("service") or ""),
            "timeoutSeconds": timeout,
        }
    return None


def _resolve_port(container: Mapping[str, Any], port: Any) -> int | None:
    if isinstance(port, int) and not isinstance(port, bool):
        return port if 0 < port < 65536 else None
    if isinstance(port, str):
        if port.isdigit():
            return _resolve_port(container, int(port))
        for p in container.get("ports") or []:
            if isinstance(p, dict) and p.get("name") == port and isinstance(p.get("containerPort"), int):
                return int(p["containerPort"])
    return None


# ---- small helpers ------------------------------------------------------------------------------------


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _labels(obj: Mapping[str, Any], which: str) -> dict[str, str]:
    value = _meta(obj).get(which)
    if not isinstance(value, Mapping):
        return {}
    return {str(k): str(v) for k, v in value.items()}


def _has_mesh_container(spec: Mapping[str, Any]) -> bool:
    for key in ("containers", "initContainers"):
        for c in spec.get(key) or []:
            if isinstance(c, dict) and c.get("name") in (SIDECAR_NAME, INIT_NAME):
                return True
    return False


def _escape(key: str) -> str:
    """RFC 6901 JSON pointer escaping (annotation keys contain '/')."""
    return key.replace("~", "~0").replace("/", "~1")


def _ports(value: str, what: str) -> list[int]:
    out: set[int] = set()
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit() or not 0 < int(part) < 65536:
            raise AnnotationError(f"{what}: {part!r} is not a port number (1-65535)")
        out.add(int(part))
    return sorted(out)


def _cidrs(value: str) -> list[str]:
    out: list[str] = []
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            net = str(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise AnnotationError(f"{ANNOTATION_EXCLUDE_OUTBOUND_CIDRS}: {part!r} is not a CIDR") from None
        if net not in out:
            out.append(net)
    return out


def _obj(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        raise TemplateError(key, "must be an object")
    return value


def _str(
    data: Mapping[str, Any],
    key: str,
    default: str,
    *,
    required: bool = False,
    nonempty: bool = False,
    prefix: str = "",
) -> str:
    if required and key not in data:
        raise TemplateError(prefix + key, "is required")
    nonempty = nonempty or required
    value = data.get(key, default)
    if value is None:
        value = ""
    if not isinstance(value, str) or (nonempty and not value):
        raise TemplateError(prefix + key, "must be a non-empty string" if nonempty else "must be a string")
    return value


def _int(data: Mapping[str, Any], key: str, default: int, lo: int, hi: int, prefix: str = "") -> int:
    value = data.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise TemplateError(prefix + key, f"must be an integer in [{lo}, {hi}]")
    return value


def _resources(data: Mapping[str, Any], key: str) -> tuple[tuple[str, tuple[tuple[str, str], ...]], ...]:
    value = data.get(key) or {}
    if not isinstance(value, Mapping):
        raise TemplateError(key, "must be an object (requests/limits)")
    out = []
    for section in sorted(value):
        if section not in ("requests", "limits"):
            raise TemplateError(f"{key}.{section}", "only requests and limits are supported")
        quantities = value[section] or {}
        if not isinstance(quantities, Mapping):
            raise TemplateError(f"{key}.{section}", "must be an object")
        out.append((section, tuple(sorted((str(k), str(v)) for k, v in quantities.items()))))
    return tuple(out)


def _extra_env(value: Any) -> tuple[EnvVar, ...]:
    if value is None:  # absent, or rendered from an unset value
        return ()
    if not isinstance(value, list):
        raise TemplateError("extraEnv", "must be a list of EnvVar objects")
    out: list[EnvVar] = []
    for i, entry in enumerate(value):
        path = f"extraEnv[{i}]"
        if not isinstance(entry, Mapping):
            raise TemplateError(path, "must be an object with name and value or valueFrom")
        unknown = sorted(set(entry) - {"name", "value", "valueFrom"})
        if unknown:
            raise TemplateError(
                f"{path}.{unknown[0]}", "unknown field (an EnvVar has name, value, valueFrom)"
            )
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise TemplateError(f"{path}.name", "must be a non-empty string")
        if not _ENV_NAME.fullmatch(name):
            raise TemplateError(f"{path}.name", f"{name!r} is not a valid environment variable name")
        if name in RESERVED_ENV_NAMES or name.startswith(RESERVED_ENV_PREFIX):
            raise TemplateError(
                f"{path}.name",
                f"{name} is set by the injector (reserved: {', '.join(sorted(RESERVED_ENV_NAMES))}"
                f" and {RESERVED_ENV_PREFIX}*)",
            )
        if ("value" in entry) == ("valueFrom" in entry):
            raise TemplateError(path, "needs exactly one of value or valueFrom")
        if "value" in entry:
            if not isinstance(entry["value"], str):
                raise TemplateError(f"{path}.value", "must be a string (quote numbers)")
            out.append(EnvVar(name, value=entry["value"]))
            continue
        source = entry["valueFrom"]
        if (
            not isinstance(source, Mapping)
            or len(source) != 1
            or not all(isinstance(v, Mapping) for v in source.values())
        ):
            raise TemplateError(
                f"{path}.valueFrom", "must be an object with exactly one source (e.g. fieldRef, secretKeyRef)"
            )
        out.append(EnvVar(name, value_from=json.dumps(source, sort_keys=True, separators=(",", ":"))))
    return tuple(out)


def _resources_json(resources: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]) -> Json:
    return {section: dict(quantities) for section, quantities in resources}
