"""The demo apps on their own (no mesh): the call chain works and trace headers travel it."""

from __future__ import annotations

import json
import sys

import pytest

from meshproxy.lab.netns import Lab, Pod

pytestmark = pytest.mark.netns


def _start(lab: Lab, pod: Pod, module: str, env: dict[str, str]) -> None:
    proc = lab.spawn(pod, [sys.executable, "-m", module], name=module.rsplit(".", 1)[1], env=env)
    lab.wait_listening(pod, 8080, proc=proc)


def test_chain_answers_with_version_and_forwards_trace_headers(lab: Lab) -> None:
    names = ("frontend", "catalog", "inventory", "client")
    pods = {name: lab.add_pod(name) for name in names}
    hosts = {pods[n].ip: [f"{n}.demo"] for n in names}
    for pod in pods.values():
        lab.set_hosts(pod, hosts)
    _start(lab, pods["inventory"], "meshdemo.inventory", {"VERSION": "v2"})
    _start(lab, pods["catalog"], "meshdemo.catalog", {"INVENTORY_URL": "http://inventory.demo:8080"})
    _start(lab, pods["frontend"], "meshdemo.frontend", {"CATALOG_URL": "http://catalog.demo:8080"})

    sent = {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "tracestate": "vendor=1",
        "x-b3-traceid": "0af7651916cd43dd8448eb211c80319c",
        "x-b3-spanid": "b7ad6b7169203331",
        "x-b3-sampled": "1",
        "x-request-id": "demo-42",
    }
    script = (
        "import json,sys; from meshdemo.common import get_json;"
        "print(json.dumps(get_json('http://frontend.demo:8080/', json.loads(sys.argv[1]))))"
    )
    status, body = json.loads(
        lab.exec(pods["client"], [sys.executable, "-c", script, json.dumps(sent)]).stdout
    )
    assert status == 200
    inventory = body["catalog"]["inventory"]
    assert inventory["version"] == "v2"
    assert inventory["trace_headers"] == sent
    assert body["catalog"]["items"] == ["teapot", "kettle", "mug"]

    load = lab.exec(
        pods["client"], [sys.executable, "-m", "meshdemo.load", "http://frontend.demo:8080/", "-n", "6"]
    )
    summary = json.loads(load.stdout)
    assert summary["status"] == {"200": 6}
    assert summary["versions"] == {"v2": 6}
    assert len(set(summary["trace_ids"])) == 6


def test_frontend_reports_a_broken_upstream_as_502(lab: Lab) -> None:
    front, client = lab.add_pod("frontend"), lab.add_pod("client")
    # Nothing listens on the catalog address: the frontend must answer, not hang or crash.
    _start(lab, front, "meshdemo.frontend", {"CATALOG_URL": f"http://{client.ip}:9"})
    load = lab.exec(
        client, [sys.executable, "-m", "meshdemo.load", f"http://{front.ip}:8080/", "-n", "2"], check=False
    )
    assert load.returncode == 1
    assert json.loads(load.stdout)["status"] == {"502": 2}
