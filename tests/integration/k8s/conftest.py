"""Fixtures for tests against a real kube-apiserver (etcd + kube-apiserver on loopback).

Owns: the session-wide ``apiserver`` fixture (one API server for every test in
this package, CRDs installed), a per-test namespace, and an admin
``kubernetes.client.ApiClient`` per test. Tests marked ``apiserver`` skip with
the reason when the binaries are not built (``make k8s-bins`` builds them).

Concurrency: pytest runs tests one at a time; the fixtures are synchronous.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import kubernetes
import pytest

from tests.support.apiserver import ApiServer, locate_binaries


@pytest.fixture(scope="session")
def apiserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    bins, reason = locate_binaries()
    if bins is None:
        pytest.skip(reason)
    workdir: Path = tmp_path_factory.mktemp("apiserver")
    with ApiServer(bins, workdir) as server:
        server.install_crds()
        yield server


@pytest.fixture
def namespace(apiserver: ApiServer) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards (not waited for)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    apiserver.kubectl("create", "namespace", name)
    # No kube-controller-manager here, so nobody creates the default ServiceAccount
    # that pod admission insists on.
    apiserver.kubectl("create", "serviceaccount", "default", "-n", name)
    yield name
    apiserver.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def api_client(apiserver: ApiServer) -> Iterator[kubernetes.client.ApiClient]:
    with apiserver.api_client() as client:
        yield client
