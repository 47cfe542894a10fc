"""The TrafficPolicy CRD (deploy/helm/crds/trafficpolicy.yaml) on a real API server.

What a user relies on: a complete, valid policy is accepted; a bad value is
rejected by ``kubectl apply`` with a message naming the field; ``kubectl get``
shows Target / Timeout / Retries / Accepted / Age.
"""

from __future__ import annotations

import pytest
import yaml

from controlplane.index import parse_traffic_policy
from meshproxy.config.model import LbPolicy, RateLimit
from tests.support.apiserver import ApiServer

pytestmark = pytest.mark.apiserver

FULL_SPEC = {
    "targetRef": {"group": "", "kind": "Service", "name": "inventory"},
    "timeout": "15s",
    "connectTimeout": "1s",
    "idleTimeout": "1m",
    "retries": {
        "attempts": 3,
        "perTryTimeout": "1.5s",
        "retryOn": ["connect-failure", "reset", "5xx", "retriable-status-codes", "unavailable"],
        "statusCodes": [409, 503],
        "budget": {"ratio": 0.2, "minPerSecond": 10, "window": "10s"},
        "maxBodyBytes": 65536,
        "backoff": {"base": "25ms", "max": "250ms"},
    },
    "circuitBreaker": {
        "maxConnections": 100,
        "maxPendingRequests": 100,
        "maxRequests": 1000,
        "maxRetries": 3,
        "consecutiveFailures": 5,
        "openDuration": "5s",
        "maxOpenDuration": "1m",
    },
    "outlierDetection": {
        "enabled": True,
        "consecutive5xx": 5,
        "consecutiveGatewayErrors": 5,
        "consecutiveConnectFailures": 3,
        "baseEjectionTime": "30s",
        "maxEjectionTime": "5m",
        "maxEjectionPercent": 50,
        "minHealthPercent": 0,
    },
    "loadBalancer": "least_request",
    "rateLimit": {"requestsPerSecond": 100, "burst": 20},
    "fault": {"delay": {"percent": 10, "duration": "100ms"}, "abort": {"percent": 1.5, "status": 503}},
}


def _policy(ns: str, name: str, spec: object) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "policy.meshproxy.io/v1alpha1",
            "kind": "TrafficPolicy",
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
        }
    )


def _with(path: str, value: object) -> dict[str, object]:
    """FULL_SPEC with one field (dotted path) replaced; ``...`` deletes it."""
    spec = yaml.safe_load(yaml.safe_dump(FULL_SPEC))
    *parents, leaf = path.split(".")
    node = spec
    for p in parents:
        node = node[p]
    if value is ...:
        del node[leaf]
    else:
        node[leaf] = value
    return spec  # type: ignore[no-any-return]


def test_full_valid_policy_is_accepted_and_stored_as_written(apiserver: ApiServer, namespace: str) -> None:
    apiserver.apply_yaml(_policy(namespace, "full", FULL_SPEC))
    stored = yaml.safe_load(
        apiserver.kubectl("get", "trafficpolicy", "full", "-n", namespace, "-o", "yaml").stdout
    )
    # Nothing pruned: every field the control plane reads is in the schema.
    assert stored["spec"] == FULL_SPEC
    # And the control plane's reference reading understands the stored object.
    info = parse_traffic_policy(stored)
    assert info.error is None
    assert info.target_name == "inventory"
    assert info.policy.timeout == 15.0
    assert info.policy.retry is not None
    assert info.policy.retry.per_try_timeout == 1.5
    assert info.policy.retry.budget.window == 10.0
    assert info.policy.lb is LbPolicy.LEAST_REQUEST
    assert info.policy.rate_limit == RateLimit(requests_per_second=100, burst=20)
    # 0 (panic mode off) is kept, not taken for "unset" (the default is 50).
    assert info.policy.outlier_detection is not None
    assert info.policy.outlier_detection.min_health_percent == 0


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("timeout", "10 seconds", "spec.timeout"),
        ("timeout", "10", "spec.timeout"),
        ("retries.attempts", 11, "spec.retries.attempts"),
        ("retries.attempts", -1, "spec.retries.attempts"),
        ("retries.retryOn", ["sometimes"], "spec.retries.retryOn"),
        ("retries.statusCodes", [700], "spec.retries.statusCodes"),
        ("retries.budget.ratio", -0.5, "spec.retries.budget.ratio"),
        ("retries.budget.window", "forever", "spec.retries.budget.window"),
        ("loadBalancer", "fastest", "spec.loadBalancer"),
        ("targetRef", ..., "spec.targetRef"),
        ("targetRef.kind", "Deployment", "spec.targetRef.kind"),
        ("targetRef.name", "Not_A_Name", "spec.targetRef.name"),
        ("outlierDetection.maxEjectionPercent", 150, "spec.outlierDetection.maxEjectionPercent"),
        ("outlierDetection.minHealthPercent", 150, "spec.outlierDetection.minHealthPercent"),
        ("outlierDetection.minHealthPercent", -1, "spec.outlierDetection.minHealthPercent"),
        ("rateLimit.requestsPerSecond", 0, "spec.rateLimit.requestsPerSecond"),
        ("rateLimit.burst", ..., "spec.rateLimit.burst"),
        ("fault.abort.status", 42, "spec.fault.abort.status"),
        ("fault.delay.percent", 101, "spec.fault.delay.percent"),
        ("circuitBreaker.maxConnections", 0, "spec.circuitBreaker.maxConnections"),
        # Cross-field rules (CEL):
        ("retries.perTryTimeout", "20s", "perTryTimeout must not be longer than timeout"),
        ("retries.statusCodes", ..., "retriable-status-codes needs a non-empty statusCodes"),
        ("retries.backoff.base", "1s", "backoff.base must not be longer than backoff.max"),
        ("circuitBreaker.openDuration", "2m", "openDuration must not be longer than maxOpenDuration"),
        (
            "outlierDetection.baseEjectionTime",
            "10m",
            "baseEjectionTime must not be longer than maxEjectionTime",
        ),
    ],
)
def test_bad_policy_is_rejected_with_a_clear_message(
    apiserver: ApiServer, namespace: str, path: str, value: object, expected: str
) -> None:
    proc = apiserver.apply_yaml(_policy(namespace, "bad", _with(path, value)), check=False)
    assert proc.returncode != 0, f"accepted a bad {path}={value!r}"
    assert "is invalid" in proc.stderr
    assert expected in proc.stderr
    assert apiserver.kubectl("get", "trafficpolicy", "bad", "-n", namespace, check=False).returncode != 0


def kubectl_table(out: str) -> list[dict[str, str]]:
    """Parse ``kubectl get`` table output by the header's column positions (cells may be empty)."""
    header, *rows = out.splitlines()
    names = header.split()
    starts = [header.index(n) for n in names]
    ends = [*starts[1:], None]
    return [{n: row[a:b].strip() for n, a, b in zip(names, starts, ends, strict=True)} for row in rows]


def test_printer_columns(apiserver: ApiServer, namespace: str) -> None:
    apiserver.apply_yaml(_policy(namespace, "cols", FULL_SPEC))
    out = apiserver.kubectl("get", "trafficpolicies", "-n", namespace).stdout
    assert out.splitlines()[0].split() == ["NAME", "TARGET", "TIMEOUT", "RETRIES", "ACCEPTED", "AGE"]
    (row,) = kubectl_table(out)
    assert row["NAME"] == "cols"
    assert row["TARGET"] == "inventory"
    assert row["TIMEOUT"] == "15s"
    assert row["RETRIES"] == "3"
    assert row["ACCEPTED"] == ""  # no status written yet
    assert row["AGE"]
    # The short name and category work too.
    assert "cols" in apiserver.kubectl("get", "mtp", "-n", namespace).stdout
    assert "cols" in apiserver.kubectl("get", "meshproxy", "-n", namespace).stdout
