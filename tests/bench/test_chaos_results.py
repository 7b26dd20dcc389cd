"""The chaos figures as published: `bench/results/chaos-latest.json`, written by `python -m bench.chaos`, has one
entry per scenario with the issue's fields, and the README's table is that file's, rendered by bench/chaos.py.

Reads files only; the scenarios themselves run in tests/chaos.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.chaos import DEFAULT_OUT, table
from e2e.chaos import SCENARIOS

REPO = Path(__file__).resolve().parents[2]
FIELDS = {"scenario", "calls", "failed_calls", "retryable", "p99_during_ms", "recovery_s"}


def rows() -> list[dict[str, object]]:
    doc = json.loads(DEFAULT_OUT.read_text())
    out: list[dict[str, object]] = doc["scenarios"]
    return out


def test_the_results_hold_one_entry_per_scenario_with_the_issues_fields() -> None:
    results = rows()

    assert [r["scenario"] for r in results] == [s.name for s in SCENARIOS]
    for r in results:
        assert set(r) == FIELDS, r["scenario"]
        assert isinstance(r["calls"], int) and r["calls"] > 0


def test_the_readme_quotes_the_latest_results_table() -> None:
    assert table(rows()) in (REPO / "README.md").read_text()
