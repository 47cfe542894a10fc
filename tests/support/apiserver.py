"""A real, throwaway Kubernetes API server (etcd + kube-apiserver) for tests.

Owns: the etcd and kube-apiserver child processes of one test session, their
PKI (a throwaway CA, serving cert, admin client cert and service-account
signing key, made with ``cryptography``), their data directory and the admin
kubeconfig. Binaries come from ``scripts/k8s-bins.sh`` (built from pinned Go
modules into a cache outside the repo); nothing on ``$PATH`` is used.

Invariants:
  * Everything listens on 127.0.0.1 only, on ports picked free at start; the
    service IP range is inside 198.18.0.0/15 (198.19.0.0/16) so no Service
    address can collide with a real network.
  * ``stop()`` always kills both processes and is safe to call twice; the
    processes are also tied to the test process with PR_SET_PDEATHSIG so a
    killed pytest leaves no orphans.
  * ``restart_apiserver()`` keeps etcd (the cluster state) and the port, so
    kubeconfigs and clients made before stay valid.

Concurrency: synchronous; the caller (a pytest session fixture) owns the
object. Helpers block until the API server answers.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import datetime
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

REPO = Path(__file__).resolve().parents[2]
BINS_SCRIPT = REPO / "scripts" / "k8s-bins.sh"
SERVICE_CIDR = "198.19.0.0/16"
MESH_CRDS = REPO / "deploy" / "helm" / "crds"


class ApiServerError(RuntimeError):
    """The test API server could not be started or did not answer in time."""


@dataclass(frozen=True, slots=True)
class K8sBinaries:
    kube_apiserver: Path
    etcd: Path
    kubectl: Path
    helm: Path
    gateway_api_crds: Path
    bin_dir: Path
    version: str


def locate_binaries() -> tuple[K8sBinaries | None, str]:
    """The cached binaries, or ``(None, reason)`` saying what is missing and how to build it."""
    try:
        out = subprocess.run(
            [str(BINS_SCRIPT), "--print"], check=True, capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"cannot run {BINS_SCRIPT} --print: {exc}"
    layout = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    bin_dir = Path(layout["K8S_BIN"])
    tools = Path(layout["TOOLS_BIN"])
    bins = K8sBinaries(
        kube_apiserver=bin_dir / "kube-apiserver",
        etcd=bin_dir / "etcd",
        kubectl=tools / "kubectl",
        helm=tools / "helm",
        gateway_api_crds=Path(layout["GATEWAY_API_CRDS"]),
        bin_dir=bin_dir,
        version=layout["K8S_VERSION"],
    )
    missing = [str(p) for p in (bins.kube_apiserver, bins.etcd, bins.kubectl) if not os.access(p, os.X_OK)]
    if not (bins.gateway_api_crds / ".ready").exists():
        missing.append(str(bins.gateway_api_crds))
    if missing:
        return None, f"Kubernetes test binaries not built (run `make k8s-bins`): missing {', '.join(missing)}"
    return bins, ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if pytest dies, so does the child.
    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


# ---- PKI ---------------------------------------------------------------------


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@dataclass(frozen=True, slots=True)
class Pki:
    ca_cert: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    admin_cert: Path
    admin_key: Path
    sa_key: Path
    sa_pub: Path


def make_pki(directory: Path, service_ip: str) -> Pki:
    """A CA, the API server's serving cert, an admin (system:masters) client cert, SA keys."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    valid = (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=2))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshproxy-test-ca")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(
        cn: str, orgs: Sequence[str], usage: x509.ObjectIdentifier, sans: Sequence[x509.GeneralName]
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attrs))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid[0])
            .not_valid_after(valid[1])
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    serving_sans: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.DNSName("kubernetes"),
        x509.DNSName("kubernetes.default"),
        x509.DNSName("kubernetes.default.svc"),
        x509.DNSName("kubernetes.default.svc.cluster.local"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address(service_ip)),
    ]
    serving_key, serving_cert = leaf(
        "kube-apiserver", [], x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, serving_sans
    )
    admin_key, admin_cert = leaf("admin", ["system:masters"], x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH, [])
    # RSA: the service-account token signer the API server supports everywhere.
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    pki = Pki(
        ca_cert=directory / "ca.crt",
        ca_key=directory / "ca.key",
        serving_cert=directory / "apiserver.crt",
        serving_key=directory / "apiserver.key",
        admin_cert=directory / "admin.crt",
        admin_key=directory / "admin.key",
        sa_key=directory / "sa.key",
        sa_pub=directory / "sa.pub",
    )
    _write_cert(pki.ca_cert, ca_cert)
    _write_key(pki.ca_key, ca_key)
    _write_cert(pki.serving_cert, serving_cert)
    _write_key(pki.serving_key, serving_key)
    _write_cert(pki.admin_cert, admin_cert)
    _write_key(pki.admin_key, admin_key)
    _write_key(pki.sa_key, sa_key)
    pki.sa_pub.write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return pki


# ---- the cluster ---------------------------------------------------------------


def wait_for(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    interval: float = 0.1,
    on_fail: Callable[[], str] | None = None,
) -> None:
    """Poll ``condition`` until it is true or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        if time.monotonic() > deadline:
            detail = on_fail() if on_fail is not None else ""
            raise ApiServerError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


class ApiServer:
    """etcd + kube-apiserver on loopback. Use as a context manager."""

    def __init__(self, bins: K8sBinaries, workdir: Path, extra_apiserver_args: Sequence[str] = ()) -> None:
        self.bins = bins
        self.workdir = workdir
        self.extra_apiserver_args = tuple(extra_apiserver_args)
        self.etcd_port = free_port()
        self.etcd_peer_port = free_port()
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.pki = make_pki(workdir / "pki", str(ipaddress.ip_network(SERVICE_CIDR)[1]))
        self.kubeconfig = workdir / "admin.kubeconfig"
        self._etcd: subprocess.Popen[bytes] | None = None
        self._apiserver: subprocess.Popen[bytes] | None = None
        self._apiserver_starts = 0
        self._write_kubeconfig(
            self.kubeconfig,
            "admin",
            {"client-certificate": str(self.pki.admin_cert), "client-key": str(self.pki.admin_key)},
        )

    # -- lifecycle --

    def __enter__(self) -> ApiServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._start_etcd()
        self._start_apiserver()

    def stop(self) -> None:
        self._stop_apiserver()
        if self._etcd is not None:
            _terminate(self._etcd)
            self._etcd = None

    def restart_apiserver(self, while_down: Callable[[], None] | None = None) -> None:
        """Kill the API server and start it again on the same etcd and port.

        ``while_down`` runs between the two, e.g. to change etcd directly.
        """
        self._stop_apiserver()
        if while_down is not None:
            while_down()
        self._start_apiserver()

    def _start_etcd(self) -> None:
        data = self.workdir / "etcd-data"
        client = f"http://127.0.0.1:{self.etcd_port}"
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        self._etcd = self._spawn(
            "etcd",
            [
                str(self.bins.etcd),
                "--name=test",
                f"--data-dir={data}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=test={peer}",
                "--unsafe-no-fsync",  # test data: durability across power loss is irrelevant
                "--log-level=warn",
            ],
        )
        wait_for(self._etcd_healthy, 60, "etcd /health", on_fail=lambda: self._log_tail("etcd"))

    def _etcd_healthy(self) -> bool:
        self._check_alive(self._etcd, "etcd")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.etcd_port}/health", timeout=2) as r:
                return bool(json.loads(r.read()).get("health") == "true")
        except (OSError, ValueError):
            return False

    def _start_apiserver(self) -> None:
        p = self.pki
        self._apiserver_starts += 1
        self._apiserver = self._spawn(
            "kube-apiserver",
            [
                str(self.bins.kube_apiserver),
                f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.port}",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                f"--tls-cert-file={p.serving_cert}",
                f"--tls-private-key-file={p.serving_key}",
                f"--client-ca-file={p.ca_cert}",
                f"--service-account-key-file={p.sa_pub}",
                f"--service-account-signing-key-file={p.sa_key}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                "--api-audiences=https://kubernetes.default.svc.cluster.local",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NamespaceLifecycle,ServiceAccount,"
                "MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ResourceQuota",
                "--allow-privileged=true",
                # Loopback is not a valid endpoint address: don't publish one for
                # the `kubernetes` Service (it would only log errors forever).
                "--endpoint-reconciler-type=none",
                "--profiling=false",
                "--v=1",
                *self.extra_apiserver_args,
            ],
        )
        wait_for(
            self._apiserver_ready,
            120,
            "kube-apiserver /readyz",
            on_fail=lambda: self._log_tail("kube-apiserver"),
        )

    def _stop_apiserver(self) -> None:
        if self._apiserver is not None:
            _terminate(self._apiserver)
            self._apiserver = None

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("ab")
        try:
            return subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
        finally:
            log.close()

    def _log_tail(self, name: str, lines: int = 30) -> str:
        path = self.workdir / f"{name}.log"
        try:
            tail = path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            tail = []
        return f"; last lines of {path}:\n" + "\n".join(tail)

    @staticmethod
    def _check_alive(proc: subprocess.Popen[bytes] | None, name: str) -> None:
        if proc is None or proc.poll() is not None:
            raise ApiServerError(f"{name} exited (code {proc.returncode if proc else None})")

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        ctx.load_cert_chain(str(self.pki.admin_cert), str(self.pki.admin_key))
        return ctx

    def _apiserver_ready(self) -> bool:
        self._check_alive(self._apiserver, "kube-apiserver")
        try:
            with urllib.request.urlopen(f"{self.url}/readyz", timeout=5, context=self._ssl_context()) as r:
                return bool(r.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    # -- clients --

    def _write_kubeconfig(self, path: Path, user: str, credentials: dict[str, str]) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "test",
                    "cluster": {"server": self.url, "certificate-authority": str(self.pki.ca_cert)},
                }
            ],
            "users": [{"name": user, "user": credentials}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": user}}],
            "current-context": "test",
        }
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)

    def api_client(self) -> kubernetes.client.ApiClient:
        """A new admin client (the caller closes it)."""
        client: kubernetes.client.ApiClient = kubernetes.config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(self.kubeconfig)
        )
        return client

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, kubeconfig: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the cached kubectl against this server; raises with stderr on failure if ``check``."""
        proc = subprocess.run(
            [str(self.bins.kubectl), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and proc.returncode != 0:
            raise ApiServerError(
                f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}"
            )
        return proc

    def apply_yaml(
        self, source: str | Path, *, server_side: bool = False, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """``kubectl apply`` a YAML text or a file/directory path."""
        extra = ["--server-side", "--force-conflicts"] if server_side else []
        if isinstance(source, Path):
            return self.kubectl("apply", *extra, "-f", str(source), check=check)
        return self.kubectl("apply", *extra, "-f", "-", input=source, check=check)

    def install_crds(self, gateway_api: bool = True, mesh: bool = True) -> None:
        """Install the Gateway API (standard channel) and/or meshproxy CRDs and wait until served."""
        names: list[str] = []
        if gateway_api:
            # Server-side: the HTTPRoute CRD is too big for the client-side apply annotation.
            self.apply_yaml(self.bins.gateway_api_crds, server_side=True)
            names += ["httproutes.gateway.networking.k8s.io"]
        if mesh:
            self.apply_yaml(MESH_CRDS, server_side=True)
            names += ["trafficpolicies.policy.meshproxy.io"]
        for name in names:
            self.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{name}")

    def create_serviceaccount_token(self, namespace: str, name: str, expiration_seconds: int = 3600) -> str:
        """A bound token for ``namespace/name`` (TokenRequest API); creates the account if missing."""
        with self.api_client() as client:
            core = kubernetes.client.CoreV1Api(client)
            try:
                core.create_namespaced_service_account(
                    namespace,
                    kubernetes.client.V1ServiceAccount(metadata=kubernetes.client.V1ObjectMeta(name=name)),
                )
            except kubernetes.client.ApiException as exc:
                if exc.status != 409:
                    raise
            request = kubernetes.client.AuthenticationV1TokenRequest(
                spec=kubernetes.client.V1TokenRequestSpec(audiences=[], expiration_seconds=expiration_seconds)
            )
            resp = core.create_namespaced_service_account_token(name, namespace, request)
            if resp.status is None:
                raise ApiServerError(f"TokenRequest for {namespace}/{name} returned no status")
            return str(resp.status.token)

    def serviceaccount_kubeconfig(self, namespace: str, name: str) -> Path:
        """A kubeconfig that authenticates as the service account (for RBAC-honest runs)."""
        path = self.workdir / f"sa-{namespace}-{name}.kubeconfig"
        self._write_kubeconfig(
            path, f"{namespace}-{name}", {"token": self.create_serviceaccount_token(namespace, name)}
        )
        return path

    # -- etcd access (for tests that change state while the API server is down) --

    def etcd_call(self, method: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST to etcd's JSON gateway, e.g. ``etcd_call("kv/range", {"key": b64(...)})``."""
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.etcd_port}/v3/{method}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            result: dict[str, Any] = json.loads(r.read())
            return result

    def etcd_get(self, key: str) -> bytes | None:
        kvs = self.etcd_call("kv/range", {"key": _b64(key)}).get("kvs") or []
        return base64.b64decode(kvs[0]["value"]) if kvs else None

    def etcd_put(self, key: str, value: bytes) -> int:
        """Write a key; returns the new etcd revision."""
        resp = self.etcd_call("kv/put", {"key": _b64(key), "value": base64.b64encode(value).decode()})
        return int(resp["header"]["revision"])

    def etcd_delete(self, key: str) -> int:
        resp = self.etcd_call("kv/deleterange", {"key": _b64(key)})
        return int(resp["header"]["revision"])

    def etcd_compact(self) -> int:
        """Compact etcd history up to the current revision; older resourceVersions become 410 Gone."""
        revision = int(self.etcd_call("kv/range", {"key": _b64("/")})["header"]["revision"])
        self.etcd_call("kv/compaction", {"revision": str(revision), "physical": True})
        return revision


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _terminate(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def running_apiserver(workdir: Path, bins: K8sBinaries | None = None) -> Iterator[ApiServer]:
    """Start etcd + kube-apiserver in ``workdir``; stop both on exit (also on failure)."""
    if bins is None:
        found, reason = locate_binaries()
        if found is None:
            raise ApiServerError(reason)
        bins = found
    with ApiServer(bins, workdir) as server:
        yield server
