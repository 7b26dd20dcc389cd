"""Parsing the `kuberpc.io/*` values of a Service (and a pod's weight) into a ServicePolicy.

Pure: never raises for a bad annotation (it reports a problem and uses the default); does no I/O or logging.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from sidecar.model import LB_POLICIES, MAX_WEIGHT, ServicePolicy
from sidecar.status import Status

PREFIX = "kuberpc.io/"
LB = PREFIX + "lb"
GRPC_SERVICES = PREFIX + "grpc-services"
ALLOW = PREFIX + "allow"
TIMEOUT = PREFIX + "timeout"
RETRY = PREFIX + "retry"
RETRY_BUDGET = PREFIX + "retry-budget"
EXPORT_GRPC_SERVICES = PREFIX + "export-grpc-services"
SERVICE_KEYS = (LB, GRPC_SERVICES, ALLOW, TIMEOUT, RETRY, RETRY_BUDGET, EXPORT_GRPC_SERVICES)

# gRPC status codes by their kebab-case annotation names; OK is not retryable.
GRPC_CODES: Mapping[str, int] = {s.kebab: int(s) for s in Status if s is not Status.OK}

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# Go's time.ParseDuration grammar without the sign: one or more <number><unit> terms ("1m30s").
_TERM = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION = re.compile(rf"(?:{_TERM.pattern})+")
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
_DNS_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"(?=.{1,253}$)[a-z0-9](?:[-a-z0-9.]*[a-z0-9])?")


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


def is_dns_label(text: str) -> bool:
    """A Kubernetes namespace or Service name (an RFC 1123 label)."""
    return bool(_DNS_LABEL.fullmatch(text))


def _items(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _allow_entry_ok(entry: str) -> bool:
    ns, sep, sa = entry.partition("/")
    return bool(sep) and bool(_DNS_LABEL.fullmatch(ns)) and (sa == "*" or bool(_DNS_SUBDOMAIN.fullmatch(sa)))


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
