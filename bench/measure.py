"""The figures of one running path: verification, saturation, paced and ping-pong latency, CPU, RSS, streaming.

Drives load at an already-running path and reads /proc; it must not start or stop the path's processes.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import client, grpcwire, h2load, paced, procstat
from bench.configs import ARGS, AUTHORITY, REPLY_C, UNARY_PATH
from bench.procs import Started

REPLY_BYTES = len(grpcwire.frame(grpcwire.encode_reply(REPLY_C)))


@dataclass(frozen=True, slots=True)
class Settings:
    """Counts and durations of one run; every load loop is bounded by these and by `timeout_s`."""

    probe_calls: int
    saturation_s: float
    saturation_max_calls: int
    clients: int
    streams_per_client: int
    rate: int
    rate_s: float
    pingpong_calls: int
    stream_messages: int
    stream_concurrency: int
    timeout_s: float


FULL = Settings(
    probe_calls=20_000,
    saturation_s=8.0,
    saturation_max_calls=2_000_000,
    clients=4,
    streams_per_client=32,
    rate=1000,
    rate_s=5.0,
    pingpong_calls=10_000,
    stream_messages=60_000,
    stream_concurrency=4,
    timeout_s=120.0,
)
SMOKE = Settings(
    probe_calls=200,
    saturation_s=0.2,
    saturation_max_calls=2_000,
    clients=2,
    streams_per_client=4,
    rate=1000,
    rate_s=0.2,
    pingpong_calls=100,
    stream_messages=200,
    stream_concurrency=2,
    timeout_s=30.0,
)


@dataclass(frozen=True, slots=True)
class Target:
    """Where the load goes: a port serving h2c with the arith service, and the processes that count as proxy."""

    port: int
    proxies: list[Started]


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


def _saturation_calls(target: Target, work: Path, settings: Settings) -> int:
    """Calls for a ~saturation_s run, sized by a probe run that also warms every connection on the path."""
    probe = _h2load(target, work, settings, calls=settings.probe_calls, clients=settings.clients,
                    streams=settings.streams_per_client)
    return int(min(settings.saturation_max_calls, max(settings.probe_calls, probe.rps * settings.saturation_s)))


def saturation_rps(target: Target, work: Path, settings: Settings) -> float:
    """Throughput with `clients x streams` calls in flight."""
    calls = _saturation_calls(target, work, settings)
    return _h2load(target, work, settings, calls=calls, clients=settings.clients,
                   streams=settings.streams_per_client).rps


def profile(target: Target, work: Path, settings: Settings, *, py_spy: str, out_dir: Path, label: str) -> list[str]:
    """py-spy folded stacks of every Python proxy of the path under one more saturation run.

    A separate run after the measured ones: the sampler costs the proxy CPU, which must not reach the figures.
    """
    calls = int(min(settings.saturation_max_calls, max(settings.probe_calls, 2000 * settings.saturation_s)))
    recorders, files = [], []
    out_dir.mkdir(parents=True, exist_ok=True)
    for p in target.proxies:
        if not p.name.startswith("kuberpc"):
            continue
        out = out_dir / f"{label}-{p.name}.folded"
        recorders.append(subprocess.Popen(
            [py_spy, "record", "--pid", str(p.pid), "--format", "raw", "--rate", "200", "--nonblocking",
             "--output", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        files.append(str(out))
    try:
        _h2load(target, work, settings, calls=calls, clients=settings.clients, streams=settings.streams_per_client)
    finally:
        for r in recorders:
            r.send_signal(signal.SIGINT)  # py-spy writes its output when interrupted
            r.wait(timeout=30)
    return files


def measure(target: Target, work: Path, settings: Settings) -> dict[str, Any]:
    pids = [p.pid for p in target.proxies]
    out: dict[str, Any] = {
        "proxies": {
            p.name: {"pid": p.pid, "startup_s": round(p.startup_s, 4), "rss_idle_kib": procstat.rss_kib(p.pid)}
            for p in target.proxies
        }
    }
    out["verified"] = asyncio.run(client.verify(target.port, AUTHORITY))

    calls = _saturation_calls(target, work, settings)
    cpu_before = procstat.cpu_seconds(pids)
    with procstat.PeakRss(pids) as peak:
        sat = _h2load(target, work, settings, calls=calls, clients=settings.clients,
                      streams=settings.streams_per_client)
    cpu = procstat.cpu_seconds(pids) - cpu_before
    out["saturation"] = {
        "calls": calls,
        "rps": round(sat.rps, 1),
        "elapsed_s": sat.elapsed_s,
        "response_bytes": sat.data_bytes,
        "proxy_cpu_s": round(cpu, 3),
        "cpu_us_per_call": round(cpu * 1e6 / calls, 2) if pids else None,
    }
    for p in target.proxies:
        out["proxies"][p.name]["rss_load_kib"] = peak.peak[p.pid]

    rate_calls = int(settings.rate * settings.rate_s)
    paced_result = asyncio.run(paced.run(
        target.port, AUTHORITY, UNARY_PATH, grpcwire.frame(grpcwire.encode_args(*ARGS)),
        paced.expected_reply(REPLY_C), rate=settings.rate, calls=rate_calls, timeout_s=settings.timeout_s))
    out["rate"] = {"target_rps": settings.rate, "client": "bench.paced (open loop, one connection)",
                   "late_sends": paced_result.late_sends, **_latency(paced_result.latencies_us, rate_calls)}

    pp_log = str(work / "pingpong.log")
    _h2load(target, work, settings, calls=settings.pingpong_calls, clients=1, streams=1, log_file=pp_log)
    out["pingpong"] = _latency(h2load.read_log(pp_log), settings.pingpong_calls)

    cpu_before = procstat.cpu_seconds(pids)
    streamed = asyncio.run(
        client.stream_throughput(target.port, AUTHORITY, messages=settings.stream_messages,
                                 streams=settings.stream_concurrency, timeout_s=settings.timeout_s)
    )
    cpu = procstat.cpu_seconds(pids) - cpu_before
    out["stream"] = {
        "messages": streamed.messages,
        "elapsed_s": round(streamed.elapsed_s, 3),
        "msgs_per_s": round(streamed.per_second, 1),
        "cpu_us_per_msg": round(cpu * 1e6 / streamed.messages, 2) if pids else None,
    }
    return out
