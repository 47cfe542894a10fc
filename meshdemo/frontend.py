"""The demo's entry service: ``GET /`` asks the catalog for its items and wraps the answer."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from meshdemo.common import get_json, serve, trace_headers

CATALOG_URL = os.environ.get("CATALOG_URL", "http://catalog.demo:8080")


def handle(path: str, headers: Mapping[str, str]) -> tuple[int, Any]:
    status, catalog = get_json(f"{CATALOG_URL}/items", trace_headers(headers))
    return (200 if status == 200 else 502), {"service": "frontend", "catalog": catalog}


if __name__ == "__main__":
    serve("frontend", handle)
