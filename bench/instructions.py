"""Instructions per relayed call, counted by callgrind: a figure machine noise cannot move, to guard regressions.

One process runs everything on loopback in one event loop: the client (bench.loadgen, one call in flight),
the kuberpc proxies (`sidecar.app.serve`, as `python -m sidecar run` wires them: metrics, deadlines, mTLS
between the pair) and a fake app (bench.rawapp). `--mode pair` relays client → outbound → mTLS → inbound → app,
`1hop` client → outbound → app, `direct` client → app: the harness's own cost, subtracted from the others.
Warm-up calls first (connections, TLS handshakes, HPACK tables), then `--calls` calls with identical headers,
`--calls` with headers varying per call and `--calls` messages on one bidi stream, each section between two markers callgrind is told about
(os.getpgrp() zeroes the counters, os.getsid() dumps them), so start-up and imports never count.
One call in flight and PYTHONHASHSEED=0 make the count repeatable: the same frames arrive in the same reads.

    python -m bench.instructions measure [--out bench/results/instructions.json]   # runs callgrind itself
    python -m bench.instructions check  # re-measures; exit 1 on a >10 % regression against the committed figure

It measures; it must not change the proxy or decide anything about it beyond the threshold check.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sidecar.app import Proxy

REPO = Path(__file__).resolve().parent.parent
COMMITTED = REPO / "bench" / "results" / "instructions.json"
MODES = ("direct", "1hop", "pair")
LOADS = ("unary_same", "unary_vary", "stream")
CALLS = 100
WARMUP = 20
THRESHOLD = 1.10  # a figure more than 10 % above the committed one is a regression
AUTHORITY = "arith.default:50051"
PATH = "/arith.Arith/Add"
STREAM_PATH = "/arith.Arith/Accumulate"


def _env(*, outbound: str, inbound: str, admin: str, app_port: int | None, endpoints: Path, ident: dict[str, str],
         service_account: str) -> dict[str, str]:
    env = {
        "KUBERPC_OUTBOUND_ADDR": outbound,
        "KUBERPC_INBOUND_ADDR": inbound,
        "KUBERPC_ADMIN_ADDR": admin,
        "KUBERPC_DEBUG_ADDR": "127.0.0.1:0",
        "KUBERPC_DISCOVERY": f"file:{endpoints}",
        "KUBERPC_TLS_CERT": ident["cert"],
        "KUBERPC_TLS_KEY": ident["key"],
        "KUBERPC_TRUST_ANCHORS": ident["ca"],
        "KUBERPC_LOG_LEVEL": "warning",
        "POD_NAMESPACE": "default",
        "SERVICE_ACCOUNT": service_account,
    }
    if app_port is not None:
        env.update(KUBERPC_APP_PORT=str(app_port), KUBERPC_POD_LABELS="app=arith")
    return env


def _endpoints(port: int, tls: bool) -> str:
    from bench import configs

    return configs.kuberpc_endpoints(port, tls)


async def _start_proxy(environ: dict[str, str], stack: list[tuple[asyncio.Event, asyncio.Task[None]]]) -> Proxy:
    """A proxy in this event loop, as `python -m sidecar run` wires it; (stop, task) appended to `stack`."""
    from sidecar import config as config_mod
    from sidecar.app import serve

    cfg = config_mod.load(environ)
    stop = asyncio.Event()
    started: asyncio.Future[Proxy] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(cfg, stop=stop, started=started))
    waiters: set[asyncio.Future[Any]] = {task, started}
    done, _ = await asyncio.wait(waiters, timeout=120, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    if started not in done:
        raise RuntimeError("proxy not ready within 120 s")
    stack.append((stop, task))
    return started.result()


async def _wait_routable(proxy: Proxy) -> None:
    # Discovery loads the endpoints file asynchronously after readiness: wait (bounded) for the Service.
    for _ in range(2000):
        if any(len(st.set.usable()) for st in proxy.outbound.services.values()):
            return
        await asyncio.sleep(0.01)
    raise RuntimeError("the proxy never discovered the app")


async def _harness(mode: str, calls: int, warmup: int, work: Path) -> None:
    from bench import grpcwire, loadgen, rawapp
    from bench.procs import free_port
    from sidecar import pki
    from sidecar.spiffe import SpiffeId

    ids: dict[str, dict[str, str]] = {}
    ca = pki.create_ca(trust_domain="cluster.local")
    ca_cert = ca.cert_pem
    for sa in ("bench-client", "bench-server"):
        issued = pki.issue_workload(ca, identity=SpiffeId("cluster.local", "default", sa))
        key, chain = issued.key_pem, issued.cert_pem
        d = work / sa
        d.mkdir(parents=True, exist_ok=True)
        (d / "key.pem").write_bytes(key)
        (d / "cert.pem").write_bytes(chain)
        (d / "ca.pem").write_bytes(ca_cert)
        ids[sa] = {"cert": str(d / "cert.pem"), "key": str(d / "key.pem"), "ca": str(d / "ca.pem")}

    stop_app = asyncio.Event()
    app_port = free_port()
    listening = asyncio.Event()
    app_task = asyncio.create_task(rawapp.serve(app_port, "auto", stop_app, listening=listening))
    proxies: list[tuple[asyncio.Event, asyncio.Task[None]]] = []
    await asyncio.wait_for(listening.wait(), 120)
    target = app_port
    if mode == "1hop":
        (work / "out.yaml").write_text(_endpoints(app_port, False))
        out_port = free_port()
        p = await _start_proxy(_env(outbound=f"127.0.0.1:{out_port}", inbound="off", admin="127.0.0.1:0", app_port=None,
                                    endpoints=work / "out.yaml", ident=ids["bench-client"],
                                    service_account="bench-client"), proxies)
        await _wait_routable(p)
        target = out_port
    elif mode == "pair":
        in_port, out_port = free_port(), free_port()
        (work / "in.yaml").write_text(_endpoints(app_port, False))
        await _start_proxy(_env(outbound="127.0.0.1:0", inbound=f"127.0.0.1:{in_port}", admin="127.0.0.1:0",
                                app_port=app_port, endpoints=work / "in.yaml", ident=ids["bench-server"],
                                service_account="bench-server"), proxies)
        (work / "out.yaml").write_text(_endpoints(in_port, True))
        p = await _start_proxy(_env(outbound=f"127.0.0.1:{out_port}", inbound="off", admin="127.0.0.1:0", app_port=None,
                                    endpoints=work / "out.yaml", ident=ids["bench-client"],
                                    service_account="bench-client"), proxies)
        await _wait_routable(p)
        target = out_port

    body = grpcwire.frame(grpcwire.encode_args(1, 2))
    reply = grpcwire.frame(grpcwire.encode_reply(3))

    async def load(n: int, vary: bool, seed: int, marker: bool) -> None:
        result = await loadgen.unary(
            target, AUTHORITY, PATH, calls=n, connections=1, depth=1, vary=vary, body=body, expected=reply,
            timeout_s=600, seed=seed, on_start=os.getpgrp if marker else None)
        if marker:
            os.getsid(0)  # callgrind dumps (and zeroes) its counters here
        if result.calls != n:
            raise RuntimeError(f"{result.calls} of {n} calls answered")

    # The first call may fail while the proxies connect on (their connect timeout is 1 s, and the harness
    # runs ~5x slower under valgrind): try it a few times before the warm-up proper.
    for attempt in range(10):
        try:
            await load(1, False, 0, False)
            break
        except (loadgen.LoadError, OSError):
            if attempt == 9:
                raise
            await asyncio.sleep(0.5)
    # Callgrind starts with instrumentation off (start-up and imports would cost minutes instrumented):
    # switch it on, and keep calling until callgrind_control confirms (it answers between basic blocks).
    if os.environ.get("KUBERPC_CALLGRIND_CONTROL") == "1":
        # Popen returns at once; the loop below keeps this process busy (and callgrind listening) meanwhile.
        control = subprocess.Popen(["callgrind_control", "-i", "on", str(os.getpid())],  # noqa: ASYNC220
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(1000):
            if control.poll() is not None:
                break
            await load(1, False, 0, False)
        if control.wait(timeout=60) != 0:
            raise RuntimeError("callgrind_control could not switch instrumentation on")
    async def stream(n: int, marker: bool) -> None:
        # One bidi stream, one message in flight: each message and its reply cross the relay alone.
        result = await loadgen.streams(
            target, AUTHORITY, STREAM_PATH, messages=n, connections=1, streams_per_connection=1, depth=1,
            timeout_s=600, on_start=os.getpgrp if marker else None)
        if marker:
            os.getsid(0)
        if result.calls != n:
            raise RuntimeError(f"{result.calls} of {n} messages answered")

    # Warm-up on the same kind of connection as the measured calls (each load opens one client connection).
    await load(warmup, False, 1, False)
    await load(warmup, True, 2, False)
    await stream(warmup, False)
    await load(calls, False, 3, True)
    await load(calls, True, 4, True)
    await stream(calls, True)
    for stop, task in proxies:
        stop.set()
        await asyncio.wait_for(task, 30)
    stop_app.set()
    await app_task


def _callgrind_parts(out_file: Path) -> list[int]:
    """Instructions of each dumped section, in order (callgrind numbers its dumps .1, .2, ...)."""
    counts = []
    for part in sorted(out_file.parent.glob(out_file.name + ".*"), key=lambda p: int(p.suffix[1:])):
        m = re.search(r"^summary: (\d+)", part.read_text(errors="replace"), re.M)
        if m is None:
            raise RuntimeError(f"no summary in {part}")
        counts.append(int(m.group(1)))
    return counts


def count(mode: str, calls: int = CALLS, warmup: int = WARMUP, valgrind: str | None = None) -> dict[str, int]:
    """Instructions of `calls` calls of each load in `mode`, from one callgrind run of the harness."""
    valgrind = valgrind or shutil.which("valgrind")
    if valgrind is None:
        raise RuntimeError("valgrind not found")
    with tempfile.TemporaryDirectory(prefix="kuberpc-instr-") as tmp:
        out = Path(tmp) / "callgrind.out"
        argv = [valgrind, "--tool=callgrind", "--instr-atstart=no", "--zero-before=getpgrp", "--dump-before=getsid",
                f"--callgrind-out-file={out}", sys.executable, "-m", "bench.instructions", "harness",
                "--mode", mode, "--calls", str(calls), "--warmup", str(warmup), "--work", tmp]
        env = {**os.environ, "PYTHONHASHSEED": "0", "KUBERPC_CALLGRIND_CONTROL": "1"}
        done = subprocess.run(argv, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=900, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"harness under callgrind exited {done.returncode}:\n{done.stderr[-3000:]}")
        parts = _callgrind_parts(out)
    if len(parts) < len(LOADS):
        raise RuntimeError(f"expected {len(LOADS)} dumps, got {parts}")
    return dict(zip(LOADS, parts[: len(LOADS)], strict=True))


def measure(calls: int = CALLS, warmup: int = WARMUP, modes: tuple[str, ...] = MODES) -> dict[str, Any]:
    """Per mode and load, instructions per call with the harness's own (`direct`) subtracted."""
    with ThreadPoolExecutor(max_workers=len(modes)) as pool:
        raw = dict(zip(modes, pool.map(lambda m: count(m, calls, warmup), modes), strict=True))
    per_call: dict[str, dict[str, int]] = {}
    for mode in modes:
        if mode == "direct":
            continue
        per_call[mode] = {load: round((raw[mode][load] - raw["direct"][load]) / calls) for load in LOADS}
    return {
        "calls": calls,
        "warmup": warmup,
        "python": sys.version.split()[0],
        "harness_per_call": {load: round(raw["direct"][load] / calls) for load in LOADS},
        "instructions_per_call": per_call,
        "command": "python -m bench.instructions measure",
    }


def check(committed: dict[str, Any], fresh: dict[str, Any], threshold: float = THRESHOLD) -> list[str]:
    """Every figure more than `threshold` times its committed value, as a message."""
    problems = []
    for mode, loads in committed["instructions_per_call"].items():
        for load, before in loads.items():
            now = fresh["instructions_per_call"].get(mode, {}).get(load)
            if now is None:
                problems.append(f"{mode} {load}: not measured")
            elif now > before * threshold:
                problems.append(f"{mode} {load}: {now:,} instructions per call, committed {before:,} (+{now / before - 1:.0%})")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("harness", help="the in-process harness (run under callgrind by `measure`)")
    h.add_argument("--mode", choices=MODES, required=True)
    h.add_argument("--calls", type=int, default=CALLS)
    h.add_argument("--warmup", type=int, default=WARMUP)
    h.add_argument("--work", type=Path, required=True)
    m = sub.add_parser("measure", help="count and write the figure")
    m.add_argument("--out", type=Path, default=COMMITTED)
    m.add_argument("--calls", type=int, default=CALLS)
    sub.add_parser("check", help="count and compare with the committed figure")
    args = parser.parse_args(argv)
    if args.cmd == "harness":
        asyncio.run(_harness(args.mode, args.calls, args.warmup, args.work))
        return 0
    if args.cmd == "measure":
        fresh = measure(args.calls)
        args.out.write_text(json.dumps(fresh, indent=2) + "\n")
        print(json.dumps(fresh, indent=2))
        return 0
    committed = json.loads(COMMITTED.read_text())
    fresh = measure(committed["calls"], committed["warmup"], ("direct", *committed["instructions_per_call"]))
    print(json.dumps(fresh, indent=2))
    problems = check(committed, fresh)
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
