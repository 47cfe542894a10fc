"""``meshproxy demo``: its generated sidecar configs, its refusal without root, and full runs
over each span transport (OTLP/HTTP by default, OTLP/gRPC with ``--otlp grpc``)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys

import pytest
import yaml

from meshproxy.config.load import load_dict
from meshproxy.config.model import ServiceKey
from meshproxy.lab import demo
from meshproxy.lab.mesh import config_yaml
from meshproxy.lab.netns import PREFIX
from meshproxy.lab.otlp_receiver import GRPC, HTTP

POD_IPS = {p.name: f"198.18.0.{i}" for i, p in enumerate(demo.PODS, start=3)}


def test_generated_configs_load_back_and_carry_the_split() -> None:
    snapshots = demo.build_snapshots(POD_IPS, demo.SpanTransport.HTTP.tracing("198.18.0.2"))
    assert set(snapshots) == {p.name for p in demo.PODS}
    for name, snapshot in snapshots.items():
        assert load_dict(yaml.safe_load(config_yaml(snapshot))) == snapshot, name
    catalog = snapshots["catalog"]
    inventory = next(s for s in catalog.services if s.name == "inventory")
    assert inventory.vips == ("198.19.0.12",)
    assert "inventory.demo.svc.cluster.local" in inventory.hostnames
    split = {b.service: b.weight for b in inventory.routes[0].backends}
    assert split == {ServiceKey("inventory-v1.demo:8080"): 90, ServiceKey("inventory-v2.demo:8080"): 10}
    assert [p.service for p in catalog.inbound.ports] == ["catalog"]
    assert snapshots["inventory-v2"].inbound.ports[0].service == "inventory-v2"
    assert snapshots["client"].inbound.ports == ()
    assert catalog.telemetry.tracing.otlp_http_endpoint == "http://198.18.0.2:4318/v1/traces"
    assert catalog.telemetry.tracing.otlp_grpc_endpoint is None
    # Every name an app uses resolves to a VIP some service owns.
    hosts = demo.hosts_file()
    vips = {vip for s in catalog.services for vip in s.vips}
    assert set(hosts) == vips
    assert ["catalog.demo", "catalog.demo.svc", "catalog.demo.svc.cluster.local"] in hosts.values()


def test_span_transport_defaults_to_otlp_http_and_grpc_can_be_chosen() -> None:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    assert parser.parse_args([]).otlp is demo.SpanTransport.HTTP
    assert parser.parse_args(["--otlp", "grpc"]).otlp is demo.SpanTransport.GRPC
    with pytest.raises(SystemExit):
        parser.parse_args(["--otlp", "zipkin"])
    grpc = demo.build_snapshots(POD_IPS, demo.SpanTransport.GRPC.tracing("198.18.0.2"))["catalog"]
    assert grpc.telemetry.tracing.otlp_grpc_endpoint == "http://198.18.0.2:4317"
    assert grpc.telemetry.tracing.otlp_http_endpoint is None
    # A bare endpoint (what callers passed before) still means OTLP/gRPC.
    assert demo.build_snapshots(POD_IPS, "http://198.18.0.2:4317")["catalog"] == grpc


def test_demo_without_root_says_so_and_exits_1() -> None:
    code = "import argparse,sys; from meshproxy.lab import demo; sys.exit(demo.main(argparse.Namespace()))"
    argv = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert "needs root" in done.stderr and "sudo make demo" in done.stderr


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.parametrize(
    ("flags", "transport", "port"),
    [((), HTTP, 4318), (("--otlp", "grpc"), GRPC, 4317)],
    ids=["default", "grpc"],
)
def test_demo_runs_end_to_end_and_tears_down(
    lab: object,  # `lab`: skip/fail like other lab tests
    flags: tuple[str, ...],
    transport: str,
    port: int,
) -> None:
    if importlib.util.find_spec("meshproxy.io.app") is None:
        pytest.skip("the sidecar (meshproxy.io.app) has not landed yet")
    done = subprocess.run(
        [sys.executable, "-m", "meshproxy", "demo", "-n", "100", *flags],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "status     200: 100" in out
    split = dict(re.findall(r"(v[12]): (\d+) \(", out))
    assert set(split) <= {"v1", "v2"} and sum(map(int, split.values())) == 100
    assert int(split["v1"]) > 50  # 90/10 split; v2 may be absent by chance
    assert f"sidecars export over {transport} to :{port}" in out
    # The transport in the header is the one the receiver recorded for these spans.
    header = re.search(r"one request's hops \(trace \w+, (\d+) spans, over ([^)]+)\):", out)
    assert header is not None, out
    assert int(header.group(1)) >= 4 and header.group(2) == transport
    tree = out.split("one request's hops", 1)[1]
    for service in ("client", "frontend", "catalog", "inventory-v"):
        assert service in tree
    assert "lab torn down" in out
    run = re.search(rf"lab ({re.escape(PREFIX)}\d+-\w+-)\*", out)
    assert run is not None
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert run.group(1) not in listed
