"""`python -m bench.chaos [--only NAME,…] [--out FILE]`: run the chaos scenarios of e2e/chaos.py and write their
figures (calls, failed calls, failed calls a retry could have saved, p99 during the event, recovery time).

Parses arguments and reports; the scenarios and their measurement live in e2e/chaos.py. Needs root and `ip`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from e2e.chaos import SCENARIOS, ChaosMesh

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "chaos-latest.json"


def table(rows: list[dict[str, object]]) -> str:
    """The README's table: one line per scenario."""
    lines = [
        "| scenario | calls | failed calls | of which retryable | p99 during the event, ms | recovery, s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        recovery = "–" if r["recovery_s"] is None else f"{r['recovery_s']}"
        lines.append(
            f"| {r['scenario']} | {r['calls']:,} | {r['failed_calls']} | {r['retryable']} | {r['p99_during_ms']} | {recovery} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__)
    parser.add_argument("--only", default="", help="comma-separated scenario names (default: all)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results file (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    wanted = [n for n in args.only.split(",") if n]
    scenarios = [s for s in SCENARIOS if not wanted or s.name in wanted]
    if unknown := set(wanted) - {s.name for s in scenarios}:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    started = time.monotonic()
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="kuberpc-chaos-") as work:
        mesh = ChaosMesh(Path(work))
        try:
            mesh.start()
            for scenario in scenarios:
                outcome = scenario.run(mesh)
                rows.append(outcome.figures())
                print(json.dumps(rows[-1]), file=sys.stderr)
        finally:
            mesh.close()
    result = {"run_seconds": round(time.monotonic() - started, 1), "scenarios": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
