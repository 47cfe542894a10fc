"""Golden tests: AdmissionReview fixture in, AdmissionReview response + JSONPatch out.

Each ``cases/<name>.json`` holds a review, the namespace object the webhook's
lookup would return, the cluster version and template overrides. The expected
response (with the patch decoded, for review in diffs) is ``golden/<name>.json``.
Regenerate after an intended change with ``MESHPROXY_UPDATE_GOLDEN=1`` and read
the diff before committing it.
"""

from __future__ import annotations

import base64
import json
import os
import pathlib
from typing import Any

import jsonpatch
import pytest

from controlplane import inject

HERE = pathlib.Path(__file__).parent
CASES = sorted(p.stem for p in (HERE / "cases").glob("*.json"))


def load_case(name: str) -> dict[str, Any]:
    case: dict[str, Any] = json.loads((HERE / "cases" / f"{name}.json").read_text())
    return case


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    template = inject.InjectionTemplate.from_json(case.get("template") or {"image": "meshproxy:0.1.0"})
    cluster = inject.ClusterInfo(None)
    if case["cluster"]:
        major, minor = case["cluster"].split(".")
        cluster = inject.ClusterInfo.from_version_info(major, minor)
    outcome = inject.review(case["review"], case["namespace"], template, cluster)
    return inject.admission_response(outcome.uid, outcome.patch, outcome.warnings)


def decoded(reply: dict[str, Any]) -> dict[str, Any]:
    response = dict(reply["response"])
    patch = response.pop("patch", None)
    return {
        "response": response,
        "patch": json.loads(base64.b64decode(patch)) if patch is not None else None,
    }


@pytest.mark.parametrize("name", CASES)
def test_golden(name: str) -> None:
    reply = run_case(load_case(name))
    assert reply["apiVersion"] == "admission.k8s.io/v1"
    assert reply["kind"] == "AdmissionReview"
    got = decoded(reply)
    golden = HERE / "golden" / f"{name}.json"
    if os.environ.get("MESHPROXY_UPDATE_GOLDEN") == "1":
        golden.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n")
    assert got == json.loads(golden.read_text())


@pytest.mark.parametrize("name", CASES)
def test_every_answer_allows_the_pod(name: str) -> None:
    case = load_case(name)
    response = run_case(case)["response"]
    assert response["allowed"] is True
    assert response["uid"] == case["review"]["request"]["uid"]
    if name.startswith("skip_") or name.startswith("warn_"):
        assert "patch" not in response
    else:
        assert response["patchType"] == "JSONPatch"


def patched_pod(name: str) -> dict[str, Any]:
    case = load_case(name)
    patch = decoded(run_case(case))["patch"]
    assert patch is not None
    pod: dict[str, Any] = jsonpatch.apply_patch(case["review"]["request"]["object"], patch)
    return pod


def test_native_sidecar_pod_shape() -> None:
    pod = patched_pod("native_sidecar")
    spec = pod["spec"]
    init_names = [c["name"] for c in spec["initContainers"]]
    assert init_names == ["meshproxy-init", "meshproxy"]
    assert [c["name"] for c in spec["containers"]] == ["inventory"]
    sidecar = spec["initContainers"][1]
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/ready", "port": 15000, "scheme": "HTTP"}
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/ready"
    sc = sidecar["securityContext"]
    assert sc["runAsUser"] == 1357 and sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    env = {e["name"]: e for e in sidecar["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["SERVICE_ACCOUNT"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.serviceAccountName"
    assert env["MESHPROXY_CONTROL_PLANE"]["value"] == "meshproxy-controlplane.meshproxy-system.svc:15010"

    init = spec["initContainers"][0]
    isc = init["securityContext"]
    assert isc["runAsUser"] == 0 and isc["allowPrivilegeEscalation"] is False and isc["privileged"] is False
    assert isc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    assert init["command"] == ["meshproxy"] and init["args"][:2] == ["iptables", "install"]
    args = init["args"]
    # Only the admin port bypasses interception: the app's port stays in the mesh.
    assert "--exclude-inbound-ports" not in args
    assert args[args.index("--admin-port") + 1] == "15000"
    assert args[args.index("--proxy-uid") + 1] == "1357"

    app = spec["containers"][0]
    assert app["livenessProbe"]["httpGet"] == {
        "path": "/app-health/inventory/livez",
        "port": 15000,
        "scheme": "HTTP",
    }
    assert app["livenessProbe"]["periodSeconds"] == 10  # the rest of the probe is kept
    assert app["readinessProbe"]["httpGet"]["path"] == "/app-health/inventory/readyz"
    assert app["startupProbe"] == {
        "httpGet": {"path": "/app-health/inventory/startupz", "port": 15000, "scheme": "HTTP"},
        "failureThreshold": 30,
    }
    probes = json.loads(env["MESHPROXY_APP_PROBES"]["value"])
    assert probes == {
        "/app-health/inventory/livez": {
            "kind": "http",
            "port": 8080,
            "path": "/healthz",
            "scheme": "HTTP",
            "headers": [["X-Probe", "live"]],
            "timeoutSeconds": 2,
        },
        "/app-health/inventory/readyz": {
            "kind": "http",
            "port": 8080,
            "path": "/ready",
            "scheme": "HTTP",
            "headers": [],
            "timeoutSeconds": 1,
        },
        "/app-health/inventory/startupz": {"kind": "tcp", "port": 8080, "timeoutSeconds": 1},
    }
    annotations = pod["metadata"]["annotations"]
    assert annotations["kubectl.kubernetes.io/restartedAt"] == "2025-01-01T00:00:00Z"
    assert json.loads(annotations["meshproxy.io/status"])["nativeSidecar"] is True
    assert {"name": "meshproxy-tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}} in spec["volumes"]


def test_legacy_cluster_gets_a_regular_sidecar_first_and_init_last() -> None:
    pod = patched_pod("legacy_container")
    spec = pod["spec"]
    assert [c["name"] for c in spec["initContainers"]] == ["migrate", "meshproxy-init"]
    assert [c["name"] for c in spec["containers"]] == ["meshproxy", "inventory", "exporter"]
    sidecar = spec["containers"][0]
    assert "restartPolicy" not in sidecar and "startupProbe" not in sidecar
    # Probe rewrites landed on the app containers, not on the shifted indexes.
    inventory = spec["containers"][1]
    assert inventory["livenessProbe"]["httpGet"]["path"] == "/app-health/inventory/livez"
    exporter = spec["containers"][2]
    assert exporter["readinessProbe"] == {
        "httpGet": {"path": "/app-health/exporter/readyz", "port": 15000, "scheme": "HTTP"}
    }
    assert exporter["livenessProbe"]["httpGet"]["path"] == "/app-health/exporter/livez"
    probes = json.loads(
        {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}["MESHPROXY_APP_PROBES"]
    )
    assert probes["/app-health/exporter/readyz"]["scheme"] == "HTTPS"
    assert probes["/app-health/exporter/readyz"]["port"] == 9100  # named port resolved
    assert probes["/app-health/exporter/livez"] == {
        "kind": "grpc",
        "port": 9101,
        "service": "",
        "timeoutSeconds": 1,
    }
    args = spec["initContainers"][1]["args"]
    assert args[args.index("--exclude-inbound-ports") + 1] == "9090,9091"
    assert args[args.index("--exclude-outbound-ports") + 1] == "5432"
    assert args[args.index("--exclude-outbound-cidrs") + 1] == "169.254.169.254/32,10.96.0.0/12"
    annotations = pod["metadata"]["annotations"]
    assert annotations["kubectl.kubernetes.io/default-container"] == "inventory"
    assert annotations["prometheus.io/scrape"] == "false"  # the user's choice is kept
    assert [v["name"] for v in spec["volumes"]] == ["data", "meshproxy-tmp"]


def test_pod_without_annotations_and_template_settings() -> None:
    pod = patched_pod("no_annotations_unknown_version")
    spec = pod["spec"]
    # Unknown server version: the form that works on every cluster.
    assert [c["name"] for c in spec["containers"]] == ["meshproxy", "app"]
    sidecar = spec["containers"][0]
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    assert env["MESHPROXY_TRACING_SAMPLING"] == "1.0"
    assert env["MESHPROXY_OTLP_GRPC_ENDPOINT"] == "http://jaeger-collector.meshproxy-system:4317"
    assert "MESHPROXY_APP_PROBES" not in env
    assert sidecar["resources"] == {
        "limits": {"memory": "256Mi"},
        "requests": {"cpu": "50m", "memory": "64Mi"},
    }
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "15000"


def test_patched_pod_is_not_injected_again() -> None:
    for name in ("native_sidecar", "legacy_container", "pod_opt_in"):
        case = load_case(name)
        case["review"]["request"]["object"] = patched_pod(name)
        assert "patch" not in run_case(case)["response"]


def test_bad_annotation_is_reported_as_a_warning() -> None:
    response = run_case(load_case("warn_bad_exclusion_annotation"))["response"]
    assert response["warnings"] == [
        "meshproxy: sidecar not injected: meshproxy.io/exclude-outbound-ports: 'postgres' is not a port number (1-65535)"
    ]


def test_native_mode_override_and_version_parsing() -> None:
    case = load_case("native_sidecar")
    case["cluster"] = "1.27"
    case["template"] = {"image": "meshproxy:0.1.0", "nativeSidecar": "always"}
    pod = jsonpatch.apply_patch(case["review"]["request"]["object"], decoded(run_case(case))["patch"])
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["meshproxy-init", "meshproxy"]
    assert inject.ClusterInfo.from_version_info("1", "29+").server_version == (1, 29)
    assert inject.ClusterInfo.from_version_info("1", "").server_version is None


@pytest.mark.parametrize(
    ("review", "message"),
    [
        ({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview"}, "expected apiVersion"),
        ({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}, "no request"),
        ({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {}}, "uid"),
        ([], "JSON object"),
    ],
)
def test_malformed_reviews_raise_typed_errors(review: Any, message: str) -> None:
    with pytest.raises(inject.MalformedReviewError, match=message):
        inject.review(review, None, inject.InjectionTemplate(), inject.ClusterInfo(None))


@pytest.mark.parametrize(
    ("template", "path"),
    [
        ({"image": "x", "imag": "typo"}, "imag"),
        ({"image": ""}, "image"),
        ({}, "image"),
        ({"image": "x", "proxyUID": 0}, "proxyUID"),
        ({"image": "x", "tracing": {"sampling": 2}}, "tracing.sampling"),
        ({"image": "x", "nativeSidecar": "maybe"}, "nativeSidecar"),
        ({"image": "x", "ports": {"admin": 70000}}, "ports.admin"),
        ({"image": "x", "resources": {"requets": {}}}, "resources.requets"),
        ({"image": "x", "excludeOutboundCIDRs": ["not-a-cidr"]}, "excludeOutboundCIDRs"),
        ({"image": "x", "extraEnv": {"OTEL_SERVICE_NAME": "x"}}, "extraEnv"),
        ({"image": "x", "extraEnv": ["OTEL_SERVICE_NAME=x"]}, "extraEnv[0]"),
        ({"image": "x", "extraEnv": [{"value": "x"}]}, "extraEnv[0].name"),
        ({"image": "x", "extraEnv": [{"name": "", "value": "x"}]}, "extraEnv[0].name"),
        ({"image": "x", "extraEnv": [{"name": 7, "value": "x"}]}, "extraEnv[0].name"),
        ({"image": "x", "extraEnv": [{"name": "1OTEL", "value": "x"}]}, "extraEnv[0].name"),
        ({"image": "x", "extraEnv": [{"name": "A B", "value": "x"}]}, "extraEnv[0].name"),
        ({"image": "x", "extraEnv": [{"name": "A", "value": "1"}, {"name": "B"}]}, "extraEnv[1]"),
        (
            {"image": "x", "extraEnv": [{"name": "A", "value": "1", "valueFrom": {"fieldRef": {}}}]},
            "extraEnv[0]",
        ),
        ({"image": "x", "extraEnv": [{"name": "A", "value": 2000}]}, "extraEnv[0].value"),
        ({"image": "x", "extraEnv": [{"name": "A", "value": None}]}, "extraEnv[0].value"),
        ({"image": "x", "extraEnv": [{"name": "A", "valueFrom": "metadata.name"}]}, "extraEnv[0].valueFrom"),
        ({"image": "x", "extraEnv": [{"name": "A", "valueFrom": {}}]}, "extraEnv[0].valueFrom"),
        (
            {"image": "x", "extraEnv": [{"name": "A", "valueFrom": {"fieldRef": {}, "secretKeyRef": {}}}]},
            "extraEnv[0].valueFrom",
        ),
        (
            {"image": "x", "extraEnv": [{"name": "A", "valueFrom": {"fieldRef": "x"}}]},
            "extraEnv[0].valueFrom",
        ),
        ({"image": "x", "extraEnv": [{"name": "A", "valeu": "x"}]}, "extraEnv[0].valeu"),
        (
            {
                "image": "x",
                "extraEnv": [
                    {"name": "OTEL_SERVICE_NAME", "value": "a"},
                    {"name": "OTEL_BSP_SCHEDULE_DELAY", "value": "2000"},
                    {"name": "MESHPROXY_LOG_LEVEL", "value": "debug"},
                ],
            },
            "extraEnv[2].name",
        ),
    ],
)
def test_template_errors_name_the_field(template: dict[str, Any], path: str) -> None:
    with pytest.raises(inject.TemplateError) as err:
        inject.InjectionTemplate.from_json(template)
    assert err.value.path == path


def test_probes_that_do_not_target_the_pod_are_left_alone() -> None:
    case = load_case("pod_opt_in")
    app = case["review"]["request"]["object"]["spec"]["containers"][0]
    app["livenessProbe"] = {"exec": {"command": ["true"]}}
    app["readinessProbe"] = {"httpGet": {"host": "example.internal", "path": "/", "port": 80}}
    app["startupProbe"] = {"httpGet": {"path": "/", "port": "missing-name"}}
    pod = jsonpatch.apply_patch(case["review"]["request"]["object"], decoded(run_case(case))["patch"])
    assert pod["spec"]["containers"][-1] == app
    sidecar = pod["spec"]["initContainers"][1]
    assert "MESHPROXY_APP_PROBES" not in {e["name"] for e in sidecar["env"]}


@pytest.mark.parametrize("name", ["native_sidecar", "legacy_container"])
def test_init_container_args_are_what_meshproxy_iptables_accepts(name: str) -> None:
    """Contract with ``meshproxy iptables install``: the injected flags parse to the intended settings."""
    import argparse

    from meshproxy import iptables

    pod = patched_pod(name)
    init = next(c for c in pod["spec"]["initContainers"] if c["name"] == "meshproxy-init")
    assert init["args"][0] == "iptables"
    parser = argparse.ArgumentParser()
    iptables.add_arguments(parser)
    settings = iptables.settings_from(parser.parse_args(init["args"][1:]), {})
    assert settings.proxy_uid == 1357
    assert settings.admin_port == 15000
    assert settings.inbound_port == 15006 and settings.outbound_port == 15001
    if name == "legacy_container":
        assert set(settings.exclude_inbound_ports) == {9090, 9091}
        assert set(settings.exclude_outbound_ports) == {5432}
        assert set(settings.exclude_outbound_cidrs) == {"169.254.169.254/32", "10.96.0.0/12"}


def test_sidecar_args_are_what_meshproxy_run_accepts() -> None:
    """Contract with ``meshproxy run``: the injected command line parses, admin reachable by kubelet."""
    from meshproxy.cli import build_parser

    sidecar = patched_pod("native_sidecar")["spec"]["initContainers"][1]
    assert sidecar["command"] == ["meshproxy"]
    args = build_parser("run").parse_args(sidecar["args"])
    assert args.command == "run"
    assert args.control_plane == ("meshproxy-controlplane.meshproxy-system.svc", 15010)
    assert args.admin_host == "0.0.0.0"


def test_probe_rewriting_can_be_turned_off() -> None:
    case = load_case("native_sidecar")
    case["template"] = {"image": "meshproxy:0.1.0", "rewriteProbes": False}
    original = case["review"]["request"]["object"]["spec"]["containers"][0]
    pod = jsonpatch.apply_patch(case["review"]["request"]["object"], decoded(run_case(case))["patch"])
    assert pod["spec"]["containers"][0] == original
    assert "MESHPROXY_APP_PROBES" not in {e["name"] for e in pod["spec"]["initContainers"][1]["env"]}


# ---- sidecar.extraEnv ----------------------------------------------------------------------------------

EXTRA_ENV = [
    {"name": "OTEL_BSP_SCHEDULE_DELAY", "value": "2000"},
    {"name": "OTEL_SERVICE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
    {"name": "OTEL_EXPORTER_OTLP_HEADERS", "valueFrom": {"secretKeyRef": {"name": "otlp", "key": "headers"}}},
    {"name": "OTEL_RESOURCE_ATTRIBUTES", "value": ""},
]


def sidecar_of(pod: dict[str, Any]) -> dict[str, Any]:
    return next(
        c
        for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]
        if c["name"] == "meshproxy"
    )


def injected_with(name: str, template: dict[str, Any]) -> dict[str, Any]:
    case = load_case(name)
    case["template"] = template
    patch = decoded(run_case(case))["patch"]
    assert patch is not None
    pod: dict[str, Any] = jsonpatch.apply_patch(case["review"]["request"]["object"], patch)
    return pod


@pytest.mark.parametrize("name", ["native_sidecar", "legacy_container"])
def test_extra_env_is_appended_to_the_sidecar_env_in_order(name: str) -> None:
    base = {"image": "meshproxy:0.1.0", "tracing": {"otlpGrpcEndpoint": "http://collector:4317"}}
    own = sidecar_of(injected_with(name, base))["env"]
    sidecar = sidecar_of(injected_with(name, {**base, "extraEnv": EXTRA_ENV}))
    # The injector's variables unchanged and first, then the operator's exactly as written.
    assert sidecar["env"] == own + EXTRA_ENV
    # Only the sidecar gets them.
    pod = injected_with(name, {**base, "extraEnv": EXTRA_ENV})
    for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
        if c["name"] != "meshproxy":
            assert not {e["name"] for e in c.get("env", [])} & {e["name"] for e in EXTRA_ENV}


def test_extra_env_template_field_is_immutable_data() -> None:
    template = inject.InjectionTemplate.from_json({"image": "x", "extraEnv": EXTRA_ENV})
    assert [e.to_json() for e in template.extra_env] == EXTRA_ENV
    assert hash(template) == hash(inject.InjectionTemplate.from_json({"image": "x", "extraEnv": EXTRA_ENV}))
    # Absent and null (an unset chart value) both mean none.
    assert inject.InjectionTemplate.from_json({"image": "x"}).extra_env == ()
    assert inject.InjectionTemplate.from_json({"image": "x", "extraEnv": None}).extra_env == ()


def test_every_variable_the_injector_sets_is_reserved() -> None:
    """No extraEnv entry can shadow (or be shadowed by) a variable the injector sets."""
    everything = {
        "image": "x",
        "tracing": {"otlpGrpcEndpoint": "a", "otlpHttpEndpoint": "b", "zipkinEndpoint": "c"},
    }
    own = {e["name"] for e in sidecar_of(injected_with("native_sidecar", everything))["env"]}
    assert {"POD_NAME", "POD_IP", "MESHPROXY_APP_PROBES", "MESHPROXY_ZIPKIN_ENDPOINT"} <= own
    for name in sorted(own | {"MESHPROXY_SOMETHING_LATER"}):
        with pytest.raises(inject.TemplateError, match="set by the injector") as err:
            inject.InjectionTemplate.from_json({"image": "x", "extraEnv": [{"name": name, "value": "1"}]})
        assert err.value.path == "extraEnv[0].name"
    # Case matters to Kubernetes: a different variable, accepted.
    template = inject.InjectionTemplate.from_json(
        {"image": "x", "extraEnv": [{"name": "pod_ip", "value": "1"}]}
    )
    assert [e.name for e in template.extra_env] == ["pod_ip"]
