"""Traffic driver the journey test runs *inside* the demo's loadgen pod.

Piped to ``python3 -`` through ``kubectl exec -i`` (standard library only: it runs in
the application container, next to its injected sidecar, so every request takes the
real path app -> iptables -> sidecar -> peer sidecar -> app).

    python3 - URL [-n N | --seconds S] [-c C] [--timeout T]

Sends GETs from ``C`` threads until ``N`` requests were sent or ``S`` seconds passed,
each with a fresh sampled W3C ``traceparent`` (the trace id is known to the caller),
and prints one JSON line: ``requests``, ``status`` (code -> count), ``flags`` (the
sidecar's response flag header -> count), ``versions`` (inventory version -> count),
``trace_ids`` (of 2xx answers, at most 50), ``errors`` (first 10 transport errors).

Concurrency: worker threads, results merged under one lock; bounded by N or S.
"""

from __future__ import annotations

import argparse
import collections
import json
import secrets
import threading
import time
import urllib.error
import urllib.request
from typing import Any

FLAG_HEADER = "x-meshproxy-flag"


def version_of(body: Any) -> str:
    # frontend -> catalog -> inventory nests the inventory's answer; inventory answers directly.
    for path in (("catalog", "inventory", "version"), ("version",)):
        node = body
        try:
            for key in path:
                node = node[key]
        except (KeyError, TypeError, IndexError):
            continue
        return str(node)
    return "none"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("-n", "--requests", type=int, default=0)
    p.add_argument("--seconds", type=float, default=0.0)
    p.add_argument("-c", "--concurrency", type=int, default=2)
    p.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args()
    if args.requests <= 0 and args.seconds <= 0:
        p.error("give -n or --seconds")

    lock = threading.Lock()
    status: collections.Counter[str] = collections.Counter()
    flags: collections.Counter[str] = collections.Counter()
    versions: collections.Counter[str] = collections.Counter()
    trace_ids: list[str] = []
    errors: list[str] = []
    sent = 0
    deadline = time.monotonic() + args.seconds if args.seconds > 0 else None

    def take() -> bool:
        nonlocal sent
        with lock:
            if args.requests > 0 and sent >= args.requests:
                return False
            if deadline is not None and time.monotonic() >= deadline:
                return False
            sent += 1
            return True

    def one() -> None:
        trace_id = secrets.token_hex(16)
        req = urllib.request.Request(
            args.url, headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}
        )
        code, flag, body = 0, "", None
        try:
            with urllib.request.urlopen(req, timeout=args.timeout) as resp:
                code, flag, raw = resp.status, resp.headers.get(FLAG_HEADER, ""), resp.read()
        except urllib.error.HTTPError as exc:
            code, flag, raw = exc.code, exc.headers.get(FLAG_HEADER, ""), exc.read()
        except OSError as exc:
            with lock:
                status["error"] += 1
                if len(errors) < 10:
                    errors.append(repr(exc))
            return
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        with lock:
            status[str(code)] += 1
            if flag:
                flags[flag] += 1
            if 200 <= code < 300:
                versions[version_of(body)] += 1
                if len(trace_ids) < 50:
                    trace_ids.append(trace_id)

    def worker() -> None:
        while take():
            one()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(
        json.dumps(
            {
                "requests": sent,
                "status": dict(status),
                "flags": dict(flags),
                "versions": dict(versions),
                "trace_ids": trace_ids,
                "errors": errors,
            }
        )
    )


if __name__ == "__main__":
    main()
