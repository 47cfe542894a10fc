"""Static config loader: schema, durations, field-path errors, consistency checks, dump round trip."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from meshproxy.config.load import dump, load_dict, load_file, parse_duration
from meshproxy.config.model import (
    Endpoint,
    HeaderMatchKind,
    LbPolicy,
    PathMatchKind,
    Protocol,
    Route,
    Service,
    Snapshot,
    TrafficPolicy,
    content_version,
)
from meshproxy.core.errors import ConfigError

YAML = """
workload: {name: shop, namespace: demo, labels: {app: shop}}
services:
  - name: inventory
    namespace: demo
    port: 8080
    protocol: http1
    vips: [198.18.0.10]
    hostnames: [inventory, inventory.demo]
    endpoints:
      - {address: 198.18.1.1, port: 8080, pod: inventory-v1-abc}
    routes:
      - name: split
        matches:
          - path: {kind: prefix, value: /api}
            method: GET
            headers: [{name: X-Canary, value: "y.*", kind: regex}]
        backends:
          - {service: "inventory-v1.demo:8080", weight: 90}
          - {service: "inventory-v2.demo:8080", weight: 10}
        timeout: 250ms
        request_headers: {set: {x-route: split}, remove: [x-debug]}
    policy:
      timeout: 2s
      connect_timeout: 0.5
      lb: round_robin
      retry: {attempts: 3, retry_on: [5xx, connect-failure], per_try_timeout: 1m30s, budget: {window: 1m}}
      circuit_breaker: {max_requests: 100, consecutive_failures: 5, open_duration: 10s}
      outlier_detection: null
      rate_limit: {requests_per_second: 50, burst: 100}
      fault: {abort_percent: 12.5, abort_status: 503}
  - {name: inventory-v1, namespace: demo, port: 8080}
  - {name: inventory-v2, namespace: demo, port: 8080}
inbound:
  ports: [{port: 8080, protocol: http2, service: inventory}]
  opaque_ports: [3306]
telemetry:
  access_log: sampled
  tracing: {sampling_ratio: 0.5, propagation: [w3c, b3]}
"""


def valid() -> dict[str, Any]:
    return {
        "services": [
            {
                "name": "inventory",
                "namespace": "demo",
                "port": 8080,
                "routes": [{"name": "r", "backends": [{"service": "inventory-v1.demo:8080"}]}],
            },
            {"name": "inventory-v1", "namespace": "demo", "port": 8080},
        ]
    }


def test_full_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(YAML)
    snap = load_file(path)
    assert snap.version == content_version(snap) and len(snap.version) == 16
    inv = snap.services[0]
    assert inv.key == "inventory.demo:8080" and inv.protocol is Protocol.HTTP1
    route = inv.routes[0]
    assert route.timeout == 0.25
    assert route.matches[0].path is not None and route.matches[0].path.kind is PathMatchKind.PREFIX
    header = route.matches[0].headers[0]
    assert header.name == "x-canary" and header.kind is HeaderMatchKind.REGEX  # names lower-cased
    assert route.request_headers.set == (("x-route", "split"),)
    assert [b.weight for b in route.backends] == [90, 10]
    p = inv.policy
    assert p.timeout == 2.0 and p.lb is LbPolicy.ROUND_ROBIN and p.outlier_detection is None
    assert p.retry is not None and p.retry.per_try_timeout == 90.0 and p.retry.budget.window == 60.0
    assert p.retry.retry_on == frozenset({"5xx", "connect-failure"})
    assert p.circuit_breaker.open_duration == 10.0 and p.circuit_breaker.max_requests == 100
    assert p.fault is not None and p.fault.abort_percent == 12.5
    assert snap.workload.labels == (("app", "shop"),)
    assert snap.inbound.opaque_ports == frozenset({3306})


def test_defaults_and_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_file(path) == Snapshot().with_version()
    assert load_dict({}) == Snapshot().with_version()


def test_same_content_same_version_as_code_built_snapshot() -> None:
    snap = load_dict(
        {
            "services": [
                {
                    "name": "a",
                    "namespace": "b",
                    "port": 80,
                    "endpoints": [{"address": "198.18.0.1", "port": 80}],
                    "policy": {"timeout": 15, "connect_timeout": 1},  # ints for floats
                }
            ]
        }
    )
    built = Snapshot(
        services=(
            Service(
                name="a",
                namespace="b",
                port=80,
                endpoints=(Endpoint("198.18.0.1", 80),),
                policy=TrafficPolicy(),
            ),
        )
    ).with_version()
    assert snap == built and snap.version == built.version


def test_dump_round_trips_through_json(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(YAML)
    snap = load_file(path)
    plain = json.loads(json.dumps(dump(snap)))
    assert plain["version"] == snap.version
    assert plain["services"][0]["routes"][0]["timeout"] == 0.25
    assert load_dict(plain) == snap


def test_dump_sets_version_of_unversioned_snapshot() -> None:
    snap = Snapshot(services=(Service(name="a", namespace="b", port=1, routes=(Route(name="x"),)),))
    assert dump(snap)["version"] == snap.with_version().version


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (0, 0.0),
        (1.5, 1.5),
        ("250ms", 0.25),
        ("2s", 2.0),
        ("1m", 60.0),
        ("1h30m", 5400.0),
        ("1.5s", 1.5),
        ("100us", 1e-4),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


def _set(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Set ``value`` at a dotted path with [i] indexes; a value of DELETE removes the key."""
    data = copy.deepcopy(data)
    node: Any = data
    parts = path.replace("[", ".").replace("]", "").split(".")
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    last = parts[-1]
    if value is DELETE:
        del node[last]
    elif last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return data


DELETE = object()

BAD = [
    (
        "services[0].routes[0].backends[0].service",
        "inventory-v3.demo:8080",
        "services[0].routes[0].backends[0].service: unknown service 'inventory-v3.demo:8080'",
    ),
    (
        "services[0].routes[0].backends[0].service",
        "inventory",
        "services[0].routes[0].backends[0].service: not a service key",
    ),
    ("services[1].port", 70000, "services[1].port: must be 1..65535, got 70000"),
    ("services[1].port", "80", "services[1].port: expected an integer, got a string '80'"),
    ("services[1].prot", 80, "services[1].prot: unknown field"),
    ("services[1].name", DELETE, "services[1].name: required field is missing"),
    ("services[1].name", "Inventory_V1", "services[1].name: not a DNS label: 'Inventory_V1'"),
    (
        "services[1].name",
        "inventory-v9",
        "services[0].routes[0].backends[0].service: unknown service 'inventory-v1.demo:8080'",
    ),
    (
        "services[1].protocol",
        "grpc",
        "services[1].protocol: must be one of 'auto', 'http1', 'http2', 'tcp', got 'grpc'",
    ),
    ("services[1].vips", ["not-an-ip"], "services[1].vips[0]: not an IP address: 'not-an-ip'"),
    (
        "services[1].endpoints",
        [{"address": "198.18.0.1", "port": 0}],
        "services[1].endpoints[0].port: must be 1..65535, got 0",
    ),
    (
        "services[1].endpoints",
        [{"address": "198.18.0.1", "port": 1}, {"address": "198.18.0.1", "port": 1}],
        "services[1].endpoints[1]: duplicate endpoint 198.18.0.1:1",
    ),
    (
        "services[0].routes[0].backends[0].weight",
        -1,
        "services[0].routes[0].backends[0].weight: must be >= 0, got -1",
    ),
    (
        "services[0].routes[0].backends[0].weight",
        0,
        "services[0].routes[0].backends: weights must not all be 0",
    ),
    (
        "services[0].routes[0].matches",
        [{"path": {"kind": "regex", "value": "/a(["}}],
        "services[0].routes[0].matches[0].path.value: invalid regex '/a(['",
    ),
    (
        "services[0].routes[0].matches",
        [{"headers": [{"name": "x", "value": "*", "kind": "regex"}]}],
        "services[0].routes[0].matches[0].headers[0].value: invalid regex '*'",
    ),
    (
        "services[0].routes[0].matches",
        [{"path": {"kind": "prefix", "value": "api"}}],
        "services[0].routes[0].matches[0].path.value: must start with '/', got 'api'",
    ),
    ("services[0].routes[0].timeout", "fast", "services[0].routes[0].timeout: invalid duration 'fast'"),
    ("services[0].routes[0].timeout", "-1s", "services[0].routes[0].timeout: invalid duration '-1s'"),
    (
        "services[0].routes[0].timeout",
        -2,
        "services[0].routes[0].timeout: duration must be a finite number >= 0",
    ),
    (
        "services[0].policy.fault",
        {"abort_percent": 150},
        "services[0].policy.fault.abort_percent: must be 0..100, got 150",
    ),
    (
        "services[0].policy.fault",
        {"delay_percent": -1},
        "services[0].policy.fault.delay_percent: must be 0..100, got -1",
    ),
    (
        "services[0].policy.outlier_detection",
        {"max_ejection_percent": 101},
        "services[0].policy.outlier_detection.max_ejection_percent: must be 0..100, got 101",
    ),
    (
        "services[0].policy.outlier_detection",
        {"min_health_percent": 101},
        "services[0].policy.outlier_detection.min_health_percent: must be 0..100, got 101",
    ),
    (
        "services[0].policy.outlier_detection",
        {"min_health_percent": -1},
        "services[0].policy.outlier_detection.min_health_percent: must be 0..100, got -1",
    ),
    (
        "services[0].policy.retry",
        {"retry_on": ["5xx", "sometimes"]},
        "services[0].policy.retry.retry_on: unknown condition 'sometimes'",
    ),
    (
        "services[0].policy.retry",
        {"attempts": True},
        "services[0].policy.retry.attempts: expected an integer, got a boolean",
    ),
    ("services[0].policy.lb", "fastest", "services[0].policy.lb: must be one of"),
    ("services[0].policy.timeout", 0, "services[0].policy.timeout: must be > 0"),
    (
        "services[0].policy.rate_limit",
        {"requests_per_second": 0, "burst": 1},
        "services[0].policy.rate_limit.requests_per_second: must be > 0, got 0",
    ),
    (
        "services[0].policy.rate_limit",
        {"burst": 1},
        "services[0].policy.rate_limit.requests_per_second: required field is missing",
    ),
    (
        "services[0].routes[0].request_headers",
        {"set": [["bad header", "v"]]},
        "services[0].routes[0].request_headers.set[0]: invalid header name 'bad header'",
    ),
    (
        "services[0].routes[0].request_headers",
        {"set": [["a"]]},
        "services[0].routes[0].request_headers.set[0]: expected a [name, value] pair",
    ),
    ("services[0].routes[0].name", "", "services[0].routes[0].name: must not be empty"),
    (
        "services[0].routes",
        [{"name": "r"}, {"name": "r"}],
        "services[0].routes[1].name: duplicate route name 'r'",
    ),
    ("services[0].routes", {"name": "r"}, "services[0].routes: expected a list, got a mapping"),
    (
        "services[1]",
        {"name": "inventory", "namespace": "demo", "port": 8080},
        "services[1]: duplicate service key 'inventory.demo:8080'",
    ),
    ("inbound.ports", [{"port": 80}, {"port": 80}], "inbound.ports[1].port: duplicate inbound port 80"),
    ("inbound.opaque_ports", [0], "inbound.opaque_ports: must be 1..65535, got 0"),
    ("telemetry.tracing.sampling_ratio", 2, "telemetry.tracing.sampling_ratio: must be 0..1, got 2"),
    (
        "telemetry.access_log",
        "always",
        "telemetry.access_log: must be one of 'off', 'on', 'sampled', got 'always'",
    ),
    ("workload.labels", [["a", 1]], "workload.labels[0]: names and values must be strings"),
    ("extra", 1, "extra: unknown field"),
]


@pytest.mark.parametrize(("path", "value", "message"), BAD, ids=[b[0] + "=" + repr(b[1])[:20] for b in BAD])
def test_bad_inputs_name_the_field(path: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_dict(_set(valid(), path, value))
    assert str(info.value).startswith(message), str(info.value)
    assert info.value.path == message.split(": ")[0]


def test_yaml_booleans_are_explained_or_understood() -> None:
    snap = load_dict({"telemetry": {"access_log": False}})  # YAML 1.1 reads `access_log: off` as false
    assert snap.telemetry.access_log.value == "off"
    data = valid()
    data["services"][0]["routes"][0]["matches"] = [{"headers": [{"name": "x-canary", "value": True}]}]
    with pytest.raises(
        ConfigError, match=r"headers\[0\]\.value: expected a string, got a boolean True .*quote it"
    ):
        load_dict(data)


def test_unknown_field_suggests_the_closest_name() -> None:
    data = valid()
    data["services"][0]["policy"] = {"retyr": None}
    with pytest.raises(
        ConfigError, match=r"services\[0\]\.policy\.retyr: unknown field \(did you mean 'retry'\?"
    ):
        load_dict(data)


@pytest.mark.parametrize(("given", "expected"), [(None, 50), (0, 0), (30, 30), (100, 100)])
def test_min_health_percent_is_read_per_service(given: int | None, expected: int) -> None:
    data = valid()
    data["services"][0]["policy"] = {
        "outlier_detection": {} if given is None else {"min_health_percent": given}
    }
    snap = load_dict(data)
    od = snap.services[0].policy.outlier_detection
    assert od is not None and od.min_health_percent == expected
    other = snap.services[1].policy.outlier_detection  # the other service keeps the default
    assert other is not None and other.min_health_percent == 50


def test_valid_baseline_loads() -> None:
    snap = load_dict(valid())
    assert [s.key for s in snap.services] == ["inventory.demo:8080", "inventory-v1.demo:8080"]


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("services: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_file(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- a\n")
    with pytest.raises(ConfigError, match="must be a mapping, got a list"):
        load_file(top)
