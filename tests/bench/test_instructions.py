"""Instructions per relayed call (bench/instructions.py): re-counted under callgrind against the committed figure.

Fails on a regression of more than 10 % in any committed figure; it asserts no timing.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import pytest

from bench import instructions

IN_CI = os.environ.get("CI", "").lower() == "true"


def _committed() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(instructions.COMMITTED.read_text())
    return data


def test_the_relay_costs_no_more_than_ten_percent_above_the_committed_instructions_per_call() -> None:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        if IN_CI:
            pytest.fail("valgrind (callgrind) is required in CI")
        pytest.skip("valgrind not installed")
    committed = _committed()
    fresh = instructions.measure(committed["calls"], committed["warmup"], ("direct", *committed["instructions_per_call"]))
    problems = instructions.check(committed, fresh)
    assert not problems, "\n".join(problems) + f"\nfresh figures: {json.dumps(fresh['instructions_per_call'])}"
    # The subtraction must leave the relay's own work: a pair costs more than one hop, both more than nothing.
    per_call = fresh["instructions_per_call"]
    for load in instructions.LOADS:
        assert per_call["pair"][load] > per_call["1hop"][load] > 0


def test_check_flags_only_figures_more_than_ten_percent_above_the_committed_ones() -> None:
    committed = {"instructions_per_call": {"pair": {"unary_same": 1000, "unary_vary": 2000}}}
    fresh = {"instructions_per_call": {"pair": {"unary_same": 1100, "unary_vary": 2201}}}
    problems = instructions.check(committed, fresh)
    assert len(problems) == 1 and problems[0].startswith("pair unary_vary")
    assert instructions.check(committed, {"instructions_per_call": {}}) == [
        "pair unary_same: not measured", "pair unary_vary: not measured"]


def test_callgrind_dump_files_are_read_in_dump_order(tmp_path: Any) -> None:
    out = tmp_path / "callgrind.out"
    for n, total in ((2, 20), (10, 100), (1, 10)):
        (tmp_path / f"callgrind.out.{n}").write_text(f"events: Ir\nsummary: {total}\ntotals: {total}\n")
    assert instructions._callgrind_parts(out) == [10, 20, 100]
