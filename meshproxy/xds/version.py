"""Snapshot versions on the discovery stream: the two schemes a response may use.

Owns: ``digest_version`` (``VERSION_SCHEME_DIGEST`` in
``protos/meshapi/discovery/v1/discovery.proto``) and its parts, shared by the
control plane (which computes it from per-service digests it keeps) and the
proxy (which checks it); and ``DIGEST_FEATURE``, the ``Node.features`` entry a
proxy sends to ask for it. The other scheme, ``VERSION_SCHEME_CONTENT``, is
``meshproxy.config.model.content_version`` itself.

Why a second scheme: a content version hashes the canonical JSON of the whole
snapshot (about 1.5 MB at 10,000 endpoints), and every workload's snapshot
differs from the others' (its own workload and inbound part), so a control
plane had to hash the whole mesh once per workload on every change: 1000
workloads, 1000 x 1.5 MB, about 1.2 s of its CPU per EndpointSlice change in
``make bench-controlplane``. A digest version hashes the small per-workload
part plus one 32-byte SHA-256 per service; each service's digest is computed
once per change of that service, whatever the number of workloads. The proxy's
check hashes its whole snapshot once either way. Like a content version it is a
function of the content alone: equal snapshots, equal digest versions.

Invariants: pure functions of the snapshot (no I/O, no state);
``digest_version(s) == digest_version_of(head_json(s), service_digests(s))``.
Concurrency: none.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import fields
from typing import Any

from meshproxy.config import model

DIGEST_FEATURE = "digest-versions"

_HEAD_FIELDS = tuple(sorted(f.name for f in fields(model.Snapshot) if f.name not in ("services", "version")))


def canonical(value: Any) -> str:
    """The canonical JSON of a model value: what ``model.content_version`` hashes."""
    return json.dumps(model.to_plain(value), sort_keys=True, separators=(",", ":"))


def head_json(snapshot: model.Snapshot) -> str:
    """The canonical JSON of ``snapshot`` without its services (and version)."""
    plain = {name: model.to_plain(getattr(snapshot, name)) for name in _HEAD_FIELDS}
    return json.dumps(plain, sort_keys=True, separators=(",", ":"))


def service_digest(service_json: str) -> bytes:
    """The 32-byte SHA-256 of one service's canonical JSON."""
    return hashlib.sha256(service_json.encode()).digest()


def digest_version_of(head: str, digests: bytes | Iterable[bytes]) -> str:
    """The version from the head JSON and the services' digests (joined, or one by one), in order."""
    h = hashlib.sha256(head.encode())
    if isinstance(digests, bytes):
        h.update(digests)
    else:
        for d in digests:
            h.update(d)
    return h.hexdigest()[:16]


def digest_version(snapshot: model.Snapshot, memo: ServiceDigests | None = None) -> str:
    """``VERSION_SCHEME_DIGEST`` of ``snapshot`` (the proxy's check); ``memo`` saves rehashing."""
    if memo is not None:
        return digest_version_of(head_json(snapshot), memo.digests(snapshot.services))
    return digest_version_of(head_json(snapshot), (service_digest(canonical(s)) for s in snapshot.services))


class ServiceDigests:
    """The sidecar's digests of the services of the last snapshot it checked, by identity.

    An endpoint update is rebuilt on the last good snapshot and shares its unchanged
    ``Service`` objects, so with this memo the check hashes only the services the update
    replaced: at 10,000 endpoints the version check of an update went from about 110 ms
    (serialising and hashing every endpoint) to the changed services' share. Holds the
    services it maps (an ``id`` cannot be reused while held) and only the last
    snapshot's, so it is bounded by one snapshot. Not thread-safe: one user at a time
    (the discovery client handles one response at a time).
    """

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[model.Service, bytes]] = {}
        self.misses = 0

    def digests(self, services: tuple[model.Service, ...]) -> list[bytes]:
        fresh: dict[int, tuple[model.Service, bytes]] = {}
        out = []
        for svc in services:
            entry = self._by_id.get(id(svc))
            if entry is None or entry[0] is not svc:
                self.misses += 1
                entry = (svc, service_digest(canonical(svc)))
            fresh[id(svc)] = entry
            out.append(entry[1])
        self._by_id = fresh
        return out


__all__ = [
    "DIGEST_FEATURE",
    "ServiceDigests",
    "canonical",
    "digest_version",
    "digest_version_of",
    "head_json",
    "service_digest",
]
