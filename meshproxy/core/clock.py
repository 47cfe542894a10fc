"""Time for the sans-io core: a ``Clock`` seam, the real monotonic clock and a fake one.

Owns: the one way the core reads time. Every policy object that needs time
(outlier ejection, circuit breaker, retry budget, token bucket) takes a
``Clock`` in its constructor, so tests drive time by hand with ``FakeClock``
and never sleep. Randomness is handled the same way: modules take a
``random.Random`` instance (seeded in tests), never the ``random`` module.

API:
    Clock            Protocol: ``now() -> float`` monotonic seconds (arbitrary epoch)
    MonotonicClock   ``time.monotonic``
    FakeClock        ``FakeClock(start=0.0)``; ``advance(dt)``; ``set(t)`` (never backwards)

Invariants: ``now()`` never decreases. ``FakeClock.advance`` rejects negative steps.

Concurrency: none; a clock is read from the event loop thread only.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds since an arbitrary epoch."""
        ...


class MonotonicClock:
    """The real clock (``time.monotonic``): immune to wall-clock jumps."""

    __slots__ = ()

    def now(self) -> float:
        return time.monotonic()


class FakeClock:
    """A clock that only moves when told to; for deterministic tests."""

    __slots__ = ("_now",)

    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, dt: float) -> None:
        if dt < 0:
            raise ValueError(f"a monotonic clock cannot go back (dt={dt})")
        self._now += dt

    def set(self, t: float) -> None:
        if t < self._now:
            raise ValueError(f"a monotonic clock cannot go back ({t} < {self._now})")
        self._now = t
