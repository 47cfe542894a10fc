"""The demo's inventory: ``GET /stock``; its answer names its ``VERSION`` (v1 or v2).

``FAIL_PERCENT`` (default 0) makes that share of requests answer 503, to show retries
and outlier detection; ``DELAY_MS`` adds latency to every answer.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Mapping
from typing import Any

from meshdemo.common import serve, trace_headers

VERSION = os.environ.get("VERSION", "v1")
FAIL_PERCENT = float(os.environ.get("FAIL_PERCENT", "0"))
DELAY_MS = float(os.environ.get("DELAY_MS", "0"))
STOCK = {"v1": {"teapot": 3, "kettle": 0, "mug": 12}, "v2": {"teapot": 5, "kettle": 2, "mug": 40}}


def handle(path: str, headers: Mapping[str, str]) -> tuple[int, Any]:
    if DELAY_MS:
        time.sleep(DELAY_MS / 1000)
    if random.uniform(0, 100) < FAIL_PERCENT:
        return 503, {"service": "inventory", "version": VERSION, "error": "injected failure"}
    # Echoing the trace headers that arrived shows the context made it through every hop.
    body = {"service": "inventory", "version": VERSION, "stock": STOCK.get(VERSION, {})}
    return 200, {**body, "trace_headers": trace_headers(headers)}


if __name__ == "__main__":
    serve("inventory", handle)
