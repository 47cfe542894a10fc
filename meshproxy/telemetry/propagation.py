"""Trace-context propagation over the proxy's ``Headers`` tuples.

Owns: extracting a remote parent from a request's headers (W3C ``traceparent``/
``tracestate``, B3 single ``b3``, B3 multi ``x-b3-*``), injecting a span's
context in the configured formats, and ``x-request-id`` handling.

Invariants:
  * Extraction always understands every format, whatever the config says, so a
    B3-only caller and a W3C-only caller both join their trace. If a request
    carries both, W3C wins (it is the standard; B3 is the compatibility path).
  * Injection first removes every trace header the request arrived with, then
    writes the hop's own context in exactly the configured formats: the next
    hop never sees a stale parent.
  * The work is done by OpenTelemetry's propagators (opentelemetry-api for W3C,
    opentelemetry-propagator-b3 for B3); this module only adapts our header
    tuples to their carrier protocol.

Concurrency: none; the propagators are stateless and shared.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Sequence

from opentelemetry.context import Context
from opentelemetry.propagators.b3 import B3MultiFormat, B3SingleFormat
from opentelemetry.propagators.textmap import Getter, Setter, TextMapPropagator
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from meshproxy.config.model import Propagation
from meshproxy.core.http import Headers

REQUEST_ID = "x-request-id"

TRACE_HEADERS = frozenset(
    {
        "traceparent",
        "tracestate",
        "b3",
        "x-b3-traceid",
        "x-b3-spanid",
        "x-b3-parentspanid",
        "x-b3-sampled",
        "x-b3-flags",
    }
)
"""Every header that carries trace context; stripped before injecting our own."""

_W3C = TraceContextTextMapPropagator()
_B3_MULTI = B3MultiFormat()  # its extract() also reads the single ``b3`` header
_B3_SINGLE = B3SingleFormat()

_INJECTORS: dict[Propagation, TextMapPropagator] = {
    Propagation.W3C: _W3C,
    Propagation.B3: _B3_SINGLE,
    Propagation.B3_MULTI: _B3_MULTI,
}


class _DictGetter(Getter[dict[str, list[str]]]):
    def get(self, carrier: dict[str, list[str]], key: str) -> list[str] | None:
        return carrier.get(key)

    def keys(self, carrier: dict[str, list[str]]) -> list[str]:
        return list(carrier)


class _ListSetter(Setter[list[tuple[str, str]]]):
    def set(self, carrier: list[tuple[str, str]], key: str, value: str) -> None:
        carrier.append((key, value))


_GETTER = _DictGetter()
_SETTER = _ListSetter()


def extract(headers: Headers) -> Context | None:
    """The remote parent context carried by ``headers``, or None when there is none.

    Only the trace headers are copied out, so the cost is one pass over the headers.
    """
    carrier: dict[str, list[str]] = {}
    for k, v in headers:
        if k in TRACE_HEADERS:
            carrier.setdefault(k, []).append(v)
    if not carrier:
        return None
    # B3 first, then W3C on top: when both are valid, W3C's parent wins.
    ctx = _B3_MULTI.extract(carrier, Context(), _GETTER)
    return _W3C.extract(carrier, ctx, _GETTER)


def inject(headers: Headers, context: Context, formats: Sequence[Propagation]) -> Headers:
    """``headers`` without any incoming trace headers, plus ``context`` in ``formats``."""
    out = [(k, v) for k, v in headers if k not in TRACE_HEADERS]
    for fmt in formats:
        _INJECTORS[fmt].inject(out, context, _SETTER)
    return tuple(out)


def request_id(headers: Iterable[tuple[str, str]]) -> str | None:
    """The incoming ``x-request-id`` (first value), if any and sane (bounded length)."""
    for k, v in headers:
        if k == REQUEST_ID:
            return v if 0 < len(v) <= 128 else None
    return None


def new_request_id(rng: random.Random | None = None) -> str:
    """A random (version 4) UUID in its canonical text form, as Envoy generates them.

    Formatted by hand: ``str(uuid.uuid4())`` builds a ``UUID`` object per request. With
    ``rng`` (the caller's generator, seeded from the OS) no system call is made per id:
    request ids need to be unique, not secret (OpenTelemetry's trace ids are made the
    same way)."""
    h = f"{rng.getrandbits(128):032x}" if rng is not None else os.urandom(16).hex()
    variant = "89ab"[int(h[16], 16) & 3]
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{variant}{h[17:20]}-{h[20:]}"
