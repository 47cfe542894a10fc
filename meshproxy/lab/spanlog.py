"""Run the OTLP test receiver in a lab pod and append every span to a JSON-lines file.

Owns: ``python -m meshproxy.lab.spanlog --port 4317 --http-port 4318 --out FILE``, the
demo's "tracing backend" (it plays Jaeger's part in a lab pod, so the sidecars export over
the lab network like they would in a cluster): OTLP/gRPC on ``--port`` and OTLP/HTTP
(``POST /v1/traces``) on ``--http-port``, both into the same file, each span with the
transport it came in on (``ReceivedSpan.transport``). Also ``read_spans``/``render_trace``,
used by the demo on the other side of the file to show one request's hops.

Invariants: one JSON object per line, written whole and flushed per export batch, so a
reader never sees half a span once a line ends with a newline; spans of one trace may arrive
in any order and in several batches (each sidecar exports on its own schedule).

Concurrency: the receiver's asyncio loop; file writes happen on it, one batch at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from meshproxy.lab.otlp_receiver import TRACES_PATH, OtlpReceiver, ReceivedSpan


async def _serve(host: str, port: int, http_port: int, out: Path) -> None:
    receiver = OtlpReceiver(host, port, http_port=http_port, max_spans=10_000)
    with out.open("a") as sink:

        def write(spans: list[ReceivedSpan]) -> None:
            sink.write("".join(json.dumps(dataclasses.asdict(s), default=str) + "\n" for s in spans))
            sink.flush()

        receiver.on_spans = write
        await receiver.start()
        print(
            f"OTLP/gRPC receiver on {host}:{receiver.port}, OTLP/HTTP on {host}:{receiver.http_port}"
            f"{TRACES_PATH}, spans to {out}",
            flush=True,
        )
        try:
            await asyncio.Event().wait()
        finally:
            await receiver.stop()


def read_spans(path: Path, trace_id: str | None = None) -> list[ReceivedSpan]:
    """Complete lines of ``path`` as spans (of one trace if ``trace_id``), in start order."""
    if not path.exists():
        return []
    spans = []
    for line in path.read_text().splitlines(keepends=True):
        if not line.endswith("\n"):
            break  # a batch still being written
        span = ReceivedSpan(**json.loads(line))
        if trace_id is None or span.trace_id == trace_id:
            spans.append(span)
    return sorted(spans, key=lambda s: s.start_ns)


def render_trace(spans: Sequence[ReceivedSpan]) -> str:
    """An indented tree: service, span kind, name, duration, HTTP status and span status.

    Spans whose parent is not among ``spans`` (the caller's own span, never exported) are roots.
    """
    ids = {s.span_id for s in spans}
    children: dict[str, list[ReceivedSpan]] = collections.defaultdict(list)
    for s in spans:
        children[s.parent_span_id if s.parent_span_id in ids else ""].append(s)
    lines: list[str] = []

    def walk(parent: str, depth: int) -> None:
        for s in children.get(parent, []):
            ms = (s.end_ns - s.start_ns) / 1e6
            code = s.attributes.get("http.response.status_code", "-")
            head = f"{'   ' * depth}{'└─ ' if depth else ''}{s.service}"
            lines.append(f"{head:<34} {s.kind:<7} {s.name:<28} {ms:8.2f} ms  http={code}  status={s.status}")
            walk(s.span_id, depth + 1)

    walk("", 0)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m meshproxy.lab.spanlog")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=4317, help="OTLP/gRPC port (default 4317)")
    p.add_argument("--http-port", type=int, default=4318, help="OTLP/HTTP port (default 4318)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.host, args.port, args.http_port, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
