"""`kuberpc tap` and `kuberpc top`: read a proxy's bounded /tap stream (loopback only: reach it with
`kubectl port-forward POD 15091`, the debug listener) and show each call, or aggregate them. Never metadata or bodies:
the stream carries none.
"""

from __future__ import annotations

import json
import statistics
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from webhook.cli.kube import CliError

GRPC_NAMES = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)


def status_name(code: object) -> str:
    return GRPC_NAMES[code] if isinstance(code, int) and 0 <= code < len(GRPC_NAMES) else str(code)


def stream(admin: str, *, limit: int, seconds: float) -> Iterator[dict[str, Any]]:
    """The lines of GET http://ADMIN/tap; the last one says why the stream ended."""
    url = f"http://{admin}/tap?limit={limit}&seconds={seconds:g}"
    try:
        with urllib.request.urlopen(url, timeout=seconds + 10) as resp:
            for line in resp:
                yield json.loads(line)
    except urllib.error.HTTPError as e:
        raise CliError(f"{url}: HTTP {e.code}: {e.read().decode(errors='replace').strip()}") from e
    except (urllib.error.URLError, OSError) as e:
        raise CliError(f"{url}: {getattr(e, 'reason', e)}") from e


@dataclass
class Route:
    """The calls of one (direction, service, method, peer) seen by `top`."""

    calls: int = 0
    ok: int = 0
    durations_ms: list[float] = field(default_factory=list)


def aggregate(
    records: Iterator[dict[str, Any]],
) -> tuple[dict[tuple[str, str, str, str], Route], dict[str, Any]]:
    """Routes by (direction, service, method, peer), and the stream's end line."""
    routes: dict[tuple[str, str, str, str], Route] = {}
    end: dict[str, Any] = {}
    for r in records:
        if "end" in r:
            end = r
            continue
        key = (str(r["direction"]), str(r["service"]), str(r["method"]), str(r.get("peer") or "-"))
        route = routes.setdefault(key, Route())
        route.calls += 1
        route.ok += r["grpc_code"] == 0
        route.durations_ms.append(float(r["duration_ms"]))
    return routes, end


def p50_ms(route: Route) -> float:
    return statistics.median(route.durations_ms)
