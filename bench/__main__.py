"""`python -m bench [--smoke] [--out DIR] [--paths a,b]`: run the side-by-side benchmark and write its results.

Parses arguments and reports; it must not hold measurement logic (run.py, measure.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import measure, report, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny counts: checks the harness end to end in seconds")
    parser.add_argument("--out", type=Path, help="results directory (default bench/results; smoke: a temp dir)")
    parser.add_argument("--paths", default=",".join(run.PATHS), help=f"comma-separated subset of {','.join(run.PATHS)}")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="after measuring, profile each kuberpc proxy with py-spy under saturation (folded stacks)")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="only rewrite latest.md (beside JSON, or in --out) from an earlier run's results")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (configs, process logs)")
    args = parser.parse_args(argv)
    paths = tuple(p for p in args.paths.split(",") if p)
    if unknown := [p for p in paths if p not in run.PATHS]:
        parser.error(f"unknown path(s): {', '.join(unknown)}")
    if args.render is not None:
        results = json.loads(args.render.read_text())
        md_path = (args.out or args.render.parent) / "latest.md"
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(report.markdown(results))
        print(f"wrote {md_path}", file=sys.stderr)
        return 0
    ci = os.environ.get("CI", "").lower() == "true"
    settings = measure.SMOKE if args.smoke else measure.FULL
    out = args.out or (Path(tempfile.mkdtemp(prefix="kuberpc-bench-smoke-")) if args.smoke
                       else Path(__file__).resolve().parent / "results")
    start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="kuberpc-bench-"))
    try:
        results = run.run(settings=settings, work=work, paths=paths, ci=ci, profile_dir=args.profile)
    finally:
        if args.keep:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    results["wall_s"] = round(time.monotonic() - start, 1)
    json_path, md_path = report.write(results, out)
    print(report.markdown(results))
    print(f"wrote {json_path} and {md_path} in {results['wall_s']} s", file=sys.stderr)
    return 1 if any(e.get("status") == "failed" for e in results["paths"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
