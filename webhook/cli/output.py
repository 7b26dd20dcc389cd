"""Rows printed the kubectl way: an aligned table (`-o wide` adds columns), or JSON or YAML."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import yaml

FORMATS = ("table", "wide", "json", "yaml")


def render(
    rows: Sequence[Mapping[str, Any]],
    *,
    columns: Sequence[str],
    wide: Sequence[str] = (),
    fmt: str,
    out: TextIO,
    kind: str,
) -> None:
    """`rows` hold every column's display text under its header and the raw values under "raw"."""
    if fmt == "json":
        out.write(json.dumps({"kind": kind, "items": [r["raw"] for r in rows]}, indent=2) + "\n")
        return
    if fmt == "yaml":
        out.write(yaml.safe_dump({"kind": kind, "items": [r["raw"] for r in rows]}, sort_keys=False))
        return
    headers = [*columns, *(wide if fmt == "wide" else ())]
    if not rows:
        out.write("No resources found.\n")
        return
    cells = [headers, *([str(r[h]) for h in headers] for r in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(headers))]
    for line in cells:
        out.write("   ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() + "\n")


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f}%"


def millis(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}ms" if value >= 0.01 else f"{value * 1000:.2f}ms"


def duration(seconds: float) -> str:
    """kubectl's age style: 45s, 12m, 5h, 3d."""
    s = int(max(seconds, 0))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"
