"""The cluster itself: pods start, get an address, find each other by DNS name and
reach each other through a ClusterIP Service (kube-proxy) with no mesh involved.

Owns: the ``e2e-smoke`` namespace (made and deleted here). Runs first, so a broken
cluster is reported as such before any mesh step fails for the same reason.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import Cluster, wait_for

pytestmark = pytest.mark.e2e

NS = "e2e-smoke"
BASE_IMAGE = "localhost/meshproxy-base:bookworm"

MANIFEST = f"""
apiVersion: v1
kind: Namespace
metadata: {{name: {NS}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web, namespace: {NS}, labels: {{app: web}}}}
spec:
  containers:
  - name: web
    image: {BASE_IMAGE}
    imagePullPolicy: Never
    command: [python3, -m, http.server, "8080", --directory, /etc]
    ports: [{{containerPort: 8080, name: http}}]
    readinessProbe: {{httpGet: {{path: /hostname, port: http}}, periodSeconds: 1}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: {NS}}}
spec:
  containers:
  - name: client
    image: {BASE_IMAGE}
    imagePullPolicy: Never
    command: [sleep, infinity]
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: {NS}}}
spec:
  selector: {{app: web}}
  ports: [{{port: 80, targetPort: http}}]
"""

# Runs in the client pod: resolve the Service by name, fetch through the ClusterIP.
PROBE = """
import json, socket, urllib.request
ip = socket.gethostbyname("web.e2e-smoke.svc.cluster.local")
with urllib.request.urlopen("http://web.e2e-smoke.svc.cluster.local/hostname", timeout=5) as r:
    print(json.dumps({"ip": ip, "status": r.status, "body": r.read().decode().strip()}))
"""


@pytest.fixture(scope="module")
def smoke(cluster: Cluster) -> Iterator[Cluster]:
    cluster.apply(MANIFEST)
    cluster.kubectl("-n", NS, "wait", "--for=condition=Ready", "pod/web", "pod/client", "--timeout=120s")
    yield cluster
    cluster.kubectl("delete", "namespace", NS, "--wait=false", check=False)


def test_node_is_ready_and_reports_the_real_runtime(cluster: Cluster) -> None:
    node = cluster.get_json("node", "mpe2e-node")
    ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
    assert ready == "True"
    assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")
    addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
    assert addresses["InternalIP"] == cluster.node_ip


def test_pod_reaches_another_through_dns_and_a_cluster_ip(smoke: Cluster) -> None:
    svc = smoke.get_json("-n", NS, "service", "web")
    pod = smoke.get_json("-n", NS, "pod", "web")
    out = smoke.kubectl("-n", NS, "exec", "-i", "client", "--", "python3", "-", stdin=PROBE).stdout
    answer = json.loads(out.strip().splitlines()[-1])
    assert answer["ip"] == svc["spec"]["clusterIP"]  # CoreDNS answered with the Service's IP
    assert answer["status"] == 200
    assert answer["body"] == "web"  # the server pod's /etc/hostname, through kube-proxy's DNAT
    assert pod["status"]["podIP"].startswith("198.18.")


def test_pods_reach_the_api_server_through_its_service(smoke: Cluster) -> None:
    # What the mesh's control plane and any operator do: the in-cluster config.
    probe = (
        "import ssl, urllib.request\n"
        "sa = '/var/run/secrets/kubernetes.io/serviceaccount/'\n"
        "ctx = ssl.create_default_context(cafile=sa + 'ca.crt')\n"
        "req = urllib.request.Request('https://kubernetes.default.svc/version',"
        " headers={'Authorization': 'Bearer ' + open(sa + 'token').read()})\n"
        "print(urllib.request.urlopen(req, context=ctx, timeout=5).status)\n"
    )
    status = wait_for(
        lambda: smoke.kubectl("-n", NS, "exec", "-i", "client", "--", "python3", "-", stdin=probe)
        .stdout.strip()
        .endswith("200"),
        30,
        "the API server through https://kubernetes.default.svc",
    )
    assert status is True
