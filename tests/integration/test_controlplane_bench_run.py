"""End-to-end run of ``make bench-controlplane`` at toy scale (real API server, real control plane).

Owns: proof that the benchmark measures what its report claims: every change reaches
every simulated proxy (one push each), the plain watch sees every change, and the
report has the figures the docs table shows. Performance is not asserted.
Concurrency: ``bench.controlplane.run`` owns its processes and loop; this test only
calls it and reads the result.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.controlplane import Params, markdown, run
from tests.support.apiserver import locate_binaries

pytestmark = [pytest.mark.apiserver, pytest.mark.slow]


def test_toy_mesh_converges_and_is_reported(tmp_path: Path) -> None:
    bins, reason = locate_binaries()
    if bins is None:
        pytest.skip(reason)
    params = Params(
        proxies=4, services=3, endpoints=12, workloads=2, changes=3, warmup=1, settle=0.3, timeout=60
    )
    report = run(params, tmp_path)
    r = report["result"]
    assert len(r["samples"]) == params.changes
    for s in r["samples"]:
        # Every proxy's snapshot holds every service, so each change is one push per proxy,
        # and (each proxy having ACKed its last one) an incremental endpoint update.
        assert s["pushes"] == params.proxies
        assert s["endpoint_updates"] == params.proxies
        assert s["bytes_per_push"] > 0
        assert s["reference"] > 0
        assert s["convergence"] > 0
    assert r["server_pushes_per_change"] == params.proxies
    assert r["proxy_reconnects"] == 0
    assert r["rss_mib_peak"] >= r["rss_mib_end"] > 0
    text = markdown(report)
    assert "convergence - reference" in text and f"{params.proxies} proxies" in text
