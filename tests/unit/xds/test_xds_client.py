"""The sidecar client's per-response decisions (ACK / NACK / keep last good) and backoff."""

from __future__ import annotations

import random

from controlplane.convert import response, snapshot_to_proto
from meshproxy.config import model
from meshproxy.core.errors import ConfigError
from meshproxy.xds.client import Backoff, XdsClient
from meshproxy.xds.convert import ProxyNode


def snap(name: str) -> model.Snapshot:
    return model.Snapshot(services=(model.Service(name=name, namespace="ns", port=80),)).with_version()


class Recorder:
    def __init__(self, fail: BaseException | None = None) -> None:
        self.applied: list[model.Snapshot] = []
        self.fail = fail

    def __call__(self, s: model.Snapshot) -> None:
        if self.fail is not None:
            raise self.fail
        self.applied.append(s)


def client(apply: Recorder) -> XdsClient:
    return XdsClient("127.0.0.1:1", ProxyNode(pod="p", namespace="ns"), apply)


async def test_a_good_snapshot_is_applied_and_acked_with_its_version_and_nonce() -> None:
    rec = Recorder()
    c = client(rec)
    s = snap("a")
    req = await c._handle(response(snapshot_to_proto(s), s.version, "7"))
    assert rec.applied == [s] and c.last_good == s
    assert (req.version_info, req.response_nonce, req.HasField("error_detail")) == (s.version, "7", False)
    # The same version again (e.g. after a reconnect) is ACKed without applying it twice.
    req = await c._handle(response(snapshot_to_proto(s), s.version, "8"))
    assert len(rec.applied) == 1 and req.response_nonce == "8" and not req.HasField("error_detail")


async def test_a_rejected_snapshot_is_nacked_with_the_last_good_version() -> None:
    rec = Recorder()
    c = client(rec)
    good, bad = snap("a"), snap("b")
    await c._handle(response(snapshot_to_proto(good), good.version, "1"))
    rec.fail = ConfigError("services[0]", "not on my watch")
    req = await c._handle(response(snapshot_to_proto(bad), bad.version, "2"))
    assert req.version_info == good.version and req.response_nonce == "2"
    assert req.error_detail.code == 3 and "not on my watch" in req.error_detail.message
    assert c.last_good == good


async def test_a_bug_in_apply_is_nacked_not_fatal() -> None:
    c = client(Recorder(fail=RuntimeError("boom")))
    s = snap("a")
    req = await c._handle(response(snapshot_to_proto(s), s.version, "1"))
    assert "boom" in req.error_detail.message and req.version_info == "" and c.last_good is None


async def test_an_invalid_snapshot_never_reaches_apply() -> None:
    rec = Recorder()
    c = client(rec)
    s = snap("a")
    msg = snapshot_to_proto(s)
    msg.services[0].port = 0
    req = await c._handle(response(msg, "", "1"))
    assert rec.applied == [] and "services[0].port" in req.error_detail.message


def test_backoff_doubles_to_a_cap_with_jitter_below_each_step() -> None:
    b, rng = Backoff(initial=0.5, maximum=30.0), random.Random(1)
    for attempt, base in [(0, 0.5), (1, 1.0), (3, 4.0), (10, 30.0)]:
        delays = [b.delay(attempt, rng) for _ in range(200)]
        assert all(base / 2 <= d <= base for d in delays)
        assert max(delays) - min(delays) > base / 4  # actually jittered
