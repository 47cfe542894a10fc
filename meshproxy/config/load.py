"""Static config loader: YAML/dict -> validated ``Snapshot``, and ``dump`` back to plain data.

API (stable): load_file(path) -> Snapshot; load_dict(data) -> Snapshot; dump(snapshot) -> dict.
Implementation lands in the next commit.
"""

from __future__ import annotations

from collections.abc import Mapping
from os import PathLike
from typing import Any

from meshproxy.config.model import Snapshot, to_plain


def load_dict(data: Mapping[str, Any]) -> Snapshot:
    raise NotImplementedError


def load_file(path: str | PathLike[str]) -> Snapshot:
    raise NotImplementedError


def dump(snapshot: Snapshot) -> dict[str, Any]:
    out: dict[str, Any] = to_plain(snapshot)
    out["version"] = snapshot.version
    return out
