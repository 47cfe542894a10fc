"""The HTTPS webhook server: real TLS on 127.0.0.1, real AdmissionReviews, reloads."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import pathlib
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import httpx
import pytest

from controlplane import inject
from controlplane.webhook import WebhookMetrics, WebhookServer, WebhookSettings

HERE = pathlib.Path(__file__).parent
TEMPLATE = {"image": "registry.local/meshproxy:9.9", "logLevel": "debug"}


def case(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((HERE / "cases" / f"{name}.json").read_text())
    return data


async def wait_for(cond: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


class Lookup:
    """Namespace lookup double: returns namespaces from a dict, or fails / hangs on demand."""

    def __init__(self, namespaces: Mapping[str, Any]) -> None:
        self.namespaces = dict(namespaces)
        self.fail: Exception | None = None
        self.hang = False
        self.calls: list[str] = []

    async def __call__(self, name: str) -> Mapping[str, Any] | None:
        self.calls.append(name)
        if self.fail is not None:
            raise self.fail
        if self.hang:
            await asyncio.Event().wait()
        ns: Mapping[str, Any] | None = self.namespaces.get(name)
        return ns


@pytest.fixture
def tls_dir(tmp_path: pathlib.Path, pki: Any, pki_factory: Any) -> pathlib.Path:
    pki_factory.write(tmp_path / "tls", pki)
    return tmp_path / "tls"


@pytest.fixture
def settings(tmp_path: pathlib.Path, tls_dir: pathlib.Path) -> WebhookSettings:
    (tmp_path / "template.json").write_text(json.dumps(TEMPLATE))
    return WebhookSettings(
        listen_address="127.0.0.1",
        port=0,
        cert_file=str(tls_dir / "tls.crt"),
        key_file=str(tls_dir / "tls.key"),
        template_file=str(tmp_path / "template.json"),
        reload_interval=0.05,
        lookup_timeout=0.3,
        max_body_bytes=256 * 1024,
        cluster=inject.ClusterInfo((1, 30)),
    )


@pytest.fixture
def lookup() -> Lookup:
    return Lookup({"demo": case("native_sidecar")["namespace"]})


@pytest.fixture
async def server(settings: WebhookSettings, lookup: Lookup) -> AsyncIterator[WebhookServer]:
    srv = WebhookServer(settings, lookup)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


def client(server: WebhookServer, ca_pem: bytes) -> httpx.AsyncClient:
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    return httpx.AsyncClient(base_url=f"https://127.0.0.1:{server.port}", verify=ctx, timeout=5.0)


async def post_review(server: WebhookServer, ca_pem: bytes, review: Any) -> dict[str, Any]:
    async with client(server, ca_pem) as c:
        r = await c.post("/inject", content=json.dumps(review), headers={"content-type": "application/json"})
    assert r.status_code == 200
    reply: dict[str, Any] = r.json()
    assert reply["apiVersion"] == "admission.k8s.io/v1" and reply["kind"] == "AdmissionReview"
    assert reply["response"]["allowed"] is True
    return reply["response"]


async def test_injects_over_tls_with_the_mounted_template(
    server: WebhookServer, pki: Any, lookup: Lookup
) -> None:
    review = case("native_sidecar")["review"]
    response = await post_review(server, pki.ca_pem, review)
    assert response["uid"] == review["request"]["uid"]
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    init = next(op for op in patch if op["path"] == "/spec/initContainers")["value"]
    assert [c["name"] for c in init] == ["meshproxy-init", "meshproxy"]  # 1.30 from settings
    assert init[1]["image"] == "registry.local/meshproxy:9.9"
    assert {"name": "MESHPROXY_LOG_LEVEL", "value": "debug"} in init[1]["env"]
    assert lookup.calls == ["demo"]


async def test_keep_alive_connection_serves_several_reviews(server: WebhookServer, pki: Any) -> None:
    async with client(server, pki.ca_pem) as c:
        for uid in ("a", "b", "c"):
            review = copy.deepcopy(case("native_sidecar")["review"])
            review["request"]["uid"] = uid
            r = await c.post("/inject", content=json.dumps(review))
            assert r.json()["response"]["uid"] == uid
        assert (await c.get("/healthz")).status_code == 200


@pytest.mark.parametrize("failure", ["raises", "hangs"])
async def test_namespace_lookup_failure_allows_without_patch(
    server: WebhookServer, pki: Any, lookup: Lookup, failure: str
) -> None:
    if failure == "raises":
        lookup.fail = RuntimeError("apiserver unreachable")
    else:
        lookup.hang = True
    review = case("native_sidecar")["review"]
    started = time.monotonic()
    response = await post_review(server, pki.ca_pem, review)
    assert time.monotonic() - started < 3.0  # answered within the API server's timeout
    assert "patch" not in response
    assert response["uid"] == review["request"]["uid"]
    assert len(response["warnings"]) == 1
    assert "namespace demo lookup" in response["warnings"][0]


async def test_garbage_bodies_are_allowed_with_a_warning(server: WebhookServer, pki: Any) -> None:
    async with client(server, pki.ca_pem) as c:
        r = await c.post("/inject", content=b"{not json")
        assert r.status_code == 200
        assert r.json()["response"]["allowed"] is True
        assert r.json()["response"]["warnings"][0].startswith("meshproxy: sidecar not injected")
        r = await c.post(
            "/inject", content=json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"})
        )
        assert r.json()["response"] == {
            "uid": "",
            "allowed": True,
            "warnings": ["meshproxy: sidecar not injected: AdmissionReview has no request"],
        }
        assert (await c.get("/inject")).status_code == 405
        assert (await c.post("/other", content=b"{}")).status_code == 404


async def test_oversized_body_is_refused(server: WebhookServer, pki: Any) -> None:
    async with client(server, pki.ca_pem) as c:
        r = await c.post("/inject", content=b" " * (300 * 1024))
    assert r.status_code == 413


async def test_internal_error_never_blocks_the_pod(
    server: WebhookServer, pki: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("bug")

    monkeypatch.setattr(inject, "build_patch", broken)
    response = await post_review(server, pki.ca_pem, case("native_sidecar")["review"])
    assert "patch" not in response
    assert response["warnings"] == ["meshproxy: sidecar not injected: internal error (KeyError)"]


async def test_template_is_reloaded_and_a_bad_one_is_reported(
    server: WebhookServer, pki: Any, settings: WebhookSettings
) -> None:
    review = case("native_sidecar")["review"]
    pathlib.Path(settings.template_file).write_text(json.dumps({"image": "x", "proxyUID": "root"}))

    async def error_reported() -> bool:
        return server.template_error is not None

    await wait_for(error_reported)
    # The previous good template keeps serving.
    response = await post_review(server, pki.ca_pem, review)
    assert "registry.local/meshproxy:9.9" in base64.b64decode(response["patch"]).decode()

    pathlib.Path(settings.template_file).write_text(json.dumps({"image": "registry.local/meshproxy:10.0"}))

    async def new_image_served() -> bool:
        r = await post_review(server, pki.ca_pem, review)
        return "registry.local/meshproxy:10.0" in base64.b64decode(r["patch"]).decode()

    await wait_for(new_image_served)


async def test_start_without_a_valid_template_serves_warnings(
    settings: WebhookSettings, lookup: Lookup, pki: Any
) -> None:
    pathlib.Path(settings.template_file).write_text("{}")
    metrics_registry = __import__("prometheus_client").CollectorRegistry()
    srv = WebhookServer(settings, lookup, metrics=WebhookMetrics(metrics_registry))
    await srv.start()
    try:
        response = await post_review(srv, pki.ca_pem, case("native_sidecar")["review"])
        assert "patch" not in response
        assert "image: is required" in response["warnings"][0]
        assert (
            metrics_registry.get_sample_value("meshproxy_webhook_reviews_total", {"result": "error"}) == 1.0
        )
    finally:
        await srv.stop()


async def test_certificate_rotation_without_restart(
    server: WebhookServer, pki: Any, pki_factory: Any, tls_dir: pathlib.Path
) -> None:
    review = case("native_sidecar")["review"]
    await post_review(server, pki.ca_pem, review)
    rotated = pki_factory.make()
    pki_factory.write(tls_dir, rotated)

    async def new_cert_served() -> bool:
        try:
            await post_review(server, rotated.ca_pem, review)
        except httpx.ConnectError:
            return False
        return True

    await wait_for(new_cert_served)
    with pytest.raises(httpx.ConnectError):
        await post_review(server, pki.ca_pem, review)


async def test_start_fails_loudly_without_a_certificate(settings: WebhookSettings, lookup: Lookup) -> None:
    pathlib.Path(settings.cert_file).unlink()
    with pytest.raises(ssl.SSLError):
        await WebhookServer(settings, lookup).start()
