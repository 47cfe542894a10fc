"""Local rate limiting: a token bucket.

Owns: ``TokenBucket``, used by the server-side sidecar to enforce a service's or
an inbound port's ``RateLimit`` (a rejected request gets a local reply with
flag RL / 429).

API:
    TokenBucket(rate, burst, clock)   ``rate`` tokens per second, at most ``burst`` stored
    TokenBucket.from_policy(RateLimit, clock)
    bucket.try_acquire(n=1) -> bool   take ``n`` tokens if available
    bucket.available -> float         tokens available now (for /config_dump, tests)

Invariants: the bucket starts full; tokens never exceed ``burst`` nor go
negative; refill is computed lazily from the clock on each call (no timers).

Concurrency: none; one bucket is used from the event loop thread only.
"""

from __future__ import annotations

from meshproxy.config.model import RateLimit
from meshproxy.core.clock import Clock


class TokenBucket:
    __slots__ = ("_burst", "_clock", "_last", "_rate", "_tokens")

    def __init__(self, rate: float, burst: int, clock: Clock) -> None:
        if rate < 0:
            raise ValueError(f"rate must be >= 0, got {rate}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst}")
        self._rate = float(rate)
        self._burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock.now()

    @classmethod
    def from_policy(cls, policy: RateLimit, clock: Clock) -> TokenBucket:
        return cls(policy.requests_per_second, policy.burst, clock)

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def burst(self) -> int:
        return int(self._burst)

    def _refill(self) -> None:
        now = self._clock.now()
        elapsed = now - self._last
        if elapsed > 0:
            self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
            self._last = now

    @property
    def available(self) -> float:
        self._refill()
        return self._tokens

    def try_acquire(self, n: int = 1) -> bool:
        """Take ``n`` tokens if there are enough; never blocks, never goes into debt."""
        self._refill()
        if self._tokens >= n:
            self._tokens -= n
            return True
        return False
