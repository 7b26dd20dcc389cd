"""The results of a run as JSON (`latest.json`) and as Markdown tables with each figure's ratio to Envoy's.

Formatting from the results dict and its summary (plus writing the files); it must not measure anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.summary import BASELINE, summarise

COLUMNS = ("direct", "kuberpc-1hop", "envoy-1hop", "nginx-1hop", "kuberpc-pair", "envoy-pair")
LOAD_LABELS = {
    "unary_same": "unary, identical headers (h2load)",
    "unary_vary": "unary, headers varying per call (bench.loadgen)",
    "stream": "bidi stream, per message (bench.loadgen)",
}

# Written as escapes: the en dash and multiplication sign read better in the table than "-" and "x".
NONE = "\u2013"
TIMES = "\u00d7"


def _fmt(value: float | None, fmt: str) -> str:
    return NONE if value is None else fmt.format(value)


def _cost_cell(s: dict[str, Any] | None) -> str:
    if not s or s.get("us_per_call_median") is None:
        return NONE
    text = f"{s['us_per_call_median']:.1f} [{s['us_per_call_min']:.1f}{NONE}{s['us_per_call_max']:.1f}]"
    if "ratio_to_envoy_median" in s:
        text += f" ({s['ratio_to_envoy_median']:.2f}{TIMES}"
        if "ratio_to_envoy_min" in s:
            text += f", {s['ratio_to_envoy_min']:.2f}{NONE}{s['ratio_to_envoy_max']:.2f}"
        text += ")"
    return text


def table(results: dict[str, Any], summary: dict[str, Any]) -> str:
    paths: dict[str, Any] = results["paths"]
    shown = [c for c in COLUMNS if c in paths]
    lines = ["| figure | " + " | ".join(shown) + " |", "|---|" + "---:|" * len(shown)]

    def row(label: str, cell: Any) -> None:
        cells = []
        for col in shown:
            entry = paths[col]
            cells.append(cell(summary.get(col, {}), entry) if entry.get("status") == "ok" else entry.get("status", NONE))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    for load, label in LOAD_LABELS.items():
        row(f"{label}: proxy CPU µs, median [range] (ratio to Envoy, round range)",
            lambda s, _e, load=load: _cost_cell(s.get(load)))
        row(f"{label}: proxy core busy, min", lambda s, _e, load=load: _fmt((s.get(load) or {}).get("core_busy_min"), "{:.0%}"))
        row(f"{label}: rate, median /s", lambda s, _e, load=load: _fmt((s.get(load) or {}).get("rate_median"), "{:,.0f}"))
        row(f"{label}: samples rejected (core < 90 %) / kept unsaturated",
            lambda s, _e, load=load: NONE if not s.get(load) else f"{s[load]['rejected']} / {s[load]['unsaturated']}")
    row("ping-pong p50, µs (median of rounds)", lambda s, _e: _fmt((s.get("pingpong") or {}).get("p50_us_median"), "{:.0f}"))
    row("ping-pong p99, µs (median of rounds)", lambda s, _e: _fmt((s.get("pingpong") or {}).get("p99_us_median"), "{:.0f}"))
    row("ping-pong p99 added to direct, µs", lambda s, _e: _fmt((s.get("pingpong") or {}).get("p99_added_us_median"), "{:.0f}"))
    row("p99 at 1,000 calls/s, µs", lambda _s, e: _fmt((e.get("rate") or {}).get("p99_us"), "{:.0f}"))
    row("RSS per proxy idle, MiB (max)", lambda s, _e: _fmt(s.get("rss_idle_mib_max"), "{:.1f}"))
    row("RSS per proxy under load, MiB (max)", lambda s, _e: _fmt(s.get("rss_load_mib_max"), "{:.1f}"))
    row("startup to ready, s (max)", lambda s, _e: _fmt(s.get("startup_s_max"), "{:.3f}"))
    return "\n".join(lines)


def targets(summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(target, measured, status) for issue #14's targets."""
    rows = []

    def ratio_target(path: str, load: str, limit: float) -> None:
        s = (summary.get(path) or {}).get(load) or {}
        name = f"{path} {LOAD_LABELS[load].split(' (')[0]} ≤ {limit:.1f}{TIMES} {BASELINE[path]}"
        r = s.get("ratio_to_envoy_median")
        if r is None:
            rows.append((name, NONE, "not measured"))
            return
        saturated = s.get("unsaturated", 0) == 0
        rows.append((name, f"{r:.2f}{TIMES} ({s.get('ratio_to_envoy_min', r):.2f}{NONE}{s.get('ratio_to_envoy_max', r):.2f})",
                     ("met" if r <= limit else "NOT met") + ("" if saturated else ", some samples unsaturated")))

    for path, limit in (("kuberpc-pair", 0.7), ("kuberpc-1hop", 0.8)):
        for load in ("unary_same", "unary_vary"):
            ratio_target(path, load, limit)
    for path in ("kuberpc-pair", "kuberpc-1hop"):
        ratio_target(path, "stream", 1.0)
    ours, envoy = (summary.get("kuberpc-pair") or {}).get("pingpong"), (summary.get("envoy-pair") or {}).get("pingpong")
    if ours and envoy and "p99_added_us_median" in ours and "p99_added_us_median" in envoy:
        a, b = ours["p99_added_us_median"], envoy["p99_added_us_median"]
        rows.append(("ping-pong p99 added by the pair ≤ Envoy pair's", f"{a:.0f} µs vs {b:.0f} µs",
                     "met" if a <= b else "NOT met"))
    else:
        rows.append(("ping-pong p99 added by the pair ≤ Envoy pair's", NONE, "not measured"))
    rss = [summary[p]["rss_idle_mib_max"] for p in ("kuberpc-1hop", "kuberpc-pair") if p in summary]
    rows.append(("kuberpc RSS per proxy idle ≤ 40 MiB", f"{max(rss):.1f} MiB" if rss else NONE,
                 "not measured" if not rss else ("met" if max(rss) <= 40 else "NOT met")))
    up = [summary[p]["startup_s_max"] for p in ("kuberpc-1hop", "kuberpc-pair") if p in summary]
    rows.append(("kuberpc startup to ready < 0.3 s", f"{max(up):.3f} s" if up else NONE,
                 "not measured" if not up else ("met" if max(up) < 0.3 else "NOT met")))
    return rows


def markdown(results: dict[str, Any]) -> str:
    summary = results.get("summary") or summarise(results)
    host = results.get("host", {})
    tools = results.get("tools", {})
    backend = results.get("backend_alone", {})
    settings = results.get("settings", {})
    lines = [
        f"Run {results['started']}{' (smoke: tiny counts, figures meaningless)' if results.get('smoke') else ''} "
        f"on {host.get('cpu', '?')}, {host.get('cores', '?')} cores; load and backend on core "
        f"{host.get('load_core')}, every proxy on core {host.get('proxy_core')}; {settings.get('rounds', '?')} rounds, "
        f"paths alternated within each"
        + (f"; whole run {results['wall_s']:.0f} s." if "wall_s" in results else "."),
        "Tools: " + "; ".join(f"{k} {v}" for k, v in tools.items()) + ".",
        "",
        "CPU figures are the proxies' CPU time (all processes of the path, /proc) per call or message over each "
        "saturation sample; a sample whose proxy core was under "
        f"{settings.get('busy_min', 0.9):.0%} busy is rejected and taken again (at most "
        f"{settings.get('max_attempts', '?')} attempts). Ratios: kuberpc and nginx 1-hop against Envoy 1-hop, "
        "kuberpc pair against Envoy pair; the ratio of medians, then the range of the same-round ratios.",
        "",
        table(results, summary),
        "",
        "| target (issue #14) | measured | status |",
        "|---|---|---|",
        *[f"| {t} | {m} | {s} |" for t, m, s in targets(summary)],
    ]
    if backend:
        lines += ["", "Backends alone (no proxy, on the load core): "
                  + ", ".join(f"{k} {v:,.0f}" for k, v in backend.items()) + "."]
    problems = [f"- {name}: {e['status']}: {e.get('reason', '')}".splitlines()[0]
                for name, e in results["paths"].items() if e.get("status") != "ok"]
    if problems:
        lines += ["", "Paths not measured:", *problems]
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """`<out_dir>/latest.json` (samples and summary) and `<out_dir>/latest.md`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results["summary"] = summarise(results)
    json_path = out_dir / "latest.json"
    json_path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    md_path = out_dir / "latest.md"
    md_path.write_text(markdown(results))
    return json_path, md_path
