"""controlplane.watch against a real kube-apiserver.

What a user relies on: every create/update/delete of each watched kind reaches
the sink; after a 410 (history compacted) or an API server restart the sink's
view equals the cluster again, including changes made while the watch was
away; a missing CRD does not stop the other kinds; stopping is prompt.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import kubernetes
import pytest

from controlplane.events import KINDS, ClusterEvent, Relist, WatchEvent
from controlplane.watch import ClusterWatcher, RestartReason, WatchSettings
from tests.support.apiserver import ApiServer

pytestmark = pytest.mark.apiserver

Key = tuple[str, str]  # (namespace, name)


class Recorder:
    """A sink that keeps what an index would: the current objects per kind."""

    def __init__(self) -> None:
        self.state: dict[str, dict[Key, Mapping[str, Any]]] = {}
        self.events: list[ClusterEvent] = []

    def __call__(self, event: ClusterEvent) -> None:
        self.events.append(event)
        if isinstance(event, Relist):
            self.state[event.kind] = {_key(o): o for o in event.objects}
        elif isinstance(event, WatchEvent):
            objs = self.state.setdefault(event.kind, {})
            if event.type == "DELETED":
                objs.pop(_key(event.obj), None)
            else:
                objs[_key(event.obj)] = event.obj

    def get(self, kind: str, namespace: str, name: str) -> Mapping[str, Any] | None:
        return self.state.get(kind, {}).get((namespace, name))

    def relists(self, kind: str) -> int:
        return sum(1 for e in self.events if isinstance(e, Relist) and e.kind == kind)


def _key(obj: Mapping[str, Any]) -> Key:
    meta = obj["metadata"]
    return (meta.get("namespace", ""), meta["name"])


class Restarts:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seen: list[tuple[str, RestartReason]] = []

    def __call__(self, kind: str, reason: RestartReason) -> None:
        with self._lock:
            self.seen.append((kind, reason))

    def count(self, kind: str, reason: RestartReason) -> int:
        with self._lock:
            return self.seen.count((kind, reason))


async def until(condition: Callable[[], bool], what: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.05)


class Running:
    def __init__(
        self, watcher: ClusterWatcher, recorder: Recorder, restarts: Restarts, task: asyncio.Task[None]
    ):
        self.watcher = watcher
        self.recorder = recorder
        self.restarts = restarts
        self.task = task


@pytest.fixture
async def running(apiserver: ApiServer, request: pytest.FixtureRequest) -> AsyncIterator[Running]:
    settings: WatchSettings = getattr(request, "param", None) or WatchSettings(
        backoff_initial=0.1, backoff_max=1.0, missing_kind_retry=0.5
    )
    client = apiserver.api_client()
    recorder, restarts = Recorder(), Restarts()
    watcher = ClusterWatcher(client, KINDS, recorder, settings, on_restart=restarts)
    task = asyncio.create_task(watcher.run(), name="test-cluster-watcher")
    try:
        await asyncio.wait_for(watcher.synced.wait(), 30)
        yield Running(watcher, recorder, restarts, task)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        client.close()  # type: ignore[no-untyped-call]


def _manifests(ns: str, version: str) -> str:
    """One object of every watched kind (Namespace aside); ``version`` goes into a label."""
    return f"""
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: {ns}, labels: {{v: "{version}"}}}}
spec:
  ports: [{{name: http, port: 8080, targetPort: 8080}}]
  selector: {{app: web}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: {ns}
  labels: {{kubernetes.io/service-name: web, v: "{version}"}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
  - addresses: ["198.18.0.10"]
    conditions: {{ready: true}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web-0, namespace: {ns}, labels: {{app: web, v: "{version}"}}}}
spec:
  containers: [{{name: app, image: example.invalid/web:1}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: web-split, namespace: {ns}, labels: {{v: "{version}"}}}}
spec:
  parentRefs: [{{group: "", kind: Service, name: web, port: 8080}}]
  rules:
    - backendRefs: [{{name: web, port: 8080}}]
---
apiVersion: policy.meshproxy.io/v1alpha1
kind: TrafficPolicy
metadata: {{name: web, namespace: {ns}, labels: {{v: "{version}"}}}}
spec:
  targetRef: {{kind: Service, name: web}}
  timeout: 5s
"""


NAMESPACED = {
    "Service": "web",
    "EndpointSlice": "web-1",
    "Pod": "web-0",
    "HTTPRoute": "web-split",
    "TrafficPolicy": "web",
}


def _labelled(rec: Recorder, kind: str, ns: str, name: str, value: str) -> Callable[[], bool]:
    return lambda: _label(rec.get(kind, ns, name)) == value


def _absent(rec: Recorder, kind: str, ns: str, name: str) -> Callable[[], bool]:
    return lambda: rec.get(kind, ns, name) is None


def _label(obj: Mapping[str, Any] | None) -> str | None:
    if obj is None:
        return None
    labels: Mapping[str, str] = obj["metadata"].get("labels") or {}
    return labels.get("v")


async def test_sees_create_update_delete_of_every_kind(apiserver: ApiServer, running: Running) -> None:
    rec = running.recorder
    ns = "watch-crud"
    apiserver.kubectl("create", "namespace", ns)
    apiserver.kubectl("create", "serviceaccount", "default", "-n", ns)
    await until(lambda: rec.get("Namespace", "", ns) is not None, "namespace ADDED")

    apiserver.apply_yaml(_manifests(ns, "1"))
    for kind, name in NAMESPACED.items():
        await until(_labelled(rec, kind, ns, name, "1"), f"{kind} created")
    created = rec.get("TrafficPolicy", ns, "web")
    assert created is not None
    # Delivered as served: camelCase, with apiVersion/kind.
    assert created["apiVersion"] == "policy.meshproxy.io/v1alpha1"
    assert created["spec"]["targetRef"] == {"group": "", "kind": "Service", "name": "web"}

    apiserver.apply_yaml(_manifests(ns, "2"))
    for kind, name in NAMESPACED.items():
        await until(_labelled(rec, kind, ns, name, "2"), f"{kind} updated")

    for kind, name in NAMESPACED.items():
        apiserver.kubectl(
            "delete",
            kind.lower() if kind != "EndpointSlice" else "endpointslices",
            name,
            "-n",
            ns,
            "--wait=false",
        )
    for kind, name in NAMESPACED.items():
        # A pod without a kubelet is deleted at once (no node to wait for).
        await until(_absent(rec, kind, ns, name), f"{kind} deleted")

    kinds_deleted = {e.kind for e in rec.events if isinstance(e, WatchEvent) and e.type == "DELETED"}
    assert set(NAMESPACED) <= kinds_deleted
    # A healthy stream never needed a relist.
    assert all(rec.relists(k) == 1 for k in KINDS)


def _service_key(ns: str, name: str) -> str:
    return f"/registry/services/specs/{ns}/{name}"


def _policy_key(ns: str, name: str) -> str:
    return f"/registry/policy.meshproxy.io/trafficpolicies/{ns}/{name}"


async def test_forced_410_relists_without_losing_state(
    apiserver: ApiServer, running: Running, namespace: str
) -> None:
    rec, ns = running.recorder, namespace
    apiserver.apply_yaml(_manifests(ns, "1"))
    apiserver.kubectl("create", "service", "clusterip", "keep", "--tcp=80:80", "-n", ns)
    await until(
        lambda: rec.get("Service", ns, "keep") is not None and rec.get("Service", ns, "web") is not None,
        "services",
    )
    gone_before = running.restarts.count("Service", "gone")

    def behind_the_watchers_back() -> None:
        # The API server is down: delete a Service straight from etcd, then compact all
        # history, so the watch's resourceVersion is gone for good (410 on resume).
        assert apiserver.etcd_get(_service_key(ns, "web")) is not None
        apiserver.etcd_delete(_service_key(ns, "web"))
        apiserver.etcd_put("/meshproxy-test/bump", b"x")
        apiserver.etcd_compact()

    apiserver.restart_apiserver(while_down=behind_the_watchers_back)

    await until(lambda: running.restarts.count("Service", "gone") > gone_before, "410 -> relist of Services")
    await until(lambda: rec.get("Service", ns, "web") is None, "the deleted Service dropped by the relist")
    assert rec.get("Service", ns, "keep") is not None
    # After the relist the watch resumes: a new change is still seen.
    apiserver.kubectl("create", "service", "clusterip", "after", "--tcp=80:80", "-n", ns)
    await until(lambda: rec.get("Service", ns, "after") is not None, "Service created after the relist")
    # And what we hold equals what the API server has.
    with apiserver.api_client() as client:
        served = kubernetes.client.CoreV1Api(client).list_namespaced_service(ns)
    assert {s.metadata.name for s in served.items if s.metadata} == {
        n for (n_ns, n) in rec.state["Service"] if n_ns == ns
    }


async def test_apiserver_restart_mid_watch_loses_no_update(
    apiserver: ApiServer, running: Running, namespace: str
) -> None:
    rec, ns = running.recorder, namespace
    apiserver.apply_yaml(_manifests(ns, "1"))
    await until(lambda: rec.get("TrafficPolicy", ns, "web") is not None, "policy")
    errors_before = sum(1 for (_, r) in running.restarts.seen if r == "error")

    def change_while_down() -> None:
        # Custom resources are stored as JSON: edit the policy in etcd while no API
        # server is running. The watch must pick this up once the server is back.
        key = _policy_key(ns, "web")
        raw = apiserver.etcd_get(key)
        assert raw is not None
        obj = json.loads(raw)
        obj["spec"]["timeout"] = "7s"
        apiserver.etcd_put(key, json.dumps(obj).encode())

    apiserver.restart_apiserver(while_down=change_while_down)
    await until(
        lambda: (rec.get("TrafficPolicy", ns, "web") or {}).get("spec", {}).get("timeout") == "7s",
        "the change made while the API server was down",
    )
    # The outage was noticed (a broken stream or refused connection), not papered over.
    assert sum(1 for (_, r) in running.restarts.seen if r == "error") > errors_before
    # And the watch keeps working after the restart.
    apiserver.kubectl("label", "trafficpolicy", "web", "-n", ns, "v=after", "--overwrite")
    await until(lambda: _label(rec.get("TrafficPolicy", ns, "web")) == "after", "update after the restart")


@pytest.mark.parametrize(
    "running", [WatchSettings(server_timeout=1, backoff_initial=0.1, backoff_max=1.0)], indirect=True
)
async def test_watch_timeout_resumes_without_relist(
    apiserver: ApiServer, running: Running, namespace: str
) -> None:
    rec, ns = running.recorder, namespace
    # Several server-side timeouts (1 s each) pass; every kind re-watches from where it was.
    apiserver.kubectl("create", "service", "clusterip", "a", "--tcp=80:80", "-n", ns)
    await until(lambda: rec.get("Service", ns, "a") is not None, "first service")
    opened = running.watcher.watches_opened("Service")
    await until(
        lambda: running.watcher.watches_opened("Service") >= opened + 3, "three re-watches after timeouts"
    )
    apiserver.kubectl("create", "service", "clusterip", "b", "--tcp=80:80", "-n", ns)
    await until(lambda: rec.get("Service", ns, "b") is not None, "service created after several re-watches")
    assert rec.relists("Service") == 1
    assert running.restarts.count("Service", "gone") == 0


async def test_missing_crd_is_retried_and_does_not_stop_other_kinds(
    apiserver: ApiServer, namespace: str
) -> None:
    ns = namespace
    crd = "httproutes.gateway.networking.k8s.io"
    apiserver.kubectl("delete", "crd", crd)
    apiserver.kubectl("wait", "--for=delete", f"crd/{crd}", "--timeout=60s")
    try:
        client = apiserver.api_client()
        rec, restarts = Recorder(), Restarts()
        settings = WatchSettings(backoff_initial=0.1, backoff_max=1.0, missing_kind_retry=0.3)
        watcher = ClusterWatcher(client, ["Service", "HTTPRoute"], rec, settings, on_restart=restarts)
        task = asyncio.create_task(watcher.run(), name="test-watcher-missing-crd")
        try:
            # Synced even though HTTPRoute is not served: it counts as an empty kind.
            await asyncio.wait_for(watcher.synced.wait(), 30)
            assert rec.state["HTTPRoute"] == {}
            await until(lambda: restarts.count("HTTPRoute", "missing") >= 2, "HTTPRoute retried")
            apiserver.kubectl("create", "service", "clusterip", "still", "--tcp=80:80", "-n", ns)
            await until(lambda: rec.get("Service", ns, "still") is not None, "Services keep flowing")

            apiserver.install_crds(gateway_api=True, mesh=False)
            apiserver.apply_yaml(_manifests(ns, "1").split("---")[3])
            await until(
                lambda: rec.get("HTTPRoute", ns, "web-split") is not None, "HTTPRoute once the CRD exists"
            )
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            client.close()  # type: ignore[no-untyped-call]
    finally:
        apiserver.install_crds(gateway_api=True, mesh=False)


async def test_stop_is_prompt_and_joins_threads(apiserver: ApiServer) -> None:
    client = apiserver.api_client()
    watcher = ClusterWatcher(client, KINDS, Recorder(), WatchSettings(server_timeout=600))
    task = asyncio.create_task(watcher.run(), name="test-watcher-stop")
    await asyncio.wait_for(watcher.synced.wait(), 30)
    start = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Blocked reads were woken by shutting their sockets, not by the 600 s timeout.
    assert time.monotonic() - start < 5
    assert not [t for t in threading.enumerate() if t.name.startswith("watch-")]
    client.close()  # type: ignore[no-untyped-call]
