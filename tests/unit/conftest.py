"""Every unit test also checks that it left no failed future behind unawaited.

asyncio reports such a future only when it is garbage-collected, as an ERROR log line
("Future exception was never retrieved"): in a sidecar that is a failure nobody handled and
log noise on every occurrence. The check collects garbage after the test and fails it if
asyncio reported one.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def no_unretrieved_failures(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    yield
    gc.collect()
    orphans = [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]
    assert orphans == [], "a failed future was never awaited"
