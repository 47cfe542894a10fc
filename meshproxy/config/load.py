"""Static config loader: YAML or plain data -> validated ``Snapshot``; ``dump`` back to plain data.

Owns: the schema of ``meshproxy run --config FILE`` (it is the model's field
names, see ``meshproxy.config.model``), its conversion into the frozen model,
and the consistency checks a snapshot must pass before the proxy uses it.

API:
    load_file(path) -> Snapshot          YAML file (one document)
    load_dict(data: Mapping) -> Snapshot
    dump(snapshot) -> dict               JSON-able, for /config_dump; ``load_dict(dump(s)) == s``
    parse_duration(value) -> float       seconds from a number or "250ms", "2s", "1m", "1h30m"
    DURATION_FIELDS, RETRY_CONDITIONS (the latter re-exported from meshproxy.core.retry)

Schema conventions:
  * Field names exactly as in the model; unknown keys are errors (typo protection).
  * Durations (``DURATION_FIELDS``): numbers of seconds or strings with units
    ns/us/ms/s/m/h, e.g. "250ms", "1m30s".
  * Enums by value ("least_request", "prefix", ...). Sets and tuples as lists.
    Header pairs (``set``/``add`` of header modifiers, workload ``labels``) as a
    mapping or a list of ``[name, value]`` pairs.
  * Service keys are "name.namespace:port". ``version`` may be present (``dump``
    writes it) but is always recomputed from the content.

Errors: every problem raises ``ConfigError(path, message)`` with the field path,
e.g. ``services[1].routes[0].backends[0].service: unknown service 'inventory-v3.demo:8080'``.

Invariants: a returned snapshot passed every check below and has
``.with_version()`` applied; ints given for float fields become floats, so the
content hash matches a snapshot built in code or by the control plane.

Concurrency: none; pure functions (``load_file`` reads one file).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import ipaddress
import math
import re
import types
from collections.abc import Mapping
from os import PathLike
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from meshproxy.config import model
from meshproxy.config.model import Snapshot, to_plain
from meshproxy.core.errors import ConfigError
from meshproxy.core.retry import RETRY_CONDITIONS as RETRY_CONDITIONS  # re-exported: one list for all

DURATION_FIELDS: frozenset[tuple[type, str]] = frozenset(
    {
        (model.RetryBudget, "window"),
        (model.RetryPolicy, "per_try_timeout"),
        (model.RetryPolicy, "backoff_base"),
        (model.RetryPolicy, "backoff_max"),
        (model.CircuitBreaker, "open_duration"),
        (model.CircuitBreaker, "max_open_duration"),
        (model.OutlierDetection, "base_ejection_time"),
        (model.OutlierDetection, "max_ejection_time"),
        (model.FaultInjection, "delay"),
        (model.TrafficPolicy, "timeout"),
        (model.TrafficPolicy, "connect_timeout"),
        (model.TrafficPolicy, "idle_timeout"),
        (model.Route, "timeout"),
    }
)


_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_SERVICE_KEY = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\.[a-z0-9]([-a-z0-9]*[a-z0-9])?:(\d+)")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token (methods, header names)

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = get_type_hints(cls, vars(model))
        _HINTS[cls] = hints
    return hints


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return type(value).__name__


# -- durations ---------------------------------------------------------------------------------


def parse_duration(value: object, path: str = "") -> float:
    """Seconds from a non-negative number or a string like "250ms", "2s", "1m30s"."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(path, f"expected a duration (seconds or a string like '250ms'), got {_kind(value)}")
    if isinstance(value, str):
        text = value.strip()
        pos, total = 0, 0.0
        for m in _DURATION_PART.finditer(text):
            if m.start() != pos:
                break
            total += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if not text or pos != len(text):
            raise ConfigError(path, f"invalid duration {value!r} (use e.g. '250ms', '2s', '1m')")
        seconds = total
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(path, f"duration must be a finite number >= 0, got {value!r}")
    return seconds


# -- generic conversion ------------------------------------------------------------------------


def _convert(tp: Any, value: object, path: str, duration: bool = False) -> Any:
    origin = get_origin(tp)
    if origin is Union or origin is types.UnionType:
        members = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            if len(members) != len(get_args(tp)):
                return None
            raise ConfigError(path, "must not be null")
        if len(members) != 1:
            raise ConfigError(path, f"unsupported type {tp}")  # not in the model
        return _convert(members[0], value, path, duration)
    if duration:
        return parse_duration(value, path)
    supertype = getattr(tp, "__supertype__", None)
    if supertype is not None:  # NewType (ServiceKey)
        return tp(_convert(supertype, value, path))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _dataclass(tp, value, path)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _enum(tp, value, path)
    if origin is tuple:
        args = get_args(tp)
        if args == (tuple[str, str], ...):
            return _pairs(value, path)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(_list(value, path)))
        raise ConfigError(path, f"unsupported type {tp}")
    if origin is frozenset:
        (arg,) = get_args(tp)
        return frozenset(_convert(arg, v, f"{path}[{i}]") for i, v in enumerate(_list(value, path)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {_kind(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(path, f"expected an integer, got {_kind(value)} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(path, f"expected a number, got {_kind(value)} {value!r}")
        if not math.isfinite(value):
            raise ConfigError(path, f"must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool):
            raise ConfigError(
                path,
                f"expected a string, got a boolean {value!r} (YAML reads bare yes/no/on/off as booleans: quote it)",
            )
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {_kind(value)} {value!r}")
        return value
    raise ConfigError(path, f"unsupported type {tp}")


def _list(value: object, path: str) -> list[Any]:
    if not isinstance(value, list | tuple):
        raise ConfigError(path, f"expected a list, got {_kind(value)}")
    return list(value)


def _pairs(value: object, path: str) -> tuple[tuple[str, str], ...]:
    if isinstance(value, Mapping):
        items = list(value.items())
    else:
        items = []
        for i, pair in enumerate(_list(value, path)):
            if not isinstance(pair, list | tuple) or len(pair) != 2:
                raise ConfigError(f"{path}[{i}]", "expected a [name, value] pair")
            items.append((pair[0], pair[1]))
    out: list[tuple[str, str]] = []
    for i, (k, v) in enumerate(items):
        if not isinstance(k, str) or not isinstance(v, str):
            raise ConfigError(f"{path}[{i}]", "names and values must be strings")
        out.append((k, v))
    return tuple(out)


def _enum(tp: type[enum.Enum], value: object, path: str) -> enum.Enum:
    if isinstance(value, bool) and {"on", "off"} <= {m.value for m in tp}:
        # YAML 1.1 reads a bare on/off as a boolean; for an enum with those values it meant the word.
        value = "on" if value else "off"
    for member in tp:
        if member.value == value:
            return member
    choices = ", ".join(repr(m.value) for m in tp)
    raise ConfigError(path, f"must be one of {choices}, got {value!r}")


def _dataclass(cls: type, value: object, path: str) -> Any:
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"expected a mapping, got {_kind(value)}")
    hints = _hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for k in value:
        if k not in known:
            close = difflib.get_close_matches(str(k), sorted(known), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(_join(path, str(k)), f"unknown field ({hint}known: {', '.join(sorted(known))})")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name == "version" and cls is Snapshot:
            continue  # derived from the content
        fpath = _join(path, f.name)
        if f.name in value:
            kwargs[f.name] = _convert(hints[f.name], value[f.name], fpath, (cls, f.name) in DURATION_FIELDS)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(fpath, "required field is missing")
    return cls(**kwargs)


# -- validation --------------------------------------------------------------------------------


def _check(ok: bool, path: str, message: str) -> None:
    if not ok:
        raise ConfigError(path, message)


def _port(port: int, path: str) -> None:
    _check(1 <= port <= 65535, path, f"must be 1..65535, got {port}")


def _ip(address: str, path: str) -> None:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise ConfigError(path, f"not an IP address: {address!r}") from None


def _percent(value: float, path: str) -> None:
    _check(0 <= value <= 100, path, f"must be 0..100, got {value:g}")


def _regex(pattern: str, path: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(path, f"invalid regex {pattern!r}: {exc}") from None


def _header_name(name: str, path: str) -> None:
    _check(bool(_TOKEN.fullmatch(name)), path, f"invalid header name {name!r}")


def _validate_modifier(m: model.HeaderModifier, path: str) -> None:
    for i, (name, _) in enumerate(m.set):
        _header_name(name, f"{path}.set[{i}]")
    for i, (name, _) in enumerate(m.add):
        _header_name(name, f"{path}.add[{i}]")
    for i, name in enumerate(m.remove):
        _header_name(name, f"{path}.remove[{i}]")


def _validate_retry(r: model.RetryPolicy, path: str) -> None:
    _check(r.attempts >= 0, _join(path, "attempts"), f"must be >= 0, got {r.attempts}")
    if r.per_try_timeout is not None:
        _check(r.per_try_timeout > 0, _join(path, "per_try_timeout"), "must be > 0")
    for cond in sorted(r.retry_on):
        _check(
            cond in RETRY_CONDITIONS,
            _join(path, "retry_on"),
            f"unknown condition {cond!r} (known: {', '.join(sorted(RETRY_CONDITIONS))})",
        )
    for code in sorted(r.status_codes):
        _check(100 <= code <= 599, _join(path, "status_codes"), f"must be 100..599, got {code}")
    _check(
        r.backoff_base <= r.backoff_max,
        _join(path, "backoff_base"),
        f"must be <= backoff_max ({r.backoff_max:g}s), got {r.backoff_base:g}s",
    )
    b = r.budget
    _check(b.ratio >= 0, _join(path, "budget.ratio"), f"must be >= 0, got {b.ratio:g}")
    _check(
        b.min_per_second >= 0, _join(path, "budget.min_per_second"), f"must be >= 0, got {b.min_per_second:g}"
    )
    _check(b.window > 0, _join(path, "budget.window"), "must be > 0")
    _check(r.max_body_bytes >= 0, _join(path, "max_body_bytes"), f"must be >= 0, got {r.max_body_bytes}")


def _validate_rate_limit(rl: model.RateLimit, path: str) -> None:
    _check(
        rl.requests_per_second > 0,
        _join(path, "requests_per_second"),
        f"must be > 0, got {rl.requests_per_second:g}",
    )
    _check(rl.burst >= 1, _join(path, "burst"), f"must be >= 1, got {rl.burst}")


def _validate_policy(p: model.TrafficPolicy, path: str) -> None:
    if p.timeout is not None:
        _check(p.timeout > 0, _join(path, "timeout"), "must be > 0 (or null for no timeout)")
    _check(p.connect_timeout > 0, _join(path, "connect_timeout"), "must be > 0")
    _check(p.idle_timeout > 0, _join(path, "idle_timeout"), "must be > 0")
    if p.retry is not None:
        _validate_retry(p.retry, _join(path, "retry"))
    cb, cbp = p.circuit_breaker, _join(path, "circuit_breaker")
    for name in (
        "max_connections",
        "max_pending_requests",
        "max_requests",
        "max_retries",
        "consecutive_failures",
    ):
        v = getattr(cb, name)
        _check(v >= 0, _join(cbp, name), f"must be >= 0, got {v}")
    _check(
        cb.open_duration <= cb.max_open_duration,
        _join(cbp, "open_duration"),
        f"must be <= max_open_duration ({cb.max_open_duration:g}s)",
    )
    od = p.outlier_detection
    if od is not None:
        odp = _join(path, "outlier_detection")
        for name in ("consecutive_5xx", "consecutive_gateway_errors", "consecutive_connect_failures"):
            v = getattr(od, name)
            _check(v >= 0, _join(odp, name), f"must be >= 0, got {v}")
        _percent(od.max_ejection_percent, _join(odp, "max_ejection_percent"))
        _percent(od.min_health_percent, _join(odp, "min_health_percent"))
    if p.rate_limit is not None:
        _validate_rate_limit(p.rate_limit, _join(path, "rate_limit"))
    if p.fault is not None:
        f, fp = p.fault, _join(path, "fault")
        _percent(f.delay_percent, _join(fp, "delay_percent"))
        _percent(f.abort_percent, _join(fp, "abort_percent"))
        _check(
            200 <= f.abort_status <= 599, _join(fp, "abort_status"), f"must be 200..599, got {f.abort_status}"
        )


def _validate_route(r: model.Route, path: str) -> None:
    _check(bool(r.name), _join(path, "name"), "must not be empty")
    for i, m in enumerate(r.matches):
        mp = f"{path}.matches[{i}]"
        if m.path is not None:
            pp = _join(mp, "path.value")
            if m.path.kind is model.PathMatchKind.REGEX:
                _regex(m.path.value, pp)
            else:
                _check(m.path.value.startswith("/"), pp, f"must start with '/', got {m.path.value!r}")
        if m.method is not None:
            _check(bool(_TOKEN.fullmatch(m.method)), _join(mp, "method"), f"invalid method {m.method!r}")
        for j, h in enumerate(m.headers):
            hp = f"{mp}.headers[{j}]"
            _header_name(h.name, _join(hp, "name"))
            if h.kind is model.HeaderMatchKind.REGEX:
                _regex(h.value, _join(hp, "value"))
    for i, b in enumerate(r.backends):
        bp = f"{path}.backends[{i}]"
        _check(
            bool(_SERVICE_KEY.fullmatch(b.service)),
            _join(bp, "service"),
            f"not a service key 'name.namespace:port': {b.service!r}",
        )
        _check(b.weight >= 0, _join(bp, "weight"), f"must be >= 0, got {b.weight}")
    if r.backends:
        _check(any(b.weight > 0 for b in r.backends), _join(path, "backends"), "weights must not all be 0")
    if r.timeout is not None:
        _check(r.timeout > 0, _join(path, "timeout"), "must be > 0")
    if r.retry is not None:
        _validate_retry(r.retry, _join(path, "retry"))
    _validate_modifier(r.request_headers, _join(path, "request_headers"))
    _validate_modifier(r.response_headers, _join(path, "response_headers"))


def _validate_service(s: model.Service, path: str) -> None:
    _check(bool(_DNS_LABEL.fullmatch(s.name)), _join(path, "name"), f"not a DNS label: {s.name!r}")
    _check(
        bool(_DNS_LABEL.fullmatch(s.namespace)), _join(path, "namespace"), f"not a DNS label: {s.namespace!r}"
    )
    _port(s.port, _join(path, "port"))
    if s.target_port is not None:
        _port(s.target_port, _join(path, "target_port"))
    for i, vip in enumerate(s.vips):
        _ip(vip, f"{path}.vips[{i}]")
    for i, h in enumerate(s.hostnames):
        _check(
            bool(h) and ":" not in h and " " not in h,
            f"{path}.hostnames[{i}]",
            f"not a hostname without port: {h!r}",
        )
    seen_eps: set[tuple[str, int]] = set()
    for i, ep in enumerate(s.endpoints):
        ep_path = f"{path}.endpoints[{i}]"
        _ip(ep.address, _join(ep_path, "address"))
        _port(ep.port, _join(ep_path, "port"))
        _check(ep.weight >= 0, _join(ep_path, "weight"), f"must be >= 0, got {ep.weight}")
        eid = (str(ipaddress.ip_address(ep.address)), ep.port)
        _check(eid not in seen_eps, ep_path, f"duplicate endpoint {ep.address}:{ep.port}")
        seen_eps.add(eid)
    names: set[str] = set()
    for i, r in enumerate(s.routes):
        rp = f"{path}.routes[{i}]"
        _validate_route(r, rp)
        _check(r.name not in names, _join(rp, "name"), f"duplicate route name {r.name!r}")
        names.add(r.name)
    _validate_policy(s.policy, _join(path, "policy"))


def _validate(snap: Snapshot) -> None:
    keys: set[str] = set()
    for i, s in enumerate(snap.services):
        _check(s.key not in keys, f"services[{i}]", f"duplicate service key {s.key!r}")
        keys.add(s.key)
    for i, s in enumerate(snap.services):
        _validate_service(s, f"services[{i}]")
    # References last, so a broken service reports its own field rather than "unknown service".
    for i, s in enumerate(snap.services):
        for j, r in enumerate(s.routes):
            for k, b in enumerate(r.backends):
                _check(
                    b.service in keys,
                    f"services[{i}].routes[{j}].backends[{k}].service",
                    f"unknown service {b.service!r}",
                )
    ports: set[int] = set()
    for i, ip in enumerate(snap.inbound.ports):
        pp = f"inbound.ports[{i}]"
        _port(ip.port, _join(pp, "port"))
        _check(ip.port not in ports, _join(pp, "port"), f"duplicate inbound port {ip.port}")
        ports.add(ip.port)
        if ip.rate_limit is not None:
            _validate_rate_limit(ip.rate_limit, _join(pp, "rate_limit"))
    for port in sorted(snap.inbound.opaque_ports):
        _port(port, "inbound.opaque_ports")
    _ip(snap.inbound.app_address, "inbound.app_address")
    tr = snap.telemetry.tracing
    _check(
        0 <= tr.sampling_ratio <= 1,
        "telemetry.tracing.sampling_ratio",
        f"must be 0..1, got {tr.sampling_ratio:g}",
    )
    _check(
        tr.max_queue_size >= 1, "telemetry.tracing.max_queue_size", f"must be >= 1, got {tr.max_queue_size}"
    )


# -- entry points ------------------------------------------------------------------------------


def _normalise(snap: Snapshot) -> Snapshot:
    # Header names are lower-case in the model; accept any case in files.
    def fix_route(r: model.Route) -> model.Route:
        matches = tuple(
            dataclasses.replace(
                m, headers=tuple(dataclasses.replace(h, name=h.name.lower()) for h in m.headers)
            )
            for m in r.matches
        )
        return dataclasses.replace(r, matches=matches)

    services = tuple(
        dataclasses.replace(s, routes=tuple(fix_route(r) for r in s.routes)) for s in snap.services
    )
    return dataclasses.replace(snap, services=services)


def load_dict(data: Mapping[str, Any]) -> Snapshot:
    """Validate plain data (e.g. parsed YAML) into a versioned ``Snapshot``; raises ``ConfigError``."""
    snap: Snapshot = _dataclass(Snapshot, data, "")
    snap = _normalise(snap)
    _validate(snap)
    return snap.with_version()


def load_file(path: str | PathLike[str]) -> Snapshot:
    """Read a YAML file and ``load_dict`` it; I/O and YAML errors become ``ConfigError`` too."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {str(path)!r}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError("", f"invalid YAML in {str(path)!r}: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError("", f"the top level of {str(path)!r} must be a mapping, got {_kind(data)}")
    return load_dict(data)


def dump(snapshot: Snapshot) -> dict[str, Any]:
    """Plain JSON-able data (field names as in the model, durations in seconds) plus ``version``."""
    out: dict[str, Any] = to_plain(snapshot)
    out["version"] = snapshot.version or snapshot.with_version().version
    return out
