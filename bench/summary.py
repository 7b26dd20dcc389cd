"""Rounds of samples reduced to the figures the README quotes: medians, ranges, busy floors, ratios to Envoy.

Pure functions of the results dict; it must not measure or format (measure.py, report.py).
"""

from __future__ import annotations

import statistics
from typing import Any

from bench.measure import LOADS

# Each path's yardstick: the Envoy path with the same number of hops.
BASELINE = {"kuberpc-1hop": "envoy-1hop", "nginx-1hop": "envoy-1hop", "kuberpc-pair": "envoy-pair"}


def _samples(entry: dict[str, Any], load: str) -> list[dict[str, Any]]:
    return [s for s in entry.get("rounds", []) if s.get("load") == load]


def load_summary(entry: dict[str, Any], load: str) -> dict[str, Any] | None:
    samples = _samples(entry, load)
    if not samples:
        return None
    rates = [s["rate"] for s in samples if s.get("rate") is not None]
    out: dict[str, Any] = {
        "samples": len(samples),
        "rate_median": round(statistics.median(rates), 1) if rates else None,
        "rejected": sum(s.get("rejected", 0) for s in samples),
        "unsaturated": sum(1 for s in samples if not s.get("saturated", True)),
    }
    costs = [s["us_per_call"] for s in samples if s.get("us_per_call") is not None]
    busy = [s["core_busy"] for s in samples if s.get("core_busy") is not None]
    if costs:
        out.update(us_per_call_median=round(statistics.median(costs), 2), us_per_call_min=min(costs),
                   us_per_call_max=max(costs))
    if busy:
        out["core_busy_min"] = min(busy)
    return out


def _per_round(entry: dict[str, Any], load: str) -> dict[int, float]:
    return {s["round"]: s["us_per_call"] for s in _samples(entry, load) if s.get("us_per_call") is not None}


def ratios(entry: dict[str, Any], base: dict[str, Any], load: str) -> dict[str, float] | None:
    """Ratio of medians, and the range of the round-by-round ratios (both paths measured in the same round)."""
    mine, theirs = _per_round(entry, load), _per_round(base, load)
    if not mine or not theirs:
        return None
    paired = [mine[r] / theirs[r] for r in mine if theirs.get(r)]
    median_theirs = statistics.median(theirs.values())
    out = {"ratio_to_envoy_median": round(statistics.median(mine.values()) / median_theirs, 3)} if median_theirs else {}
    if paired:
        out.update(ratio_to_envoy_min=round(min(paired), 3), ratio_to_envoy_max=round(max(paired), 3))
    return out


def _pingpong(entry: dict[str, Any], direct: dict[str, Any]) -> dict[str, Any] | None:
    rounds = entry.get("pingpong_rounds") or []
    if not rounds:
        return None
    out: dict[str, Any] = {
        "p50_us_median": statistics.median(r["p50_us"] for r in rounds),
        "p99_us_median": statistics.median(r["p99_us"] for r in rounds),
    }
    base = direct.get("pingpong_rounds") or []
    if base and entry.get("hops"):
        out["p50_added_us_median"] = out["p50_us_median"] - statistics.median(r["p50_us"] for r in base)
        out["p99_added_us_median"] = out["p99_us_median"] - statistics.median(r["p99_us"] for r in base)
    return out


def _proxies(entry: dict[str, Any]) -> dict[str, Any]:
    procs = entry.get("proxies", {})
    if not procs:
        return {}
    peaks = [kib for s in entry.get("rounds", []) for kib in (s.get("rss_peak_kib") or {}).values()]
    return {
        "rss_idle_mib_max": round(max(p["rss_idle_kib"] for p in procs.values()) / 1024, 1),
        "rss_load_mib_max": round(max(peaks) / 1024, 1) if peaks else None,
        "startup_s_max": max(p["startup_s"] for p in procs.values()),
    }


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Per path: per load (us_per_call_median/min/max, core_busy_min, ratios), ping-pong medians, RSS, startup."""
    paths: dict[str, Any] = results.get("paths", {})
    direct = paths.get("direct", {})
    out: dict[str, Any] = {}
    for name, entry in paths.items():
        if entry.get("status") != "ok":
            continue
        base_name = BASELINE.get(name)
        base = paths.get(base_name, {}) if base_name else {}
        s: dict[str, Any] = {}
        for load in LOADS:
            summary = load_summary(entry, load)
            if summary is None:
                continue
            if base.get("status") == "ok" and (r := ratios(entry, base, load)):
                summary.update(r)
            s[load] = summary
        if (pp := _pingpong(entry, direct)) is not None:
            s["pingpong"] = pp
        s.update(_proxies(entry))
        out[name] = s
    return out
