"""Route table: service lookup by VIP and authority, Gateway API matching, weighted splits."""

from __future__ import annotations

import math
import random

import pytest

from meshproxy.config.model import (
    HeaderMatch,
    HeaderMatchKind,
    HeaderModifier,
    PathMatch,
    PathMatchKind,
    Route,
    RouteMatch,
    Service,
    ServiceKey,
    Snapshot,
    WeightedBackend,
)
from meshproxy.core.routing import RouteTable, apply_header_modifier, path_matches, split_authority

V1 = Service(name="inventory-v1", namespace="demo", port=8080, vips=("198.18.0.11",))
V2 = Service(name="inventory-v2", namespace="demo", port=8080, vips=("198.18.0.12",))
INVENTORY = Service(
    name="inventory",
    namespace="demo",
    port=8080,
    vips=("198.18.0.10", "fd00::10"),
    hostnames=("inventory", "inventory.demo", "inventory.demo.svc.cluster.local"),
    routes=(
        Route(
            name="canary-header",
            matches=(RouteMatch(headers=(HeaderMatch(name="x-canary", value="yes"),)),),
            backends=(WeightedBackend(ServiceKey("inventory-v2.demo:8080")),),
        ),
        Route(
            name="api",
            matches=(
                RouteMatch(path=PathMatch(PathMatchKind.PREFIX, "/api"), method="GET"),
                RouteMatch(path=PathMatch(PathMatchKind.EXACT, "/health")),
            ),
            backends=(
                WeightedBackend(ServiceKey("inventory-v1.demo:8080"), 90),
                WeightedBackend(ServiceKey("inventory-v2.demo:8080"), 10),
            ),
        ),
        Route(
            name="items",
            matches=(RouteMatch(path=PathMatch(PathMatchKind.REGEX, r"/items/\d+")),),
        ),
    ),
)
WEB80 = Service(name="web", namespace="demo", port=80, hostnames=("web",))
WEB_ADMIN = Service(name="web", namespace="demo", port=9000, hostnames=("web",))
SNAP = Snapshot(services=(INVENTORY, V1, V2, WEB80, WEB_ADMIN))


@pytest.fixture
def table() -> RouteTable:
    return RouteTable.build(SNAP, random.Random(7))


def test_vip_wins_over_authority(table: RouteTable) -> None:
    assert table.service_for("198.18.0.11", 8080, "inventory.demo:8080") is V1
    assert table.service_for("fd00:0::10", 8080, None) is INVENTORY  # IPv6 normalised


def test_authority_forms(table: RouteTable) -> None:
    for authority in (
        "inventory:8080",
        "inventory.demo:8080",
        "Inventory.Demo.svc.cluster.local.:8080",
        "inventory.demo.svc:8080",  # implicit form
    ):
        assert table.service_for("127.0.0.1", 8080, authority) is INVENTORY, authority
    # Without a port: the original destination port, then 80, then the only port.
    assert table.service_for(None, None, "inventory") is INVENTORY
    assert table.service_for(None, 80, "web") is WEB80
    assert table.service_for(None, 9000, "web") is WEB_ADMIN
    assert table.service_for(None, 1234, "web") is WEB80
    # An explicit wrong port does not match another port.
    assert table.service_for(None, None, "inventory:9999") is None
    assert table.service_for(None, None, "unknown.demo:8080") is None
    assert table.service_for(None, None, None) is None
    # A ClusterIP literal in Host works when there is no interception.
    assert table.service_for("127.0.0.1", 15001, "198.18.0.12:8080") is V2


def test_split_authority() -> None:
    assert split_authority("Host.Example:8080") == ("host.example", 8080)
    assert split_authority("[::1]:80") == ("::1", 80)
    assert split_authority("[::1]") == ("::1", None)
    assert split_authority("host:notaport") == ("host", None)


@pytest.mark.parametrize(
    ("value", "path", "expected"),
    [
        ("/api", "/api", True),
        ("/api", "/api/", True),
        ("/api", "/api/x/y", True),
        ("/api", "/apix", False),
        ("/api/", "/api", True),
        ("/", "/anything", True),
        ("/api", "/", False),
    ],
)
def test_prefix_is_segment_wise(value: str, path: str, expected: bool) -> None:
    assert path_matches(PathMatchKind.PREFIX, value, path) is expected


def test_route_matching_order_and_conditions(table: RouteTable) -> None:
    d = table.route(INVENTORY, "GET", "/api/stock?sku=1", ())
    assert d is not None and d.route_name == "api"
    # Method is part of that match; /health has no method condition.
    assert table.route(INVENTORY, "POST", "/api/stock", ()) is None
    d = table.route(INVENTORY, "POST", "/health", ())
    assert d is not None and d.route_name == "api"
    # Header route comes first and header names are case-insensitive.
    d = table.route(INVENTORY, "GET", "/api", (("X-Canary", "yes"),))
    assert d is not None and d.route_name == "canary-header" and d.backend is V2
    # Regex is a full match; query string ignored; no backends -> the service itself.
    d = table.route(INVENTORY, "DELETE", "/items/42?force=1", ())
    assert d is not None and d.route_name == "items" and d.backend is INVENTORY
    assert table.route(INVENTORY, "DELETE", "/items/42/x", ()) is None
    assert table.route(INVENTORY, "GET", "/apix", ()) is None


def test_service_without_routes_gets_default_route(table: RouteTable) -> None:
    d = table.route(V1, "PATCH", "/whatever", ())
    assert d is not None and d.backend is V1 and d.route_name == "default"


def test_a_service_object_from_another_snapshot_is_its_own_backend() -> None:
    # A request that captured an older snapshot asks the new table about its Service object:
    # routes without backends (and the implicit default) must name that very object, not the
    # table's equal-keyed one.
    table = RouteTable.build(SNAP, random.Random(7))
    older = Service(
        name="inventory", namespace="demo", port=8080, vips=("198.18.0.10",), routes=INVENTORY.routes
    )
    d = table.route(older, "DELETE", "/items/42", ())
    assert d is not None and d.route_name == "items" and d.backend is older
    d = table.route(INVENTORY, "DELETE", "/items/42", ())
    assert d is not None and d.backend is INVENTORY
    other_v1 = Service(name="inventory-v1", namespace="demo", port=8080)
    d = table.route(other_v1, "GET", "/", ())
    assert d is not None and d.route_name == "default" and d.backend is other_v1


def test_header_regex_and_multiple_values() -> None:
    svc = Service(
        name="a",
        namespace="b",
        port=1,
        routes=(
            Route(
                name="r",
                matches=(RouteMatch(headers=(HeaderMatch("x-user", r"u-\d+", HeaderMatchKind.REGEX),)),),
            ),
        ),
    )
    table = RouteTable.build(Snapshot(services=(svc,)))
    assert table.route(svc, "GET", "/", (("x-user", "admin"), ("x-user", "u-12"))) is not None
    assert table.route(svc, "GET", "/", (("x-user", "u-12x"),)) is None
    assert table.route(svc, "GET", "/", ()) is None


def test_weighted_split_90_10(table: RouteTable) -> None:
    n = 10_000
    picks = [table.route(INVENTORY, "GET", "/api", ()) for _ in range(n)]
    v2 = sum(1 for d in picks if d is not None and d.backend is V2)
    # Binomial(n, 0.1): sd = sqrt(n * 0.1 * 0.9) = 30; 5 sd keeps a false failure below 1e-6.
    sd = math.sqrt(n * 0.1 * 0.9)
    assert abs(v2 - 1000) < 5 * sd
    assert all(d is not None and d.backend in (V1, V2) for d in picks)


def test_rng_is_injected_so_splits_are_reproducible() -> None:
    def run(seed: int) -> list[str]:
        t = RouteTable.build(SNAP, random.Random(seed))
        out = []
        for _ in range(50):
            d = t.route(INVENTORY, "GET", "/api", ())
            assert d is not None
            out.append(d.backend.name)
        return out

    assert run(3) == run(3)
    assert "inventory-v2" in run(3) + run(4) + run(5)


def test_zero_weight_and_unknown_backends() -> None:
    route = Route(
        name="r",
        backends=(
            WeightedBackend(ServiceKey("a.b:1"), 0),
            WeightedBackend(ServiceKey("gone.b:1"), 5),
            WeightedBackend(ServiceKey("c.b:1"), 1),
        ),
    )
    a = Service(name="a", namespace="b", port=1, routes=(route,))
    c = Service(name="c", namespace="b", port=1)
    table = RouteTable.build(Snapshot(services=(a, c)), random.Random(1))
    for _ in range(100):
        d = table.route(a, "GET", "/", ())
        assert d is not None and d.backend is c
    dead = Service(
        name="d",
        namespace="b",
        port=1,
        routes=(Route(name="x", backends=(WeightedBackend(ServiceKey("gone.b:1")),)),),
    )
    table = RouteTable.build(Snapshot(services=(dead,)))
    assert table.route(dead, "GET", "/", ()) is None


def test_apply_header_modifier() -> None:
    headers = (("x-a", "1"), ("x-b", "2"), ("X-C", "3"), ("x-a", "4"))
    out = apply_header_modifier(
        headers, HeaderModifier(set=(("X-A", "new"),), add=(("x-b", "more"),), remove=("x-c",))
    )
    assert out == (("x-b", "2"), ("x-a", "new"), ("x-b", "more"))
    assert apply_header_modifier(headers, HeaderModifier()) is headers
