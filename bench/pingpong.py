"""Ping-pong tail latency, kuberpc pair against Envoy pair, measured in interleaved rounds.

One call in flight is where host noise shows most: a proxy pinned to an idle core pays for every wake-up,
and a burst of noise during one path's run decides that run's p99. Running both pairs side by side and
alternating rounds exposes them to the same noise; each round's ratio is reported and their median is
the figure to quote. Usage: python -m bench.pingpong [--rounds 5] [--calls 10000]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
from pathlib import Path

from bench import certs, configs, h2load, measure
from bench import run as bench_run
from bench.configs import CLIENT_SA, SERVER_SA

PATHS = ("kuberpc-pair", "envoy-pair")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.pingpong", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=10_000)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    tools = bench_run.Tools.discover()
    missing = sorted({m for path in PATHS for m in tools.missing(path)})
    if missing:
        print(f"missing tools: {', '.join(missing)}", file=sys.stderr)
        return 1
    load_core, proxy_core = bench_run.cores()
    if load_core is not None:
        os.sched_setaffinity(0, {load_core})
    work = Path(tempfile.mkdtemp(prefix="kuberpc-pingpong-"))
    work.chmod(0o755)  # nginx workers read the reply file below it
    ids = certs.issue(work / "certs", [CLIENT_SA, SERVER_SA], python=tools.found["python"], cwd=str(bench_run.REPO))
    measure.write_request(work, *configs.ARGS)
    settings = measure.FULL
    rows: list[tuple[int, dict[str, tuple[float, float]]]] = []
    with bench_run.backends(work, tools, load_core) as (backend_port, _):
        ctx = bench_run.Context(work, tools, ids, backend_port, load_core, proxy_core)
        with contextlib.ExitStack() as stack:
            targets = {path: stack.enter_context(bench_run.topology(ctx, path)) for path in PATHS}
            for n in range(args.rounds):
                row = {}
                for path, target in targets.items():
                    log = str(work / f"pingpong-{path}.log")
                    measure._h2load(target, work, settings, calls=args.calls, clients=1, streams=1, log_file=log)
                    values = h2load.read_log(log)
                    row[path] = (h2load.percentile(values, 50), h2load.percentile(values, 99))
                rows.append((n, row))
                print(f"round {n}: " + "  ".join(f"{k} p50 {v[0]} µs p99 {v[1]} µs" for k, v in row.items()), flush=True)
    ratios50 = [r["kuberpc-pair"][0] / r["envoy-pair"][0] for _, r in rows]
    ratios99 = [r["kuberpc-pair"][1] / r["envoy-pair"][1] for _, r in rows]
    lines = [
        f"Ping-pong (one call in flight, {args.calls:,} calls per round), kuberpc pair and Envoy pair alternating, "
        f"{args.rounds} rounds; `python -m bench.pingpong --rounds {args.rounds} --calls {args.calls}`.",
        "",
        "| round | kuberpc p50 µs | Envoy p50 µs | p50 ratio | kuberpc p99 µs | Envoy p99 µs | p99 ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (n, r), q50, q99 in zip(rows, ratios50, ratios99, strict=True):
        k, e = r["kuberpc-pair"], r["envoy-pair"]
        lines.append(f"| {n} | {k[0]} | {e[0]} | {q50:.2f}× | {k[1]} | {e[1]} | {q99:.2f}× |")
    lines += ["", f"Median ratio: p50 {statistics.median(ratios50):.2f}×, p99 {statistics.median(ratios99):.2f}×."]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pingpong-latest.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
