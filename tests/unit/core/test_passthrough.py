"""Which source the sidecar binds for a connection to its own app (``core.passthrough``)."""

from __future__ import annotations

import pytest

from meshproxy.core.passthrough import INBOUND_SOURCE_V4, INBOUND_SOURCE_V6, source_for
from meshproxy.iptables import InterceptSettings, build_rules, families


@pytest.mark.parametrize(
    ("app_address", "expected"),
    [
        ("127.0.0.1", None),  # loopback: rule 5 lets it through, no bind needed
        ("::1", None),
        ("198.18.0.7", ("127.0.0.6", 0)),  # the pod IP: rule 1's source, or it loops to 15006
        ("2001:2::7", ("::6", 0)),
        ("not-an-ip", None),
    ],
)
def test_only_a_non_loopback_app_address_gets_the_passthrough_source(
    app_address: str, expected: tuple[str, int] | None
) -> None:
    assert source_for(app_address) == expected


def test_the_bound_source_is_the_one_the_iptables_rules_exempt() -> None:
    settings = InterceptSettings()
    v4, v6 = (build_rules(settings, family) for family in families(settings))
    assert f"-o lo -s {INBOUND_SOURCE_V4}/32 -j RETURN" in v4
    assert f"-o lo -s {INBOUND_SOURCE_V6}/128 -j RETURN" in v6
