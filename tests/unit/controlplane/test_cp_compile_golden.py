"""Golden tests: YAML cluster fixtures -> compiled snapshots and policy statuses.

Every fixture in ``fixtures/`` is compiled for every Pod in it; the result is
compared with ``golden/<fixture>.json``. After an intended change, regenerate
with ``UPDATE_GOLDEN=1 pytest tests/unit/controlplane`` and review the diff.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import pytest
import yaml

from controlplane.compile import ProxyNode, compile_snapshot, validate
from controlplane.index import ClusterState
from controlplane.settings import MeshSettings
from meshproxy.config.load import dump, load_dict
from meshproxy.config.model import content_version

HERE = pathlib.Path(__file__).parent
FIXTURES = sorted((HERE / "fixtures").glob("*.yaml"))
SETTINGS = MeshSettings(
    cluster_domain="cluster.test",
    sampling_ratio=0.5,
    otlp_grpc_endpoint="http://collector.observability:4317",
)


def load_objects(path: pathlib.Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def compile_fixture(path: pathlib.Path) -> dict[str, Any]:
    objects = load_objects(path)
    state = ClusterState.from_objects(objects)
    snapshots = {}
    for obj in objects:
        if obj["kind"] != "Pod":
            continue
        meta = obj["metadata"]
        node = ProxyNode(pod=meta["name"], namespace=meta["namespace"])
        snapshots[f"{meta['namespace']}/{meta['name']}"] = dump(compile_snapshot(state, node, SETTINGS))
    statuses = [
        {
            "kind": s.kind,
            "namespace": s.namespace,
            "name": s.name,
            "generation": s.generation,
            "accepted": s.accepted,
            "reason": s.reason.value,
            "message": s.message,
        }
        for s in validate(state)
    ]
    return {"statuses": statuses, "snapshots": snapshots}


@pytest.mark.parametrize("fixture", FIXTURES, ids=[f.stem for f in FIXTURES])
def test_golden(fixture: pathlib.Path) -> None:
    got = compile_fixture(fixture)
    golden = HERE / "golden" / f"{fixture.stem}.json"
    text = json.dumps(got, indent=2, sort_keys=True) + "\n"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        golden.write_text(text)
    assert golden.exists(), f"no golden file for {fixture.name}; run with UPDATE_GOLDEN=1"
    assert json.loads(golden.read_text()) == json.loads(text)


@pytest.mark.parametrize("fixture", FIXTURES, ids=[f.stem for f in FIXTURES])
def test_compiled_snapshots_pass_the_proxys_own_validation(fixture: pathlib.Path) -> None:
    # The proxy validates what it receives with the same rules as a static config file:
    # everything the control plane publishes must pass them, with the same version.
    for plain in compile_fixture(fixture)["snapshots"].values():
        version = plain.pop("version")
        assert load_dict(plain).version == version


def test_compile_is_deterministic_whatever_the_object_order() -> None:
    objects = load_objects(HERE / "fixtures" / "routing.yaml")
    node = ProxyNode(pod="ratings-0", namespace="bookinfo")
    a = compile_snapshot(ClusterState.from_objects(objects), node, SETTINGS)
    b = compile_snapshot(ClusterState.from_objects(list(reversed(objects))), node, SETTINGS)
    assert a == b and a.version == b.version


@pytest.mark.parametrize("fixture", FIXTURES, ids=[f.stem for f in FIXTURES])
def test_fast_version_is_the_models_content_hash(fixture: pathlib.Path) -> None:
    # compile reuses per-service serialisations for the hash; it must equal the model's own.
    objects = load_objects(fixture)
    state = ClusterState.from_objects(objects)
    for obj in objects:
        if obj["kind"] == "Pod":
            node = ProxyNode(pod=obj["metadata"]["name"], namespace=obj["metadata"]["namespace"])
            snap = compile_snapshot(state, node, SETTINGS)
            assert snap.version == content_version(snap)
