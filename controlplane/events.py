"""The events the cluster watch hands to the index.

Owns: the two plain data types that cross the seam between the watch loop
(``controlplane.watch``, the only module that talks to the API server) and the
index (``controlplane.index``), so neither imports the other.

    WatchEvent(kind, type, obj)   one ADDED / MODIFIED / DELETED object
    Relist(kind, objects)         replace every object of ``kind`` (at start, after a 410)

``kind`` is the Kubernetes kind as the API server spells it: ``Service``,
``EndpointSlice``, ``Pod``, ``Namespace``, ``HTTPRoute``, ``TrafficPolicy``.
``obj`` is the object as the API server serves it (camelCase JSON decoded to
dicts and lists); the index reads it, never mutates it.

Invariants: events are immutable values; objects are identified by
``metadata.namespace`` + ``metadata.name`` (cluster-scoped kinds have no
namespace). Concurrency: none; plain data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

EventType = Literal["ADDED", "MODIFIED", "DELETED"]

KINDS: tuple[str, ...] = ("Namespace", "Service", "EndpointSlice", "Pod", "HTTPRoute", "TrafficPolicy")
"""Every kind the index understands; events of other kinds are ignored."""


@dataclass(frozen=True, slots=True)
class WatchEvent:
    kind: str
    type: EventType
    obj: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Relist:
    """Everything of ``kind`` the API server has now; objects not listed are gone."""

    kind: str
    objects: Sequence[Mapping[str, Any]]


ClusterEvent = WatchEvent | Relist
