"""The sidecar's live configuration: current snapshot plus the runtime state that outlives it.

Owns: ``Runtime``, the holder of the current ``Active`` view (snapshot + derived
``RouteTable`` + inbound port index), swapped by one assignment in ``apply``; the
per-service state that must survive config swaps (``EndpointPool`` with its
outlier state and in-flight counts, ``Breaker``, ``RetryBudgetState``, token
buckets); validation of a snapshot before it is applied; and the on-disk cache
of the last good snapshot (``--config-cache``), so a restarted sidecar can serve
before the control plane answers.

Invariants:
  * ``apply`` validates first and raises ``ConfigError`` (naming the field) without
    touching anything; after validation the swap is a single assignment of ``active``,
    so a request either sees the whole old config or the whole new one.
  * Requests capture ``runtime.active`` once; runtime state objects are looked up by
    ``ServiceKey`` and updated in place, so counts and ejections carry over.
  * The cache file is written atomically (temp file + rename); a corrupt cache is
    ignored with a log line, never fatal.

Concurrency: used from the event loop thread only; no locks.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import random
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from meshproxy.config.model import (
    Endpoint,
    InboundPort,
    PathMatchKind,
    RateLimit,
    Service,
    ServiceKey,
    Snapshot,
    content_version,
    to_plain,
)
from meshproxy.core.balancer import EndpointPool
from meshproxy.core.breaker import Breaker
from meshproxy.core.clock import Clock
from meshproxy.core.errors import ConfigError
from meshproxy.core.ratelimit import TokenBucket
from meshproxy.core.retry import RetryBudgetState
from meshproxy.core.routing import RouteTable

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Active:
    """One applied config: everything derived from a snapshot, immutable."""

    snapshot: Snapshot
    table: RouteTable
    inbound_ports: Mapping[int, InboundPort] = field(default_factory=dict)
    # Service name -> (its rate limit, bucket name): the first service of that name with a
    # rate limit, for inbound ports that name a service but set no limit of their own.
    service_rate_limits: Mapping[str, tuple[RateLimit, str]] = field(default_factory=dict)
    # Telemetry's ``destination_service`` label, the same on both sides of a hop (as in Istio,
    # where both reporters say the service's name): "<name>.<namespace>". Outbound by service
    # key; inbound by the app port the request arrived on (the port's service, in this pod's
    # namespace: a Service only selects pods of its own namespace).
    service_labels: Mapping[ServiceKey, str] = field(default_factory=dict)
    inbound_labels: Mapping[int, str] = field(default_factory=dict)
    # The app's endpoint for each declared inbound port, built once per snapshot rather than
    # per request (an ``Endpoint`` is a frozen dataclass: ~2 us to construct on the bench VM).
    inbound_targets: Mapping[int, Endpoint] = field(default_factory=dict)

    @property
    def version(self) -> str:
        return self.snapshot.version


def _check_ip(path: str, value: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError as exc:
        raise ConfigError(path, f"not an IP address: {value!r}") from exc


def _check_port(path: str, value: int) -> None:
    if not isinstance(value, int) or not 0 < value < 65536:
        raise ConfigError(path, f"port must be 1..65535, got {value!r}")


def _check_rate(path: str, rl: RateLimit | None) -> None:
    if rl is None:
        return
    if rl.requests_per_second < 0:
        raise ConfigError(f"{path}.requests_per_second", "must be >= 0")
    if rl.burst < 1:
        raise ConfigError(f"{path}.burst", "must be >= 1")


def validate(snapshot: Snapshot) -> None:
    """Raise ``ConfigError`` naming the first bad field; return None when the snapshot is usable."""
    seen: dict[ServiceKey, int] = {}
    for i, svc in enumerate(snapshot.services):
        p = f"services[{i}]"
        if not svc.name:
            raise ConfigError(f"{p}.name", "must not be empty")
        _check_port(f"{p}.port", svc.port)
        if svc.key in seen:
            raise ConfigError(p, f"duplicate service {svc.key} (also services[{seen[svc.key]}])")
        seen[svc.key] = i
        for j, vip in enumerate(svc.vips):
            _check_ip(f"{p}.vips[{j}]", vip)
        for j, ep in enumerate(svc.endpoints):
            _check_ip(f"{p}.endpoints[{j}].address", ep.address)
            _check_port(f"{p}.endpoints[{j}].port", ep.port)
            if ep.weight < 0:
                raise ConfigError(f"{p}.endpoints[{j}].weight", "must be >= 0")
        pol = svc.policy
        if pol.timeout is not None and pol.timeout <= 0:
            raise ConfigError(f"{p}.policy.timeout", "must be > 0 or unset")
        if pol.connect_timeout <= 0:
            raise ConfigError(f"{p}.policy.connect_timeout", "must be > 0")
        if pol.idle_timeout <= 0:
            raise ConfigError(f"{p}.policy.idle_timeout", "must be > 0")
        if pol.retry is not None and pol.retry.attempts < 0:
            raise ConfigError(f"{p}.policy.retry.attempts", "must be >= 0")
        _check_rate(f"{p}.policy.rate_limit", pol.rate_limit)
        for j, route in enumerate(svc.routes):
            rp = f"{p}.routes[{j}]"
            for k, m in enumerate(route.matches):
                if m.path is not None and m.path.kind is PathMatchKind.REGEX:
                    try:
                        re.compile(m.path.value)
                    except re.error as exc:
                        raise ConfigError(f"{rp}.matches[{k}].path.value", f"bad regex: {exc}") from exc
            if route.timeout is not None and route.timeout <= 0:
                raise ConfigError(f"{rp}.timeout", "must be > 0 or unset")
    keys = set(seen)
    for i, svc in enumerate(snapshot.services):
        for j, route in enumerate(svc.routes):
            for k, b in enumerate(route.backends):
                if b.service not in keys:
                    raise ConfigError(
                        f"services[{i}].routes[{j}].backends[{k}].service", f"unknown service {b.service!r}"
                    )
    inbound = snapshot.inbound
    _check_ip("inbound.app_address", inbound.app_address)
    for i, ip in enumerate(inbound.ports):
        _check_port(f"inbound.ports[{i}].port", ip.port)
        _check_rate(f"inbound.ports[{i}].rate_limit", ip.rate_limit)
    for port in inbound.opaque_ports:
        _check_port("inbound.opaque_ports", port)


class Runtime:
    """Current config + state kept across config swaps (see module doc)."""

    def __init__(
        self,
        *,
        clock: Clock,
        rng: random.Random,
        cache_path: Path | None = None,
        on_applied: Callable[[Active], None] | None = None,
    ) -> None:
        self.clock = clock
        self.rng = rng
        self.cache_path = cache_path
        self.on_applied = on_applied
        self.active: Active | None = None
        self.pools: dict[ServiceKey, EndpointPool] = {}
        self.breakers: dict[ServiceKey, Breaker] = {}
        self.budgets: dict[ServiceKey, RetryBudgetState] = {}
        # id(service) of the current snapshot -> (service, pool, breaker, budget): the pipeline
        # asks several times per request, and ``Service.key`` formats a string on each call.
        # The tuple holds the service, so its id cannot be reused while the entry exists.
        self._by_id: dict[int, tuple[Service, EndpointPool, Breaker, RetryBudgetState | None]] = {}
        self._buckets: dict[str, tuple[RateLimit, TokenBucket]] = {}

    @property
    def ready(self) -> bool:
        return self.active is not None

    def apply(self, snapshot: Snapshot) -> None:
        """Validate, then make ``snapshot`` current. Raises ``ConfigError`` and changes nothing if invalid."""
        validate(snapshot)
        if not snapshot.version:
            snapshot = snapshot.with_version()
        try:
            table = RouteTable.build(snapshot, self.rng)
        except (re.error, ValueError) as exc:
            raise ConfigError("services", f"cannot build the route table: {exc}") from exc
        ports = MappingProxyType({p.port: p for p in snapshot.inbound.ports})
        limits: dict[str, tuple[RateLimit, str]] = {}
        for svc in snapshot.services:
            if svc.policy.rate_limit is not None and svc.name not in limits:
                limits[svc.name] = (svc.policy.rate_limit, f"service:{svc.name}.{svc.namespace}")
        namespace = snapshot.workload.namespace
        active = Active(
            snapshot=snapshot,
            table=table,
            inbound_ports=ports,
            service_rate_limits=MappingProxyType(limits),
            service_labels=MappingProxyType({s.key: f"{s.name}.{s.namespace}" for s in snapshot.services}),
            inbound_labels=MappingProxyType(
                {
                    port: (p.service if "." in p.service else f"{p.service}.{namespace}")
                    for port, p in ports.items()
                    if p.service
                }
            ),
            inbound_targets=MappingProxyType(
                {port: Endpoint(address=snapshot.inbound.app_address, port=port) for port in ports}
            ),
        )
        self._update_state(snapshot)
        self._by_id = {
            id(svc): (svc, self.pools[svc.key], self.breakers[svc.key], self.budgets.get(svc.key))
            for svc in snapshot.services
            if svc.key in self.pools and svc.key in self.breakers
        }
        self.active = active
        self._persist(snapshot)
        if self.on_applied is not None:
            self.on_applied(active)

    def _update_state(self, snapshot: Snapshot) -> None:
        keys = {s.key for s in snapshot.services}
        for svc in snapshot.services:
            pool = self.pools.get(svc.key)
            if pool is None:
                self.pools[svc.key] = EndpointPool(svc.key, self.clock, self.rng, svc.endpoints, svc.policy)
            else:
                pool.update(svc.endpoints, svc.policy)
            breaker = self.breakers.get(svc.key)
            if breaker is None:
                self.breakers[svc.key] = Breaker(svc.key, svc.policy.circuit_breaker, self.clock)
            else:
                breaker.update_policy(svc.policy.circuit_breaker)
            if svc.policy.retry is not None:
                budget = self.budgets.get(svc.key)
                if budget is None:
                    self.budgets[svc.key] = RetryBudgetState(svc.policy.retry.budget, self.clock)
                else:
                    budget.update(svc.policy.retry.budget)
        # Services that left the config: their state goes (requests in flight hold references).
        for table in (self.pools, self.breakers, self.budgets):
            for key in [k for k in table if k not in keys]:
                del table[key]

    def pool(self, svc: Service) -> EndpointPool:
        held = self._by_id.get(id(svc))
        if held is not None and held[0] is svc:
            return held[1]
        pool = self.pools.get(svc.key)
        if pool is None:  # a service from a snapshot newer than our state: cannot happen after apply
            pool = self.pools[svc.key] = EndpointPool(
                svc.key, self.clock, self.rng, svc.endpoints, svc.policy
            )
        return pool

    def breaker(self, svc: Service) -> Breaker:
        held = self._by_id.get(id(svc))
        if held is not None and held[0] is svc:
            return held[2]
        b = self.breakers.get(svc.key)
        if b is None:
            b = self.breakers[svc.key] = Breaker(svc.key, svc.policy.circuit_breaker, self.clock)
        return b

    def budget(self, svc: Service) -> RetryBudgetState | None:
        if svc.policy.retry is None:
            return None
        held = self._by_id.get(id(svc))
        if held is not None and held[0] is svc and held[3] is not None:
            return held[3]
        b = self.budgets.get(svc.key)
        if b is None:
            b = self.budgets[svc.key] = RetryBudgetState(svc.policy.retry.budget, self.clock)
        return b

    def bucket(self, name: str, policy: RateLimit) -> TokenBucket:
        """The token bucket for ``name`` (an inbound port or service), rebuilt if its policy changed."""
        held = self._buckets.get(name)
        if held is None or held[0] != policy:
            held = (policy, TokenBucket.from_policy(policy, self.clock))
            self._buckets[name] = held
        return held[1]

    # ---- the on-disk cache ----------------------------------------------------------------

    def _persist(self, snapshot: Snapshot) -> None:
        if self.cache_path is None:
            return
        data = to_plain(snapshot)
        data["version"] = snapshot.version
        try:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".config-cache-", dir=self.cache_path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, sort_keys=True)
            os.replace(tmp, self.cache_path)
        except OSError as exc:
            log.warning(
                "could not write the config cache", extra={"path": str(self.cache_path), "error": str(exc)}
            )

    def load_cache(self) -> Snapshot | None:
        """The last good snapshot from ``cache_path``, or None (missing, corrupt or invalid)."""
        if self.cache_path is None or not self.cache_path.exists():
            return None
        from meshproxy.config.load import load_dict

        try:
            data = json.loads(self.cache_path.read_text())
            data.pop("version", None)
            snapshot = load_dict(data)
            validate(snapshot)
        except (OSError, ValueError, ConfigError, NotImplementedError, KeyError, TypeError) as exc:
            log.warning("ignoring the config cache", extra={"path": str(self.cache_path), "error": str(exc)})
            return None
        if not snapshot.version:
            snapshot = snapshot.with_version()
        if snapshot.version != content_version(snapshot):
            return None
        return snapshot
