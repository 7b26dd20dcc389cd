"""The figures of one running path: verification, saturation samples checked for a busy proxy core, latency, RSS.

Drives load at an already-running path and reads /proc; it must not start or stop the path's processes, and it
must not aggregate samples across rounds (rounds.py does).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import client, grpcwire, h2load, loadgen, paced, procstat
from bench.configs import ARGS, AUTHORITY, REPLY_C, STREAM_PATH, UNARY_PATH
from bench.procs import Started

REPLY_BYTES = len(grpcwire.frame(grpcwire.encode_reply(REPLY_C)))
REQUEST = grpcwire.frame(grpcwire.encode_args(*ARGS))
REPLY = grpcwire.frame(grpcwire.encode_reply(REPLY_C))
# The three saturation loads (see bench/README.md): h2load's identical calls, loadgen's calls whose headers
# change every call, and bidi streams (CPU per message).
LOADS = ("unary_same", "unary_vary", "stream")


@dataclass(frozen=True, slots=True)
class Settings:
    """Counts and durations of one run; every load loop is bounded by these and by `timeout_s`."""

    rounds: int
    probe_calls: int
    saturation_s: float
    saturation_max_calls: int
    clients: int
    streams_per_client: int
    stream_connections: int
    streams_per_connection: int
    stream_depth: int
    busy_min: float  # a sample whose proxy core was less busy than this is rejected and taken again
    max_attempts: int  # per sample; the last attempt is kept, flagged, if none reached busy_min
    rate: int
    rate_s: float
    pingpong_calls: int
    timeout_s: float


FULL = Settings(
    rounds=3,
    probe_calls=5_000,
    saturation_s=4.0,
    saturation_max_calls=400_000,
    clients=4,
    streams_per_client=32,
    stream_connections=2,
    streams_per_connection=4,
    stream_depth=64,
    busy_min=0.90,
    max_attempts=3,
    rate=1000,
    rate_s=5.0,
    pingpong_calls=5_000,
    timeout_s=120.0,
)
SMOKE = Settings(
    rounds=1,
    probe_calls=200,
    saturation_s=0.2,
    saturation_max_calls=2_000,
    clients=2,
    streams_per_client=4,
    stream_connections=1,
    streams_per_connection=2,
    stream_depth=4,
    busy_min=0.0,  # tiny runs cannot saturate anything: busy is recorded, not enforced
    max_attempts=1,
    rate=1000,
    rate_s=0.2,
    pingpong_calls=100,
    timeout_s=30.0,
)


@dataclass(frozen=True, slots=True)
class Target:
    """Where the load goes: a port serving h2c with the arith service, and the processes that count as proxy."""

    port: int
    proxies: list[Started]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.proxies]


def _h2load(
    target: Target, work: Path, settings: Settings, *, calls: int, clients: int, streams: int,
    log_file: str | None = None,
) -> h2load.H2loadResult:
    argv = h2load.command(
        f"http://127.0.0.1:{target.port}{UNARY_PATH}",
        str(work / "request.bin"),
        AUTHORITY,
        clients=clients,
        streams=streams,
        requests=calls,
        log_file=log_file,
    )
    if log_file is not None:
        Path(log_file).unlink(missing_ok=True)  # h2load appends to an existing log
    done = subprocess.run(argv, capture_output=True, text=True, timeout=settings.timeout_s, check=False)
    if done.returncode != 0:
        raise h2load.LoadCheckError(f"h2load exited {done.returncode}: {done.stderr[-1000:]}{done.stdout[-1000:]}")
    result = h2load.parse(done.stdout)
    h2load.check(result, calls, REPLY_BYTES)
    return result


def write_request(work: Path, a: int, b: int) -> None:
    (work / "request.bin").write_bytes(grpcwire.frame(grpcwire.encode_args(a, b)))


def _latency(values: list[int], calls: int) -> dict[str, Any]:
    if len(values) != calls:
        raise h2load.LoadCheckError(f"{len(values)} latencies recorded for {calls} calls")
    return {
        "calls": calls,
        "p50_us": h2load.percentile(values, 50),
        "p99_us": h2load.percentile(values, 99),
        "mean_us": round(sum(values) / len(values), 1),
    }


@dataclass(frozen=True, slots=True)
class Window:
    """One timed load: calls (or messages) answered, its duration and the proxies' CPU time within it."""

    calls: int
    elapsed_s: float
    proxy_cpu_s: float


def _run_load(load: str, target: Target, work: Path, settings: Settings, calls: int) -> Window:
    """`calls` calls (messages for "stream") of `load` at `target`, the proxies' CPU read around the window."""
    pids = target.pids
    if load == "unary_same":
        before = procstat.cpu_seconds(pids)
        r = _h2load(target, work, settings, calls=calls, clients=settings.clients, streams=settings.streams_per_client)
        # h2load's own start-up (connections, SETTINGS) falls outside its elapsed time but inside this CPU
        # window: a few ms against seconds, it can only make the core look busier by that much.
        return Window(calls, r.elapsed_s, procstat.cpu_seconds(pids) - before)
    start_cpu: list[float] = []

    def on_start() -> None:
        start_cpu.append(procstat.cpu_seconds(pids))

    if load == "unary_vary":
        result = asyncio.run(loadgen.unary(
            target.port, AUTHORITY, UNARY_PATH, calls=calls, connections=settings.clients,
            depth=settings.streams_per_client, vary=True, body=REQUEST, expected=REPLY,
            timeout_s=settings.timeout_s, seed=calls, on_start=on_start))
    elif load == "stream":
        result = asyncio.run(loadgen.streams(
            target.port, AUTHORITY, STREAM_PATH, messages=calls, connections=settings.stream_connections,
            streams_per_connection=settings.streams_per_connection, depth=settings.stream_depth,
            timeout_s=settings.timeout_s, on_start=on_start))
    else:
        raise ValueError(f"unknown load {load!r}")
    return Window(result.calls, result.elapsed_s, procstat.cpu_seconds(pids) - start_cpu[0])


def saturation_rps(target: Target, work: Path, settings: Settings, load: str = "unary_same") -> float:
    """Throughput of `load` alone (no proxy): a probe-sized run, then one of ~saturation_s."""
    probe = _run_load(load, target, work, settings, settings.probe_calls)
    calls = _calls_for(probe, settings)
    w = _run_load(load, target, work, settings, calls)
    return w.calls / w.elapsed_s if w.elapsed_s > 0 else 0.0


def _calls_for(probe: Window, settings: Settings) -> int:
    rate = probe.calls / probe.elapsed_s if probe.elapsed_s > 0 else 0.0
    return int(min(settings.saturation_max_calls, max(settings.probe_calls, rate * settings.saturation_s)))


def saturation_sample(
    load: str, target: Target, work: Path, settings: Settings, *, on_attempt: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """One saturation sample of `load`: the proxy core must be >= busy_min busy over the window, else it is
    taken again (at most max_attempts times; then the busiest attempt is kept, marked `saturated: false`).

    Every proxy of a path is pinned to the one proxy core, so the core's busy share is the summed CPU time
    of the path's proxies over the window's wall time. A probe run before each attempt sizes it to
    ~saturation_s and warms every connection on the path.
    """
    attempts: list[dict[str, Any]] = []
    for _ in range(settings.max_attempts):
        probe = _run_load(load, target, work, settings, settings.probe_calls)
        calls = _calls_for(probe, settings)
        with procstat.PeakRss(target.pids) as peak:
            w = _run_load(load, target, work, settings, calls)
        busy = w.proxy_cpu_s / w.elapsed_s if target.proxies and w.elapsed_s > 0 else None
        attempt = {
            "calls": w.calls,
            "elapsed_s": round(w.elapsed_s, 3),
            "rate": round(w.calls / w.elapsed_s, 1) if w.elapsed_s > 0 else None,
            "proxy_cpu_s": round(w.proxy_cpu_s, 3),
            "us_per_call": round(w.proxy_cpu_s * 1e6 / w.calls, 2) if target.proxies else None,
            "core_busy": round(busy, 3) if busy is not None else None,
            "rss_peak_kib": dict(peak.peak),
        }
        attempts.append(attempt)
        if on_attempt is not None:
            on_attempt(attempt)
        if busy is None or busy >= settings.busy_min:
            break
    last = attempts[-1]
    saturated = last["core_busy"] is None or last["core_busy"] >= settings.busy_min
    # None saturated: keep the one that came closest (the least flattering to a proxy that idled).
    kept = dict(last if saturated else max(attempts, key=lambda a: a["core_busy"]))
    kept["saturated"] = saturated
    kept["rejected"] = len(attempts) - 1 if saturated else len(attempts)
    kept["rejected_busy"] = [a["core_busy"] for a in (attempts[:-1] if saturated else attempts)]
    return kept


def pingpong(target: Target, work: Path, settings: Settings) -> dict[str, Any]:
    """One call in flight (h2load -c1 -m1): each call's latency."""
    log = str(work / "pingpong.log")
    _h2load(target, work, settings, calls=settings.pingpong_calls, clients=1, streams=1, log_file=log)
    return _latency(h2load.read_log(log), settings.pingpong_calls)


def paced_latency(target: Target, settings: Settings) -> dict[str, Any]:
    rate_calls = int(settings.rate * settings.rate_s)
    result = asyncio.run(paced.run(
        target.port, AUTHORITY, UNARY_PATH, REQUEST, paced.expected_reply(REPLY_C),
        rate=settings.rate, calls=rate_calls, timeout_s=settings.timeout_s))
    return {"target_rps": settings.rate, "client": "bench.paced (open loop, one connection)",
            "late_sends": result.late_sends, **_latency(result.latencies_us, rate_calls)}


def idle(target: Target) -> dict[str, Any]:
    """Per proxy: start-up time and idle RSS; and a real grpcio client's check of both call shapes."""
    return {
        "proxies": {
            p.name: {"pid": p.pid, "startup_s": round(p.startup_s, 4), "rss_idle_kib": procstat.rss_kib(p.pid)}
            for p in target.proxies
        },
        "verified": asyncio.run(client.verify(target.port, AUTHORITY)),
    }


def profile(target: Target, work: Path, settings: Settings, *, py_spy: str, out_dir: Path, label: str) -> list[str]:
    """py-spy folded stacks of every Python proxy of the path under one more saturation run of each unary load.

    A separate run after the measured ones: the sampler costs the proxy CPU, which must not reach the figures.
    """
    recorders, files = [], []
    out_dir.mkdir(parents=True, exist_ok=True)
    for p in target.proxies:
        if "kuberpc" not in p.name:
            continue
        out = out_dir / f"{label}-{p.name}.folded"
        recorders.append(subprocess.Popen(
            [py_spy, "record", "--pid", str(p.pid), "--format", "raw", "--rate", "200", "--nonblocking",
             "--output", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        files.append(str(out))
    try:
        calls = int(min(settings.saturation_max_calls, max(settings.probe_calls, 2000 * settings.saturation_s)))
        for load in ("unary_same", "unary_vary"):
            _run_load(load, target, work, settings, calls)
    finally:
        for r in recorders:
            r.send_signal(signal.SIGINT)  # py-spy writes its output when interrupted
            r.wait(timeout=30)
    return files
