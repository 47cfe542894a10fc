"""Route table: which service a request is for, which route it matches, which backend it goes to.

Owns: ``RouteTable``, built once per config snapshot (regexes precompiled,
services indexed), and the pure matching functions with Gateway API HTTPRoute
semantics.

API:
    RouteTable.build(snapshot, rng=None) -> RouteTable
    table.service(key) -> Service | None
    table.service_for(dst_ip, dst_port, authority) -> Service | None
        prefers the original destination (ClusterIP vip, port); else the
        Host/:authority: hostnames listed in ``Service.hostnames`` (short forms
        included, as the control plane lists them) and the implicit
        ``name.namespace``, ``name.namespace.svc``, ``name.namespace.svc.cluster.local``;
        with the authority's port, else ``dst_port``, else 80, else the only port
        the host has. A vip literal in the authority works too.
    table.route(service, method, path, headers, rng=None) -> RouteDecision | None
        first matching route wins; a service without routes has one implicit
        catch-all route named "default" to itself; the backend is drawn by weight
        (a route without backends goes to the service itself). ``None``: no
        route matched (the pipeline answers 404 with flag NR), or every backend
        of the matching route is unknown or has weight 0.
    RouteDecision(route, backend, route_name)
    apply_header_modifier(headers, modifier) -> Headers
    path_matches(kind, value, path), split_authority(authority)

Matching rules (Gateway API): PathPrefix matches whole path segments ("/api"
matches "/api", "/api/", "/api/x", not "/apix"; a trailing "/" in the prefix is
ignored); Exact compares the whole path; RegularExpression must match the whole
path. The query string is ignored for path matching. Header names compare
case-insensitively; a header condition holds if any value of that header
matches. Methods compare exactly (HTTP methods are case-sensitive).

Invariants: a table never changes after ``build``; it holds references to the
snapshot's frozen services, so ``decision.backend`` is the very ``Service``
object of the snapshot (its ``key`` indexes runtime state such as endpoint pools).

Concurrency: none. The only mutable thing touched is the injected
``random.Random``, used from the event loop thread only.
"""

from __future__ import annotations

import bisect
import ipaddress
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass

from meshproxy.config.model import (
    HeaderMatchKind,
    HeaderModifier,
    PathMatchKind,
    Route,
    RouteMatch,
    Service,
    ServiceKey,
    Snapshot,
)
from meshproxy.core.http import Headers

DEFAULT_ROUTE = Route(name="default")
_IMPLICIT_SUFFIXES = ("", ".svc", ".svc.cluster.local")


@dataclass(frozen=True, slots=True)
class RouteDecision:
    route: Route
    backend: Service
    route_name: str


@dataclass(frozen=True, slots=True)
class _CompiledHeader:
    name: str
    value: str
    regex: re.Pattern[str] | None


@dataclass(frozen=True, slots=True)
class _CompiledMatch:
    path_kind: PathMatchKind | None
    path_value: str
    path_regex: re.Pattern[str] | None
    method: str | None
    headers: tuple[_CompiledHeader, ...]


@dataclass(frozen=True, slots=True)
class _CompiledRoute:
    route: Route
    matches: tuple[_CompiledMatch, ...]
    backends: tuple[Service, ...]  # resolved, weight > 0 only
    cumulative: tuple[int, ...]  # running sum of weights, for bisect
    # The decision when nothing is drawn (no backends: the owning service; one backend),
    # built once: a frozen dataclass per request costs more than the matching.
    fixed: RouteDecision | None = None


def split_authority(authority: str) -> tuple[str, int | None]:
    """``"Host:8080"`` -> ``("host", 8080)``; ``"[::1]:80"`` -> ``("::1", 80)``; bad port -> None."""
    a = authority.strip().lower()
    host, port_text = a, ""
    if a.startswith("["):
        end = a.find("]")
        if end < 0:
            return a, None
        host = a[1:end]
        rest = a[end + 1 :]
        if rest.startswith(":"):
            port_text = rest[1:]
    elif a.count(":") == 1:
        host, port_text = a.split(":", 1)
    port: int | None = None
    if port_text.isdigit() and 0 < int(port_text) < 65536:
        port = int(port_text)
    return host.rstrip("."), port


def path_matches(kind: PathMatchKind, value: str, path: str, regex: re.Pattern[str] | None = None) -> bool:
    """Gateway API path matching of ``path`` (query string already removed)."""
    if kind is PathMatchKind.EXACT:
        return path == value
    if kind is PathMatchKind.PREFIX:
        prefix = value.rstrip("/")
        return prefix == "" or path == prefix or path.startswith(prefix + "/")
    pattern = regex if regex is not None else re.compile(value)
    return pattern.fullmatch(path) is not None


def _strip_query(path: str) -> str:
    for sep in ("?", "#"):
        i = path.find(sep)
        if i >= 0:
            path = path[:i]
    return path


def _compile_match(m: RouteMatch) -> _CompiledMatch:
    headers = tuple(
        _CompiledHeader(
            name=h.name.lower(),
            value=h.value,
            regex=re.compile(h.value) if h.kind is HeaderMatchKind.REGEX else None,
        )
        for h in m.headers
    )
    kind = m.path.kind if m.path is not None else None
    value = m.path.value if m.path is not None else ""
    regex = re.compile(value) if kind is PathMatchKind.REGEX else None
    return _CompiledMatch(kind, value, regex, m.method, headers)


def _match(m: _CompiledMatch, method: str, path: str, headers: Headers) -> bool:
    if m.method is not None and m.method != method:
        return False
    if m.path_kind is not None and not path_matches(m.path_kind, m.path_value, path, m.path_regex):
        return False
    for h in m.headers:
        values = [v for k, v in headers if k.lower() == h.name]
        if h.regex is not None:
            if not any(h.regex.fullmatch(v) for v in values):
                return False
        elif h.value not in values:
            return False
    return True


class RouteTable:
    """Immutable per-snapshot index of services and compiled routes (see module doc)."""

    __slots__ = ("_by_host", "_by_id", "_by_key", "_by_vip", "_compiled", "_rng", "snapshot")

    def __init__(
        self,
        snapshot: Snapshot,
        by_key: dict[ServiceKey, Service],
        by_vip: dict[tuple[str, int], Service],
        by_host: dict[str, dict[int, Service]],
        compiled: dict[ServiceKey, tuple[_CompiledRoute, ...]],
        rng: random.Random,
    ) -> None:
        self.snapshot = snapshot
        self._by_key = by_key
        self._by_vip = by_vip
        self._by_host = by_host
        self._compiled = compiled
        self._rng = rng
        # id(service) -> (service, its compiled routes, its default decision when it has no
        # routes): ``Service.key`` formats a string on every call; the tuple holds the
        # service, so the id is not reused while the table lives.
        self._by_id: dict[int, tuple[Service, tuple[_CompiledRoute, ...], RouteDecision | None]] = {
            id(s): (
                s,
                compiled[key],
                None if compiled[key] else RouteDecision(DEFAULT_ROUTE, s, DEFAULT_ROUTE.name),
            )
            for key, s in by_key.items()
        }

    @classmethod
    def build(cls, snapshot: Snapshot, rng: random.Random | None = None) -> RouteTable:
        by_key: dict[ServiceKey, Service] = {}
        for s in snapshot.services:
            by_key.setdefault(s.key, s)  # first wins on a (validated-away) duplicate
        by_vip: dict[tuple[str, int], Service] = {}
        by_host: dict[str, dict[int, Service]] = {}
        for s in by_key.values():
            for vip in s.vips:
                by_vip.setdefault((_norm_ip(vip), s.port), s)
        # Explicit hostnames take precedence over implicit ones, whatever the service order.
        for s in by_key.values():
            for h in s.hostnames:
                by_host.setdefault(h.lower().rstrip("."), {}).setdefault(s.port, s)
        for s in by_key.values():
            for suffix in _IMPLICIT_SUFFIXES:
                by_host.setdefault(f"{s.name}.{s.namespace}{suffix}".lower(), {}).setdefault(s.port, s)
        compiled = {key: tuple(_compile_route(r, by_key, s) for r in s.routes) for key, s in by_key.items()}
        return cls(snapshot, by_key, by_vip, by_host, compiled, rng if rng is not None else random.Random())

    def service(self, key: str) -> Service | None:
        return self._by_key.get(ServiceKey(key))

    @property
    def services(self) -> Iterable[Service]:
        return self._by_key.values()

    def service_for(self, dst_ip: str | None, dst_port: int | None, authority: str | None) -> Service | None:
        if dst_ip and dst_port is not None:
            # Exact string first: the socket layer hands us canonical text, so parsing is rare.
            hit = self._by_vip.get((dst_ip, dst_port)) or self._by_vip.get((_norm_ip(dst_ip), dst_port))
            if hit is not None:
                return hit
        if not authority:
            return None
        host, port = split_authority(authority)
        ports = [port] if port is not None else [p for p in (dst_port, 80) if p is not None]
        by_port = self._by_host.get(host)
        if by_port is not None:
            for p in ports:
                if p in by_port:
                    return by_port[p]
            if port is None and len(by_port) == 1:
                return next(iter(by_port.values()))
            return None
        for p in ports:  # the client may have used a ClusterIP literal as Host
            hit = self._by_vip.get((_norm_ip(host), p))
            if hit is not None:
                return hit
        return None

    def route(
        self,
        service: Service,
        method: str,
        path: str,
        headers: Headers,
        rng: random.Random | None = None,
    ) -> RouteDecision | None:
        routes: tuple[_CompiledRoute, ...] | None
        held = self._by_id.get(id(service))
        if held is not None and held[0] is service:
            routes, default, own = held[1], held[2], True
        else:
            routes = self._compiled.get(service.key)
            if routes is None:  # a service object from another snapshot: compile on the fly
                routes = tuple(_compile_route(r, self._by_key, service) for r in service.routes)
            default, own = None, False
        if not routes:
            return default or RouteDecision(DEFAULT_ROUTE, service, DEFAULT_ROUTE.name)
        bare = _strip_query(path)
        for cr in routes:
            if any(_match(m, method, bare, headers) for m in cr.matches):
                # A precomputed decision names the table's own service when the route has
                # no backends: only right when ``service`` is that very object.
                if cr.fixed is not None and (own or cr.route.backends):
                    return cr.fixed
                return self._decide(cr, service, rng or self._rng)
        return None

    @staticmethod
    def _decide(cr: _CompiledRoute, service: Service, rng: random.Random) -> RouteDecision | None:
        if not cr.route.backends:
            return RouteDecision(cr.route, service, cr.route.name)
        if not cr.backends:
            return None
        if len(cr.backends) == 1:
            return RouteDecision(cr.route, cr.backends[0], cr.route.name)
        ticket = rng.randrange(cr.cumulative[-1])
        return RouteDecision(cr.route, cr.backends[bisect.bisect_right(cr.cumulative, ticket)], cr.route.name)


def _compile_route(route: Route, by_key: dict[ServiceKey, Service], owner: Service) -> _CompiledRoute:
    backends: list[Service] = []
    cumulative: list[int] = []
    total = 0
    for b in route.backends:
        target = by_key.get(b.service)
        if target is None or b.weight <= 0:
            continue
        total += b.weight
        backends.append(target)
        cumulative.append(total)
    fixed: RouteDecision | None = None
    if not route.backends:
        fixed = RouteDecision(route, owner, route.name)
    elif len(backends) == 1:
        fixed = RouteDecision(route, backends[0], route.name)
    return _CompiledRoute(
        route, tuple(_compile_match(m) for m in route.matches), tuple(backends), tuple(cumulative), fixed
    )


def _norm_ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text.lower()


def apply_header_modifier(headers: Headers, modifier: HeaderModifier) -> Headers:
    """Gateway API HTTPHeaderFilter: ``set`` replaces, ``add`` appends, ``remove`` deletes.

    Names are compared case-insensitively and written lower-case (the model's convention).
    """
    if not (modifier.set or modifier.add or modifier.remove):
        return headers
    drop = {n.lower() for n in modifier.remove} | {n.lower() for n, _ in modifier.set}
    out = [(k, v) for k, v in headers if k.lower() not in drop]
    out.extend((n.lower(), v) for n, v in modifier.set)
    out.extend((n.lower(), v) for n, v in modifier.add)
    return tuple(out)
