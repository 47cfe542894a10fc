"""App wiring pieces: manifests from a directory, and policy status hand-off."""

from __future__ import annotations

import asyncio
import pathlib
import time

from controlplane.app import DirectorySource, StatusPublisher, load_manifests
from controlplane.compile import PolicyStatus, Reason
from controlplane.events import Relist


def test_load_manifests_reads_multi_docs_lists_and_defaults_the_namespace(tmp_path: pathlib.Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.yaml").write_text(
        "kind: Service\nmetadata: {name: a}\nspec: {}\n---\nkind: ConfigMap\nmetadata: {name: ignored}\n"
        "---\nkind: Namespace\nmetadata: {name: shop}\n"
    )
    (tmp_path / "sub" / "b.yml").write_text(
        "kind: List\nitems:\n- {kind: Pod, metadata: {name: p, namespace: shop}}\n"
    )
    (tmp_path / "notes.txt").write_text("kind: Service\nmetadata: {name: nope}\n")
    got = load_manifests(tmp_path)
    assert [o["metadata"] for o in got["Service"]] == [{"name": "a", "namespace": "default"}]
    assert [o["metadata"] for o in got["Namespace"]] == [{"name": "shop"}]  # cluster-scoped
    assert [o["metadata"]["name"] for o in got["Pod"]] == ["p"]


def status(name: str, accepted: bool) -> PolicyStatus:
    reason = Reason.ACCEPTED if accepted else Reason.TARGET_NOT_FOUND
    return PolicyStatus("TrafficPolicy", "ns", name, 1, accepted, reason)


class Sink:
    def __init__(self) -> None:
        self.written: list[PolicyStatus] = []
        self.fail_next = False

    async def write(self, s: PolicyStatus) -> None:
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("API server away")
        self.written.append(s)


async def test_only_changed_statuses_are_written_and_failures_are_retried() -> None:
    sink = Sink()
    pub = StatusPublisher(sink)
    task = asyncio.create_task(pub.run(), name="test-status")

    async def settled(n: int) -> None:
        deadline = time.monotonic() + 5
        while len(sink.written) < n:
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.005)

    try:
        sink.fail_next = True
        pub.offer([status("a", False), status("b", True)])
        await settled(1)
        assert sink.written == [status("b", True)]  # a's write failed
        pub.offer([status("a", False), status("b", True)])  # re-offered: a is retried, b is unchanged
        await settled(2)
        pub.offer([status("a", True), status("b", True)])
        await settled(3)
        assert sink.written == [status("b", True), status("a", False), status("a", True)]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_directory_source_keeps_the_last_state_over_a_broken_file(tmp_path: pathlib.Path) -> None:
    events: list[Relist] = []
    (tmp_path / "a.yaml").write_text("kind: Service\nmetadata: {name: a, namespace: ns}\n")
    src = DirectorySource(tmp_path, events.append, poll_interval=0.01)  # type: ignore[arg-type]
    task = asyncio.create_task(src.run(), name="test-dir-source")

    async def until(cond: object) -> None:
        deadline = time.monotonic() + 5
        while not cond():  # type: ignore[operator]
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.005)

    try:
        await until(lambda: len(events) == 6)  # one Relist per kind
        services = [e for e in events if e.kind == "Service"]
        assert [o["metadata"]["name"] for o in services[0].objects] == ["a"]
        (tmp_path / "a.yaml").write_text("kind: Service\nmetadata: {name: [unclosed\n")
        await asyncio.sleep(0.1)  # several polls: asserting that nothing is delivered
        assert len(events) == 6
        (tmp_path / "a.yaml").write_text("kind: Service\nmetadata: {name: b, namespace: ns}\n")
        await until(lambda: len(events) == 12)
        (relisted,) = [e for e in events[6:] if e.kind == "Service"]
        assert [o["metadata"]["name"] for o in relisted.objects] == ["b"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
