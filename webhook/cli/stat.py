"""`kuberpc stat`: success rate, RPS and latency percentiles per workload, pod or Service, from two
scrapes of each proxy's /metrics taken `seconds` apart. Pure: texts in, rows out.

The server view only (direction="inbound"): each call is counted once, by the pod that served it, as
Linkerd's `viz stat` does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

INBOUND = "inbound"


@dataclass
class Traffic:
    """Counts over a window: calls, OK calls, and the cumulative latency buckets (upper bound -> calls)."""

    calls: float = 0.0
    ok: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)

    def add(self, other: Traffic, sign: float = 1.0) -> None:
        self.calls += sign * other.calls
        self.ok += sign * other.ok
        for le, n in other.buckets.items():
            self.buckets[le] = self.buckets.get(le, 0.0) + sign * n


def inbound_by_service(metrics_text: str) -> dict[str, Traffic]:
    """One proxy's scrape: its inbound counters, summed over methods, per Service."""
    out: dict[str, Traffic] = {}
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.labels.get("direction") != INBOUND:
                continue
            t = out.setdefault(s.labels.get("service", "?"), Traffic())
            if s.name == "kuberpc_requests_total":
                t.calls += s.value
                if s.labels.get("grpc_code") == "0":
                    t.ok += s.value
            elif s.name == "kuberpc_request_duration_seconds_bucket":
                le = float(s.labels["le"])
                t.buckets[le] = t.buckets.get(le, 0.0) + s.value
    return out


def window(before: Mapping[str, Traffic], after: Mapping[str, Traffic]) -> dict[str, Traffic]:
    """What happened between two scrapes of one proxy (a restarted proxy's counters count from zero)."""
    out: dict[str, Traffic] = {}
    for service, now in after.items():
        delta = Traffic()
        delta.add(now)
        then = before.get(service)
        if then is not None and then.calls <= now.calls:
            delta.add(then, -1.0)
        out[service] = delta
    return out


def quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """Prometheus' histogram_quantile: linear within the bucket; the largest finite bound past it."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return lower
            return lower + (le - lower) * ((rank - below) / (count - below) if count > below else 0.0)
        lower, below = le, count
    return lower


@dataclass(frozen=True)
class Row:
    namespace: str
    name: str
    meshed: str  # "2/2": pods whose proxy answered / pods
    success: float | None
    rps: float
    p50: float | None
    p95: float | None
    p99: float | None
    calls: int


def rows(groups: Mapping[tuple[str, str], Iterable[Traffic | None]], seconds: float) -> list[Row]:
    """One row per (namespace, name) group; None marks a pod whose proxy could not be read."""
    out = []
    for (namespace, name), members in sorted(groups.items()):
        total, answered, count = Traffic(), 0, 0
        for t in members:
            count += 1
            if t is not None:
                answered += 1
                total.add(t)
        out.append(
            Row(
                namespace=namespace,
                name=name,
                meshed=f"{answered}/{count}",
                success=total.ok / total.calls if total.calls else None,
                rps=total.calls / seconds,
                p50=quantile(0.50, total.buckets),
                p95=quantile(0.95, total.buckets),
                p99=quantile(0.99, total.buckets),
                calls=round(total.calls),
            )
        )
    return out
