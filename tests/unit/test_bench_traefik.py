"""Traefik's build helper (bench/traefik/prune_lego.py): dropping unserved ACME DNS providers.

If the pruning left a dangling import or a ``case`` without its ``return``, the Traefik build
(and so ``make bench-peers``' Traefik scenario) would fail to compile; these tests pin the rule.
"""

from __future__ import annotations

from bench.traefik.prune_lego import prune

FACTORY = """package dns

import (
\t"fmt"

\t"github.com/go-acme/lego/v5/providers/dns/alidns"
\t"github.com/go-acme/lego/v5/providers/dns/cloudflare"
\t"github.com/go-acme/lego/v5/providers/dns/edgedns"
)

func NewDNSChallengeProviderByName(name string) (challenge.Provider, error) {
\tswitch name {
\tcase "alidns":
\t\treturn alidns.NewDNSProvider()
\tcase "cloudflare":
\t\treturn cloudflare.NewDNSProvider()
\tcase "edgedns", "fastdns":
\t\treturn edgedns.NewDNSProvider()
\tdefault:
\t\treturn nil, fmt.Errorf("unrecognized DNS provider: %s", name)
\t}
}
"""


def test_pruned_providers_lose_import_and_branch() -> None:
    out = prune(FACTORY, {"alidns", "edgedns"})
    assert "alidns" not in out and "edgedns" not in out and "fastdns" not in out
    assert '\t"github.com/go-acme/lego/v5/providers/dns/cloudflare"\n' in out
    assert '\tcase "cloudflare":\n\t\treturn cloudflare.NewDNSProvider()\n' in out
    assert "\tdefault:\n" in out


def test_nothing_to_prune_keeps_the_file_byte_for_byte() -> None:
    assert prune(FACTORY, set()) == FACTORY
    assert prune(FACTORY, {"notthere"}) == FACTORY
