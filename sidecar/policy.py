"""Parsing `kuberpc.io/*` values: a Service's policy, a pod's weight and upstreams; every key of both, in one place.

Pure, shared by the proxy and the injector (webhook/ imports it): no I/O, no logging. A Service's policy never
raises for a bad annotation (it reports a problem and uses the default); upstreams raise, naming every bad entry.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

from sidecar.model import LB_POLICIES, MAX_WEIGHT, ServiceKey, ServicePolicy, Upstream
from sidecar.ports import PROXY_PORTS
from sidecar.spiffe import is_dns_label as is_dns_label  # re-exported: the name rule Services share
from sidecar.spiffe import is_service_account
from sidecar.status import Status

PREFIX = "kuberpc.io/"
# Pod annotations read by the proxy as well as the injector (the injector's own keys are in webhook/annotations.py).
UPSTREAMS = PREFIX + "upstreams"
WEIGHT = PREFIX + "weight"
# Values of pod annotations the injector hands to the proxy as they are (KUBERPC_LOG_LEVEL, KUBERPC_ACCESS_LOG,
# KUBERPC_DRAIN_SECONDS): the proxy refuses anything else, so the injector checks against the same.
LOG_LEVELS = ("debug", "info", "warning", "error")
ACCESS_LOG_FORMATS = ("json", "off")
MAX_DRAIN_SECONDS = 3600
# Service annotations.
LB = PREFIX + "lb"
GRPC_SERVICES = PREFIX + "grpc-services"
ALLOW = PREFIX + "allow"
TIMEOUT = PREFIX + "timeout"
RETRY = PREFIX + "retry"
RETRY_BUDGET = PREFIX + "retry-budget"
EXPORT_GRPC_SERVICES = PREFIX + "export-grpc-services"
# The injector's mark on every meshed pod (label value "true"; as an annotation, the injector's version): the
# control plane watches and knows only pods labelled so.
INJECTED = PREFIX + "injected"
SERVICE_KEYS = (LB, GRPC_SERVICES, ALLOW, TIMEOUT, RETRY, RETRY_BUDGET, EXPORT_GRPC_SERVICES)

# gRPC status codes by their kebab-case annotation names; OK is not retryable.
GRPC_CODES: Mapping[str, int] = {s.kebab: int(s) for s in Status if s is not Status.OK}

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# Go's time.ParseDuration grammar without the sign: one or more <number><unit> terms ("1m30s").
_TERM = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION = re.compile(rf"(?:{_TERM.pattern})+")
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
# What may follow `svc.ns` in an upstream: the names cluster DNS gives a Service.
_SERVICE_SUFFIXES = ((), ("svc",), ("svc", "cluster", "local"))
_SHOWN_CHARS = 40  # API servers truncate admission warnings past 120 characters: keep echoed values short


def parse_duration(text: str) -> float:
    """`2s`, `500ms`, `1m`, `1.5s`, `100us`, `1m30s` -> seconds; ValueError naming the value."""
    s = text.strip()
    if not _DURATION.fullmatch(s):
        raise ValueError(f"{text!r} is not a duration (e.g. 2s, 500ms, 1m, 100us)")
    return sum(float(num) * _UNITS[unit] for num, unit in _TERM.findall(s))


def parse_weight(text: str) -> int:
    """An integer 0..10000; ValueError naming the value."""
    s = text.strip()
    if not s.isascii() or not s.isdigit() or int(s) > MAX_WEIGHT:
        raise ValueError(f"{text!r} is not a weight (an integer from 0 to {MAX_WEIGHT})")
    return int(s)


def is_grpc_service_name(text: str) -> bool:
    """A gRPC service name as `kuberpc.io/grpc-services` lists them (`pkg.Service`)."""
    return len(text) <= 255 and bool(_DOTTED.fullmatch(text))


def _items(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _allow_entry_ok(entry: str) -> bool:
    ns, sep, sa = entry.partition("/")
    return bool(sep) and is_dns_label(ns) and (sa == "*" or is_service_account(sa))


def _shown(text: str) -> str:
    """A value as it may appear in a message: quoted, escaped to ASCII, truncated."""
    return ascii(text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "...")


def _port(text: str) -> int:
    # ASCII digits only: str.isdigit() also accepts other scripts' digits, which int() reads as numbers.
    if not (1 <= len(text) <= 5 and text.isascii() and text.isdigit() and 1 <= int(text) <= 65535):
        raise ValueError(f"{_shown(text)} is not a port (1-65535)")
    return int(text)


class UpstreamsError(ValueError):
    """Every bad entry of an upstreams value, one problem each (quoted and bounded: safe for a warning)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


def _upstream(entry: str, default_namespace: str) -> Upstream:
    target, sep, local = entry.partition("=")
    host, colon, port = target.rpartition(":")
    if not sep or not colon:
        raise ValueError(f"{_shown(entry)} is not svc.ns:port=localport")
    parts = host.strip().split(".")
    name, namespace, suffix = parts[0], parts[1] if len(parts) > 1 else default_namespace, tuple(parts[2:])
    if suffix not in _SERVICE_SUFFIXES:
        raise ValueError(f"{_shown(entry)}: {_shown(host.strip())} is not svc.ns[.svc[.cluster.local]]")
    for label in (name, namespace):
        if not is_dns_label(label):
            raise ValueError(f"{_shown(entry)}: {_shown(label)} is not a DNS label")
    try:
        return Upstream(ServiceKey(name, namespace), _port(port.strip()), _port(local.strip()))
    except ValueError as e:
        raise ValueError(f"{_shown(entry)}: {e}") from None


def parse_upstreams(text: str, default_namespace: str) -> tuple[Upstream, ...]:
    """`svc[.ns[.svc[.cluster.local]]]:port=localport,...`: the value of `kuberpc.io/upstreams` (DESIGN.md §2),
    which the injector passes to the proxy as KUBERPC_UPSTREAMS.

    A name without a namespace is in `default_namespace` (the pod's). Blanks around an entry, its name and its
    two ports, and empty entries, are ignored; a name is RFC 1123 labels and ports are ASCII digits. UpstreamsError lists every entry that is malformed, names no Service, has a
    port outside 1-65535, or a local port that is one of the proxy's own or already taken by an earlier entry.
    """
    out: list[Upstream] = []
    problems: list[str] = []
    taken: dict[int, str] = {}
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        try:
            up = _upstream(entry, default_namespace)
        except ValueError as e:
            problems.append(str(e))
            continue
        if up.local_port in PROXY_PORTS:
            problems.append(f"{_shown(entry)}: local port {up.local_port} is a proxy port")
        elif up.local_port in taken:
            problems.append(f"{_shown(entry)}: local port {up.local_port} is used twice")
        else:
            taken[up.local_port] = entry
            out.append(up)
    if problems:
        raise UpstreamsError(problems)
    return tuple(out)


def format_upstreams(upstreams: Iterable[Upstream]) -> str:
    """The normal form `svc.ns:port=localport,...` that parse_upstreams reads back to the same upstreams."""
    return ",".join(f"{u.service}:{u.port}={u.local_port}" for u in upstreams)


def parse_service_annotations(annotations: Mapping[str, str]) -> tuple[ServicePolicy, list[str]]:
    """The ServicePolicy of a Service's annotations, and one problem string per bad value.

    Each problem names the annotation and the value. A bad value falls back to the default, except
    in `allow`, which fails closed: bad entries are dropped and the rest still applies (possibly an
    empty list, denying everyone), because falling back to "any meshed identity" would open access.
    """
    defaults = ServicePolicy()
    problems: list[str] = []
    lb = defaults.lb
    grpc_services = defaults.grpc_services
    allow = defaults.allow
    timeout = defaults.timeout
    retry_on = defaults.retry_on
    retry_budget = defaults.retry_budget
    export = defaults.export_grpc_services

    for key in sorted(annotations):
        if key.startswith(PREFIX) and key not in SERVICE_KEYS:
            problems.append(f"{key}: unknown Service annotation (known: {', '.join(SERVICE_KEYS)})")

    if (v := annotations.get(LB)) is not None:
        if v.strip() in LB_POLICIES:
            lb = v.strip()
        else:
            problems.append(f"{LB}: {v!r} is not one of {', '.join(LB_POLICIES)}")

    if (v := annotations.get(GRPC_SERVICES)) is not None:
        good: list[str] = []
        for name in _items(v):
            if _DOTTED.fullmatch(name):
                if name not in good:
                    good.append(name)
            else:
                problems.append(f"{GRPC_SERVICES}: {name!r} is not a gRPC service name (like pkg.Service)")
        grpc_services = tuple(good)

    if (v := annotations.get(ALLOW)) is not None:
        entries: list[str] = []
        for entry in _items(v):
            if _allow_entry_ok(entry):
                if entry not in entries:
                    entries.append(entry)
            else:
                problems.append(
                    f"{ALLOW}: {entry!r} is not namespace/serviceaccount or namespace/* (entry ignored)"
                )
        if not entries:
            problems.append(f"{ALLOW}: {v!r} allows no identity: every caller is denied")
        allow = tuple(entries)

    if (v := annotations.get(TIMEOUT)) is not None:
        try:
            t = parse_duration(v)
            if t <= 0:
                raise ValueError(f"{v!r} is not a positive duration")
            timeout = t
        except ValueError as e:
            problems.append(f"{TIMEOUT}: {e}")

    if (v := annotations.get(RETRY)) is not None:
        codes: set[str] = set()
        for raw in _items(v):
            # Accept the status names as gRPC spells them too (UNAVAILABLE, resource_exhausted).
            name = raw.lower().replace("_", "-")
            if name in GRPC_CODES:
                codes.add(name)
            else:
                problems.append(f"{RETRY}: {raw!r} is not a gRPC status code name (e.g. unavailable)")
        retry_on = frozenset(codes)

    if (v := annotations.get(RETRY_BUDGET)) is not None:
        try:
            b = float(v.strip())
        except ValueError:
            b = math.nan
        if 0.0 <= b <= 1.0:
            retry_budget = b
        else:
            problems.append(f"{RETRY_BUDGET}: {v!r} is not a ratio from 0 to 1")

    if (v := annotations.get(EXPORT_GRPC_SERVICES)) is not None:
        if v.strip().lower() in ("true", "false"):
            export = v.strip().lower() == "true"
        else:
            # Fails closed: exporting is a widening of who reaches the Service, so only "true" turns it on.
            problems.append(f"{EXPORT_GRPC_SERVICES}: {v!r} is not true or false (not exported)")

    policy = ServicePolicy(
        lb=lb,
        grpc_services=grpc_services,
        allow=allow,
        timeout=timeout,
        retry_on=retry_on,
        retry_budget=retry_budget,
        export_grpc_services=export,
    )
    return policy, problems
