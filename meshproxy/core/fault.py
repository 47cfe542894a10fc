"""Fault injection decisions (delay and abort), for testing resilience in the mesh.

Owns: ``decide``, which turns a ``FaultInjection`` policy and a random source
into one ``FaultDecision`` per request. The asyncio shell applies it: it sleeps
``delay`` seconds, then (if ``abort_status`` is set) answers locally with that
status and flag FI instead of forwarding.

API:
    decide(fault: FaultInjection | None, rng: random.Random) -> FaultDecision
    FaultDecision(delay: float, abort_status: int | None);  NO_FAULT

Invariants: delay and abort are drawn independently (a request can be delayed
and then aborted, as in Envoy); a percentage of 0 never fires and 100 always
fires; the rng is only consumed for percentages strictly between 0 and 100, so
a config without faults does not perturb other users of the same rng.

Concurrency: none; pure function of its inputs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from meshproxy.config.model import FaultInjection


@dataclass(frozen=True, slots=True)
class FaultDecision:
    delay: float = 0.0  # seconds to wait before going on
    abort_status: int | None = None  # answer locally with this status (flag FI)

    @property
    def active(self) -> bool:
        return self.delay > 0 or self.abort_status is not None


NO_FAULT = FaultDecision()


def _fires(percent: float, rng: random.Random) -> bool:
    if percent <= 0:
        return False
    if percent >= 100:
        return True
    return rng.random() * 100.0 < percent


def decide(fault: FaultInjection | None, rng: random.Random) -> FaultDecision:
    if fault is None:
        return NO_FAULT
    delay = fault.delay if fault.delay > 0 and _fires(fault.delay_percent, rng) else 0.0
    abort = fault.abort_status if _fires(fault.abort_percent, rng) else None
    if delay == 0.0 and abort is None:
        return NO_FAULT
    return FaultDecision(delay=delay, abort_status=abort)
