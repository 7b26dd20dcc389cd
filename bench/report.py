"""The results of a run as JSON and as a Markdown table with each figure's ratio to Envoy's from the same run.

Pure formatting from the results dict (plus writing the two files); it must not measure anything.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

COLUMNS = ("direct", "kuberpc-1hop", "envoy-1hop", "nginx-1hop", "kuberpc-pair", "envoy-pair")
BASELINE = {"kuberpc-1hop": "envoy-1hop", "nginx-1hop": "envoy-1hop", "kuberpc-pair": "envoy-pair"}

# Written as escapes: the en dash and multiplication sign read better in the table than "-" and "x".
NONE = "\u2013"
TIMES = "\u00d7"

Figure = Callable[[dict[str, Any], dict[str, Any]], float | None]


def _get(entry: dict[str, Any], *keys: str) -> float | None:
    value: Any = entry
    for k in keys:
        if not isinstance(value, dict) or k not in value or value[k] is None:
            return None
        value = value[k]
    return float(value)


def _per_proxy_max(entry: dict[str, Any], key: str) -> float | None:
    values = [p[key] for p in entry.get("proxies", {}).values() if p.get(key) is not None]
    return float(max(values)) if values else None


def _added(entry: dict[str, Any], paths: dict[str, Any], q: str) -> float | None:
    mine, base = _get(entry, "pingpong", q), _get(paths.get("direct", {}), "pingpong", q)
    return mine - base if mine is not None and base is not None and entry.get("hops") else None


# (row label, unit format, extractor): every figure in the table, in order.
FIGURES: tuple[tuple[str, str, Figure], ...] = (
    ("saturation, calls/s", "{:,.0f}", lambda e, _: _get(e, "saturation", "rps")),
    ("proxy CPU per call at saturation, µs", "{:.1f}", lambda e, _: _get(e, "saturation", "cpu_us_per_call")),
    ("p50 at 1,000 calls/s, µs", "{:.0f}", lambda e, _: _get(e, "rate", "p50_us")),
    ("p99 at 1,000 calls/s, µs", "{:.0f}", lambda e, _: _get(e, "rate", "p99_us")),
    ("paced calls sent >2 ms late (client core busy)", "{:.0f}", lambda e, _: _get(e, "rate", "late_sends")),
    ("ping-pong p50, µs", "{:.0f}", lambda e, _: _get(e, "pingpong", "p50_us")),
    ("ping-pong p99, µs", "{:.0f}", lambda e, _: _get(e, "pingpong", "p99_us")),
    ("ping-pong p50 added to direct, µs", "{:.0f}", lambda e, p: _added(e, p, "p50_us")),
    ("ping-pong p99 added to direct, µs", "{:.0f}", lambda e, p: _added(e, p, "p99_us")),
    ("RSS per proxy idle, MiB (max)", "{:.1f}", lambda e, _: _mib(_per_proxy_max(e, "rss_idle_kib"))),
    ("RSS per proxy under load, MiB (max)", "{:.1f}", lambda e, _: _mib(_per_proxy_max(e, "rss_load_kib"))),
    ("startup to ready, s (max)", "{:.3f}", lambda e, _: _per_proxy_max(e, "startup_s")),
    ("bidi stream, messages/s", "{:,.0f}", lambda e, _: _get(e, "stream", "msgs_per_s")),
    ("proxy CPU per stream message, µs", "{:.1f}", lambda e, _: _get(e, "stream", "cpu_us_per_msg")),
)


def _mib(kib: float | None) -> float | None:
    return kib / 1024 if kib is not None else None


def ratio(value: float | None, baseline: float | None) -> float | None:
    return value / baseline if value is not None and baseline else None


def _cell(fmt: str, value: float | None, base: float | None) -> str:
    if value is None:
        return NONE
    text = fmt.format(value)
    r = ratio(value, base)
    return f"{text} ({r:.2f}{TIMES})" if r is not None else text


def table(results: dict[str, Any]) -> str:
    paths: dict[str, Any] = results["paths"]
    shown = [c for c in COLUMNS if c in paths]
    lines = ["| figure | " + " | ".join(shown) + " |", "|---|" + "---:|" * len(shown)]
    for label, fmt, get in FIGURES:
        cells = []
        for col in shown:
            entry = paths[col]
            if entry.get("status") != "ok":
                cells.append(entry.get("status", NONE))
                continue
            base_name = BASELINE.get(col)
            base_entry = paths.get(base_name, {}) if base_name else {}
            base = get(base_entry, paths) if base_entry.get("status") == "ok" else None
            cells.append(_cell(fmt, get(entry, paths), base))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(target, measured, status) for issue #4's targets, judged on the kuberpc pair against the Envoy pair."""
    paths: dict[str, Any] = results["paths"]
    ours, envoy = paths.get("kuberpc-pair", {}), paths.get("envoy-pair", {})
    ok = ours.get("status") == "ok" and envoy.get("status") == "ok"

    def judge(name: str, mine: float | None, theirs: float | None, limit: float = 1.0) -> tuple[str, str, str]:
        r = ratio(mine, theirs)
        if not ok or r is None:
            return (name, NONE, "not measured")
        return (name, f"{r:.2f}{TIMES} Envoy pair", "met" if r <= limit else "NOT met")

    rows = [
        judge(f"pair CPU per call at saturation ≤ 1.0{TIMES} Envoy pair",
              _get(ours, "saturation", "cpu_us_per_call"), _get(envoy, "saturation", "cpu_us_per_call")),
        judge("ping-pong p50 added by the pair ≤ Envoy pair's", _added(ours, paths, "p50_us"),
              _added(envoy, paths, "p50_us")),
        judge("ping-pong p99 added by the pair ≤ Envoy pair's", _added(ours, paths, "p99_us"),
              _added(envoy, paths, "p99_us")),
        judge("RSS per proxy under load ≤ Envoy's", _per_proxy_max(ours, "rss_load_kib"),
              _per_proxy_max(envoy, "rss_load_kib")),
        judge("RSS per proxy idle ≤ Envoy's", _per_proxy_max(ours, "rss_idle_kib"),
              _per_proxy_max(envoy, "rss_idle_kib")),
    ]
    startup = _per_proxy_max(ours, "startup_s") if ours.get("status") == "ok" else None
    rows.append(("kuberpc startup to ready < 1 s", NONE if startup is None else f"{startup:.3f} s",
                 "not measured" if startup is None else ("met" if startup < 1.0 else "NOT met")))
    return rows


def markdown(results: dict[str, Any]) -> str:
    host = results.get("host", {})
    tools = results.get("tools", {})
    backend = results.get("backend_alone", {})
    lines = [
        f"Run {results['started']}{' (smoke: tiny counts, figures meaningless)' if results.get('smoke') else ''} "
        f"on {host.get('cpu', '?')}, {host.get('cores', '?')} cores; load and backend on core "
        f"{host.get('load_core')}, every proxy on core {host.get('proxy_core')}"
        + (f"; whole run {results['wall_s']:.0f} s." if "wall_s" in results else "."),
        "Tools: " + "; ".join(f"{k} {v}" for k, v in tools.items()) + ".",
        "",
        "Ratios in parentheses: kuberpc 1-hop and nginx 1-hop against Envoy 1-hop, kuberpc pair against Envoy pair.",
        "",
        table(results),
        "",
        "| target (issue #4) | measured | status |",
        "|---|---|---|",
        *[f"| {t} | {m} | {s} |" for t, m, s in targets(results)],
    ]
    if backend:
        lines += ["", "Backend alone (unary saturation on the load core): "
                  + ", ".join(f"{k} {v:,.0f} calls/s" for k, v in backend.items()) + "."]
    problems = [f"- {name}: {e['status']}: {e.get('reason', '')}".splitlines()[0]
                for name, e in results["paths"].items() if e.get("status") != "ok"]
    if problems:
        lines += ["", "Paths not measured:", *problems]
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """`<out_dir>/<timestamp>.json` and `<out_dir>/latest.md`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = results["started"].replace(":", "").replace("-", "").replace("+0000", "Z")
    json_path = out_dir / f"{stamp}.json"
    json_path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    md_path = out_dir / "latest.md"
    md_path.write_text(markdown(results))
    return json_path, md_path
