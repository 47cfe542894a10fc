"""``controlplane run --from-dir`` as a real process, with a real sidecar client process
and ``meshctl``, all on 127.0.0.1: what a user of the local demo does."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import IO

import pytest

FIXTURES = pathlib.Path(__file__).parent.parent / "unit" / "controlplane" / "fixtures"
PY = sys.executable


def wait_until(cond: Callable[[], bool], within: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Proc:
    """A child process whose stdout lines are collected by polling a file (no threads)."""

    def __init__(self, args: list[str], log: pathlib.Path) -> None:
        self.log = log
        self._out: IO[bytes] = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.p = subprocess.Popen(
            args, stdout=self._out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )

    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self._out.close()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in reversed(started):
        p.stop()


def http_status(url: str) -> int:
    try:
        return int(urllib.request.urlopen(url, timeout=5).status)
    except urllib.error.HTTPError as e:
        return e.code


def meshctl(target: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "meshctl.cli", *args],
        env={**os.environ, "MESHCTL_CONTROL_PLANE": target},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_from_dir_serves_a_sidecar_process_and_follows_file_changes(
    tmp_path: pathlib.Path, procs: list[Proc]
) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    shutil.copy(FIXTURES / "routing.yaml", manifests / "bookinfo.yaml")
    cp = Proc(
        [
            PY,
            "-m",
            "controlplane.cli",
            "run",
            "--from-dir",
            str(manifests),
            "--listen-address",
            "127.0.0.1",
            "--grpc-port",
            "0",
            "--metrics-port",
            "0",
            "--poll-interval",
            "0.2",
        ],
        tmp_path / "controlplane.log",
    )
    procs.append(cp)
    wait_until(
        lambda: any(line.startswith("listening ") for line in cp.lines()), what="control plane listening"
    )
    listening = next(line for line in cp.lines() if line.startswith("listening "))
    fields = dict(part.split("=", 1) for part in listening.split()[1:])
    target, metrics = fields["grpc"], fields["metrics"]

    wait_until(lambda: http_status(f"http://{metrics}/ready") == 200, what="ready")

    sidecar = Proc(
        [PY, "-m", "meshproxy.xds.client", target, "--pod", "ratings-0", "--namespace", "bookinfo"],
        tmp_path / "sidecar.log",
    )
    procs.append(sidecar)
    wait_until(
        lambda: any(line.startswith("applied ") for line in sidecar.lines()), what="first config applied"
    )
    first = next(line for line in sidecar.lines() if line.startswith("applied ")).split()[1]

    def status_row() -> list[str]:
        out = meshctl(target, "proxy-status")
        assert out.returncode == 0, out.stderr
        return next((line.split() for line in out.stdout.splitlines() if line.startswith("ratings-0")), [])

    wait_until(lambda: status_row()[2:4] == [first, "SYNCED"], what="SYNCED in meshctl proxy-status")

    config = meshctl(target, "proxy-config", "ratings-0", "-n", "bookinfo")
    assert config.returncode == 0, config.stderr
    dumped = json.loads(config.stdout)
    assert dumped["version"] == first
    ratings = next(s for s in dumped["services"] if s["name"] == "ratings")
    assert ratings["policy"]["lb"] == "round_robin"  # the accepted TrafficPolicy, not the conflicting one

    # A new Service file appears: the control plane re-reads, the sidecar gets a new version.
    (manifests / "details.yaml").write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: details, namespace: bookinfo}\n"
        "spec: {clusterIP: 198.19.1.30, selector: {app: details}, ports: [{name: http, port: 9080}]}\n"
    )
    wait_until(
        lambda: len([line for line in sidecar.lines() if line.startswith("applied ")]) == 2,
        what="second config",
    )
    second = [line for line in sidecar.lines() if line.startswith("applied ")][1].split()[1]
    assert second != first
    wait_until(lambda: status_row()[2:4] == [second, "SYNCED"], what="SYNCED on the new version")

    body = urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5).read().decode()
    assert "meshcp_connected_proxies 1.0" in body
    # details-policy waited for its target Service; with details.yaml it is accepted too.
    assert 'meshcp_policies{accepted="true",kind="TrafficPolicy"} 3.0' in body
    assert 'meshcp_policies{accepted="false",kind="TrafficPolicy"} 2.0' in body

    missing = meshctl(target, "proxy-config", "nobody", "-n", "bookinfo")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr


def test_meshctl_reports_an_unreachable_control_plane() -> None:
    out = subprocess.run(
        [PY, "-m", "meshctl.cli", "--control-plane", "127.0.0.1:1", "--timeout", "2", "proxy-status"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and "UNAVAILABLE" in out.stderr


def self_signed(directory: pathlib.Path) -> None:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .sign(key, hashes.SHA256())
    )
    (directory / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_run_starts_the_injection_webhook_when_asked(tmp_path: pathlib.Path, procs: list[Proc]) -> None:
    import ssl

    (tmp_path / "manifests").mkdir()
    self_signed(tmp_path)
    port = free_port()
    cp = Proc(
        [
            PY, "-m", "controlplane.cli", "run", "--from-dir", str(tmp_path / "manifests"),
            "--listen-address", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0",
            "--webhook", "--webhook-port", str(port), "--webhook-cert-file", str(tmp_path / "tls.crt"),
            "--webhook-key-file", str(tmp_path / "tls.key"), "--webhook-template-file", str(tmp_path / "none.json"),
        ],
        tmp_path / "controlplane.log",
    )  # fmt: skip
    procs.append(cp)
    wait_until(
        lambda: any(line.startswith("listening ") for line in cp.lines()), what="control plane listening"
    )
    ctx = ssl.create_default_context(cafile=str(tmp_path / "tls.crt"))

    def healthz() -> int:
        try:
            return http_status_ctx(f"https://127.0.0.1:{port}/healthz", ctx)
        except OSError:
            return 0

    wait_until(lambda: healthz() == 200, what="webhook /healthz over TLS, verified against its certificate")


def http_status_ctx(url: str, ctx: object) -> int:
    try:
        return int(urllib.request.urlopen(url, timeout=5, context=ctx).status)  # type: ignore[arg-type]
    except urllib.error.HTTPError as e:
        return e.code


def test_from_dir_configures_the_real_sidecar(tmp_path: pathlib.Path, procs: list[Proc]) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    shutil.copy(FIXTURES / "routing.yaml", manifests / "bookinfo.yaml")
    cp = Proc(
        [
            PY, "-m", "controlplane.cli", "run", "--from-dir", str(manifests), "--listen-address", "127.0.0.1",
            "--grpc-port", "0", "--metrics-port", "0",
        ],
        tmp_path / "controlplane.log",
    )  # fmt: skip
    procs.append(cp)
    wait_until(
        lambda: any(line.startswith("listening ") for line in cp.lines()), what="control plane listening"
    )
    target = dict(
        p.split("=", 1) for p in next(x for x in cp.lines() if x.startswith("listening ")).split()[1:]
    )["grpc"]
    admin = free_port()
    sidecar = Proc(
        [
            PY, "-m", "meshproxy", "run", "--control-plane", target, "--pod-name", "reviews-v1-6b7f-aaaaa",
            "--pod-namespace", "bookinfo", "--pod-ip", "198.18.3.11", "--admin-port", str(admin),
            "--outbound-port", str(free_port()), "--inbound-port", str(free_port()), "--listen-host", "127.0.0.1",
            "--log-format", "text",
        ],
        tmp_path / "sidecar.log",
    )  # fmt: skip
    procs.append(sidecar)

    def config() -> dict[str, object]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/config_dump", timeout=5) as r:
                return dict(json.loads(r.read()))
        except (OSError, ValueError):
            return {}

    wait_until(lambda: bool(config().get("services")), what="sidecar configured by the control plane")
    dumped = config()
    assert dumped["workload"]["name"] == "reviews-v1"  # type: ignore[index]
    names = sorted(s["name"] for s in dumped["services"])  # type: ignore[attr-defined]
    assert names == ["ratings", "reviews", "reviews-v1", "reviews-v2"]

    def acked() -> list[str]:
        out = meshctl(target, "proxy-status")
        return next((line.split() for line in out.stdout.splitlines() if line.startswith("reviews-v1-")), [])

    wait_until(lambda: acked()[3:4] == ["SYNCED"], what="the real sidecar ACKed")
    assert acked()[2] == dumped.get("version")
    # The sidecar says which build of its data path runs (make test names the one it made).
    started = next(line for line in sidecar.lines() if "meshproxy.app: starting" in line)
    if expected := os.environ.get("MESHPROXY_EXPECT_BUILD"):
        assert f"data_path={expected}" in started, started
