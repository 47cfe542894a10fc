"""A small load generator for the demo: N GETs, then one JSON summary line on stdout.

``python -m meshdemo.load http://frontend.demo:8080/ -n 100 -c 4`` sends each request with
a fresh sampled W3C ``traceparent`` (so the caller knows the trace ids to look up) and
prints ``{"requests", "status", "versions", "trace_ids", "errors", "seconds"}`` where
``versions`` counts the inventory version each answer came from.

Concurrency: ``-c`` worker threads pulling from a shared counter; results are collected
under a lock.
"""

from __future__ import annotations

import argparse
import collections
import json
import secrets
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from meshdemo.common import get_json


def inventory_version(body: Any) -> str:
    try:
        return str(body["catalog"]["inventory"]["version"])
    except (KeyError, TypeError):
        return "none"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m meshdemo.load")
    p.add_argument("url")
    p.add_argument("-n", "--requests", type=int, default=100)
    p.add_argument("-c", "--concurrency", type=int, default=4)
    p.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args(argv)

    lock = threading.Lock()
    status: collections.Counter[str] = collections.Counter()
    versions: collections.Counter[str] = collections.Counter()
    trace_ids: list[str] = []
    errors: list[str] = []
    remaining = iter(range(args.requests))

    def worker() -> None:
        while True:
            with lock:
                if next(remaining, None) is None:
                    return
            trace_id = secrets.token_hex(16)
            headers = {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}
            code, body = get_json(args.url, headers, timeout=args.timeout)
            with lock:
                status[str(code)] += 1
                trace_ids.append(trace_id)
                if code == 200:
                    versions[inventory_version(body)] += 1
                elif len(errors) < 5:
                    errors.append(f"{code}: {str(body)[:200]}")

    started = time.monotonic()
    threads = [threading.Thread(target=worker, name=f"load-{i}") for i in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    summary = {
        "requests": args.requests,
        "status": dict(status),
        "versions": dict(versions),
        "trace_ids": trace_ids,
        "errors": errors,
        "seconds": round(time.monotonic() - started, 3),
    }
    print(json.dumps(summary))
    return 0 if status.get("200") == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())
