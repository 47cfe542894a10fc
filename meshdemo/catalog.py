"""The demo's catalog: ``GET /items`` lists items with the stock inventory reports for them."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from meshdemo.common import get_json, serve, trace_headers

INVENTORY_URL = os.environ.get("INVENTORY_URL", "http://inventory.demo:8080")
ITEMS = ("teapot", "kettle", "mug")


def handle(path: str, headers: Mapping[str, str]) -> tuple[int, Any]:
    status, inventory = get_json(f"{INVENTORY_URL}/stock", trace_headers(headers))
    if status != 200:
        return 502, {"service": "catalog", "error": f"inventory answered {status}", "inventory": inventory}
    return 200, {"service": "catalog", "items": list(ITEMS), "inventory": inventory}


if __name__ == "__main__":
    serve("catalog", handle)
