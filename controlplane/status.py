"""Status writing: tells users whether their HTTPRoutes and TrafficPolicies took effect.

Owns: the ``status`` of the objects the control plane reads, written through
the status subresource:

  * HTTPRoute (Gateway API): ``status.parents[]`` entries with our
    ``controllerName`` (``meshproxy.io/controller``), one per Service parent,
    each with ``Accepted`` and ``ResolvedRefs`` conditions. Entries written by
    other controllers (an ingress gateway implementation) are kept untouched.
  * TrafficPolicy: ``status.conditions`` (``Accepted`` True/False + reason).

Invariants:
  * Write only on change. The desired status is computed by pure functions
    (``policy_status``, ``route_status``) from the object as it is on the server
    now; when it equals what is there, nothing is written. A status write bumps
    the object's resourceVersion and is seen by our own watch; without this rule
    every write would cause an event, a recompile and another write.
  * ``lastTransitionTime`` changes only when a condition's status changes, and
    ``observedGeneration`` says which ``metadata.generation`` was evaluated. A
    result for an older generation than the server holds is not written (a
    newer evaluation is coming).
  * Optimistic concurrency: the patch carries the resourceVersion it was
    computed from; on 409 Conflict we re-read and recompute (bounded tries).
  * Needs only ``list`` on the kind and ``patch`` on its status (what the chart's
    ClusterRole grants): the current object is read with a LIST narrowed by
    ``metadata.name``.

Concurrency: the ``kubernetes`` client is synchronous; the async methods run
each read-compute-write in a worker thread (``asyncio.to_thread``). The pure
functions have no I/O and no clock (``now`` is passed in).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import kubernetes

log = logging.getLogger(__name__)

CONTROLLER_NAME: Final = "meshproxy.io/controller"
GATEWAY_GROUP: Final = "gateway.networking.k8s.io"
POLICY_GROUP: Final = "policy.meshproxy.io"

ConditionStatus = Literal["True", "False", "Unknown"]


@dataclass(frozen=True, slots=True)
class Condition:
    """One desired condition (metav1.Condition without the bookkeeping fields)."""

    type: str
    status: ConditionStatus
    reason: str  # CamelCase, e.g. "Accepted", "BackendNotFound"
    message: str = ""


@dataclass(frozen=True, slots=True)
class ParentStatus:
    """Our verdict for one ``spec.parentRefs[]`` entry of an HTTPRoute."""

    parent_ref: Mapping[str, Any]  # as written in spec.parentRefs (group, kind, name, port, ...)
    conditions: tuple[Condition, ...]


class StatusError(Exception):
    """A status write failed for a reason other than a lost race."""


# ---- pure: desired status from the current object ------------------------------------


def _timestamp(now: datetime.datetime) -> str:
    return now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_conditions(
    current: Sequence[Mapping[str, Any]],
    desired: Sequence[Condition],
    generation: int,
    now: datetime.datetime,
) -> list[dict[str, Any]]:
    """The condition list to store: ``desired`` (in order), keeping transition times that still hold.

    Conditions of other types already present are kept after ours (someone else's).
    """
    by_type = {c.get("type"): c for c in current}
    out: list[dict[str, Any]] = []
    for cond in desired:
        old = by_type.get(cond.type)
        unchanged = old is not None and old.get("status") == cond.status and old.get("lastTransitionTime")
        out.append(
            {
                "type": cond.type,
                "status": cond.status,
                "reason": cond.reason,
                "message": cond.message,
                "observedGeneration": generation,
                "lastTransitionTime": old["lastTransitionTime"] if unchanged and old else _timestamp(now),
            }
        )
    ours = {c.type for c in desired}
    out.extend(dict(c) for c in current if c.get("type") not in ours)
    return out


def _same_conditions(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]) -> bool:
    keys = ("type", "status", "reason", "message", "observedGeneration")
    return [tuple(c.get(k) for k in keys) for c in a] == [tuple(c.get(k) for k in keys) for c in b]


def _generation(obj: Mapping[str, Any]) -> int:
    return int((obj.get("metadata") or {}).get("generation") or 0)


def policy_status(
    obj: Mapping[str, Any], conditions: Sequence[Condition], generation: int, now: datetime.datetime
) -> dict[str, Any] | None:
    """The TrafficPolicy ``status`` to write, or None when what is stored already says it."""
    if generation < _generation(obj):
        return None  # evaluated an older spec; the newer one will be evaluated and written
    current = list((obj.get("status") or {}).get("conditions") or [])
    merged = merge_conditions(current, conditions, generation, now)
    if _same_conditions(current, merged):
        return None
    return {"conditions": merged}


def _normal_ref(ref: Mapping[str, Any], route_namespace: str) -> tuple[str, str, str, str, str, str]:
    """A parentRef with Gateway API defaults filled, for comparing refs written differently."""
    return (
        str(ref.get("group", GATEWAY_GROUP)),
        str(ref.get("kind", "Gateway")),
        str(ref.get("namespace") or route_namespace),
        str(ref.get("name", "")),
        str(ref.get("sectionName", "")),
        str(ref.get("port", "")),
    )


def route_status(
    obj: Mapping[str, Any],
    parents: Sequence[ParentStatus],
    generation: int,
    now: datetime.datetime,
    controller_name: str = CONTROLLER_NAME,
) -> dict[str, Any] | None:
    """The HTTPRoute ``status`` to write, or None when nothing would change.

    Our entries are exactly ``parents``; entries of other controllers stay as they are.
    An empty ``parents`` removes our entries (the route no longer has a Service parent).
    """
    if generation < _generation(obj):
        return None
    namespace = str((obj.get("metadata") or {}).get("namespace") or "")
    current = list((obj.get("status") or {}).get("parents") or [])
    ours_now = {
        _normal_ref(p.get("parentRef") or {}, namespace): p
        for p in current
        if p.get("controllerName") == controller_name
    }
    others = [p for p in current if p.get("controllerName") != controller_name]
    new_ours: list[dict[str, Any]] = []
    for parent in parents:
        old = ours_now.get(_normal_ref(parent.parent_ref, namespace))
        old_conditions = list((old or {}).get("conditions") or [])
        new_ours.append(
            {
                "parentRef": dict(parent.parent_ref),
                "controllerName": controller_name,
                "conditions": merge_conditions(old_conditions, parent.conditions, generation, now),
            }
        )
    # Gateway API allows at most 32 parent statuses; ours go first, then others'.
    desired = (new_ours + others)[:32]
    if _same_parents(current, desired, namespace):
        return None
    return {"parents": desired}


def _same_parents(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]], namespace: str) -> bool:
    def key(p: Mapping[str, Any]) -> tuple[Any, ...]:
        return (_normal_ref(p.get("parentRef") or {}, namespace), p.get("controllerName"))

    if sorted(map(key, a)) != sorted(map(key, b)):
        return False
    by_key = {key(p): p for p in a}
    return all(_same_conditions(by_key[key(p)].get("conditions") or [], p.get("conditions") or []) for p in b)


# ---- I/O: read, compute, patch ---------------------------------------------------------


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class StatusWriter:
    """Writes status through the status subresource, only when it changes."""

    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        *,
        clock: Callable[[], datetime.datetime] = _utcnow,
        controller_name: str = CONTROLLER_NAME,
        max_conflicts: int = 3,
    ) -> None:
        self._api = kubernetes.client.CustomObjectsApi(api_client)
        self._clock = clock
        self._controller_name = controller_name
        # A conflict means someone changed the object between our read and write; a few
        # re-reads settle it, more means a hot object and the next reconcile will retry.
        self._max_conflicts = max_conflicts

    async def set_policy_conditions(
        self, namespace: str, name: str, conditions: Sequence[Condition], generation: int
    ) -> bool:
        """Set a TrafficPolicy's conditions; True if a write happened."""

        def desired(obj: Mapping[str, Any]) -> dict[str, Any] | None:
            return policy_status(obj, conditions, generation, self._clock())

        return await asyncio.to_thread(
            self._update, POLICY_GROUP, "v1alpha1", "trafficpolicies", namespace, name, desired
        )

    async def set_route_parents(
        self, namespace: str, name: str, parents: Sequence[ParentStatus], generation: int
    ) -> bool:
        """Set our ``status.parents`` entries of an HTTPRoute; True if a write happened."""

        def desired(obj: Mapping[str, Any]) -> dict[str, Any] | None:
            return route_status(obj, parents, generation, self._clock(), self._controller_name)

        return await asyncio.to_thread(
            self._update, GATEWAY_GROUP, "v1", "httproutes", namespace, name, desired
        )

    def _update(
        self,
        group: str,
        version: str,
        plural: str,
        namespace: str,
        name: str,
        desired: Callable[[Mapping[str, Any]], dict[str, Any] | None],
    ) -> bool:
        for _ in range(self._max_conflicts):
            try:
                # A LIST narrowed to the one name, not a GET: the chart's least-privilege
                # role grants list/watch on the kinds and patch on their status only.
                found = self._api.list_namespaced_custom_object(
                    group, version, namespace, plural, field_selector=f"metadata.name={name}"
                )
            except kubernetes.client.ApiException as exc:
                if exc.status == 404:
                    return False  # the kind itself is gone (CRD deleted)
                raise StatusError(f"reading {plural}/{namespace}/{name}: {exc.status} {exc.reason}") from exc
            items = found.get("items") if isinstance(found, dict) else None
            if not items:
                return False  # deleted meanwhile: nothing to report on
            obj = items[0]
            if not isinstance(obj, dict):
                raise StatusError(f"reading {plural}/{namespace}/{name}: unexpected {type(obj).__name__}")
            status = desired(obj)
            if status is None:
                return False
            # A merge patch with the resourceVersion we computed from: the API server
            # refuses it (409) if the object changed since, instead of us overwriting.
            patch = {"metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]}, "status": status}
            try:
                self._api.patch_namespaced_custom_object_status(
                    group,
                    version,
                    namespace,
                    plural,
                    name,
                    patch,
                    _content_type="application/merge-patch+json",
                )
            except kubernetes.client.ApiException as exc:
                if exc.status == 409:
                    continue
                if exc.status == 404:
                    return False
                raise StatusError(
                    f"writing {plural}/{namespace}/{name} status: {exc.status} {exc.reason}"
                ) from exc
            log.info("status written", extra={"object": f"{plural}/{namespace}/{name}"})
            return True
        log.warning(
            "status write kept conflicting; leaving it to the next reconcile",
            extra={"object": f"{plural}/{namespace}/{name}"},
        )
        return False
