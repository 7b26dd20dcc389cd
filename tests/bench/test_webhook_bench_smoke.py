"""The webhook benchmark (bench/webhook_bench.py, issue #3): a tiny run of each shape and each kind of Pod burst.

Checks that the harness still drives the real webhook over HTTPS and reports every figure; the harness itself
raises if any answer is not a 200 carrying a patch. It asserts no performance figure.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIELDS = {"p50_ms", "p99_ms", "max_ms", "round_p99_ms", "server_cpu_us_per_review"}


@pytest.mark.parametrize("pods", [[], ["--distinct"], ["--distinct-workloads"]], ids=["one-pod", "replicas", "workloads"])
def test_a_small_run_reports_every_shape(tmp_path: Path, pods: list[str]) -> None:
    out = tmp_path / "figures.json"
    done = subprocess.run(
        [
            sys.executable, "bench/webhook_bench.py", "--concurrency", "6", "--rounds", "2",
            "--server-cpu", "-1", "--client-cpu", "-1", "--json", str(out), *pods,
        ],
        cwd=REPO, capture_output=True, text=True, timeout=180, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    meta = figures.pop("_meta")
    assert meta["distinct_pods"] == ("--distinct" in pods)
    assert meta["distinct_workloads"] == ("--distinct-workloads" in pods)
    assert set(figures) == {"keep-alive", "new-connections", "resumed"}
    for shape, result in figures.items():
        assert FIELDS <= set(result), shape
        assert len(result["round_p99_ms"]) == 2
    assert figures["resumed"]["resumed"] > 0  # the second round's connections resumed the first's sessions


def test_the_http_floor_comparison_runs_every_server() -> None:
    done = subprocess.run(
        [sys.executable, "bench/webhook_http_floor.py", "--smoke"],
        cwd=REPO, capture_output=True, text=True, timeout=180, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert [ln.split()[0] for ln in lines] == ["aiohttp", "uvicorn", "webhook", "protocol"]
    assert all("server CPU" in ln for ln in lines)
