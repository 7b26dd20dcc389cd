"""Benchmark: bursts of 200 concurrent AdmissionReviews over real HTTPS against `python -m webhook serve`.

Not a test: prints p50/p99 latency (ms) per burst shape. The server runs as its own process, as in a cluster,
pinned to one core (`taskset -c --server-cpu`) while this client runs on uvloop pinned to the other, so the
client's own TLS and HTTP work never competes with the server for a core.

Shapes:
  keep-alive       200 pooled connections opened once, each burst reuses them: the API server's pattern
                   (its webhook client keeps connections alive).
  new-connections  every review opens a new TCP + TLS connection (full handshake, no resumption).
  resumed          new connections that resume the previous TLS session (a client with a session cache).

Pods: by default every review carries the same Pod (a rollout: one template, only the uid differs), which the
webhook answers once and reuses; --distinct gives every review its own Pod (a label differs, as between a
Deployment's replicas), --distinct-workloads gives every Pod its own annotation, so every answer is worked out,
and --templates N makes each burst N workloads rolling out at once (replicas differ in a label, workloads in an
annotation, new ones every burst): N answers worked out per burst, the rest reused.

Usage: .venv/bin/python bench/webhook_bench.py [--concurrency 200] [--rounds 10] [--distinct | --distinct-workloads | --templates N] [--quiet-wait 60]
           [--server-src DIR (A/B: serve another copy of the webhook package)] [--profile out.svg] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import datetime as dt
import json
import os
import re
import signal
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop

from sidecar import pki
from webhook.install import service_dns_names

ROOT = Path(__file__).resolve().parents[1]
REVIEW = ROOT / "tests" / "webhook" / "fixtures" / "deployment-pod-review.json"
SERVER_NAME = "kuberpc-webhook.kuberpc-system.svc"
DEADLINE_S = 900.0  # the whole run, whatever the arguments (quiet waits included)
SHAPES = ("keep-alive", "new-connections", "resumed")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


class Reviews:
    """The request bodies of each burst, encoded before the clock starts (the client's JSON work is not the webhook's).

    vary="": every review carries the same Pod and only the uid differs.
    vary="labels": every review's Pod differs in a label unique to the burst and the review, as a Deployment's
    replicas differ in names and labels; the injector reads neither, so the webhook may still reuse its answer.
    vary="annotations": every Pod differs in an annotation, which the injector reads: nothing can be reused.
    templates=N (with vary="labels"): review i also carries its workload's annotation, one of N new each burst.
    """

    def __init__(self, template: dict[str, Any], n: int, *, vary: str = "", templates: int = 0) -> None:
        self._template, self._n, self._vary, self._bursts = template, n, vary, 0
        self._templates = templates
        self._fixed = self._make("same")

    def _make(self, tag: str) -> list[bytes]:
        out = []
        for i in range(self._n):
            review = copy.deepcopy(self._template)
            review["request"]["uid"] = f"bench-{tag}-{i}"
            if self._vary:
                review["request"]["object"]["metadata"].setdefault(self._vary, {})["bench.kuberpc.io/review"] = f"{tag}-{i}"
            if self._templates:
                workload = f"{tag}-{i % self._templates}"
                review["request"]["object"]["metadata"].setdefault("annotations", {})["bench.kuberpc.io/workload"] = workload
            out.append(json.dumps(review).encode())
        return out

    def next(self) -> list[bytes]:
        self._bursts += 1
        return self._make(str(self._bursts)) if self._vary else self._fixed

    def __len__(self) -> int:
        return self._n


class Connection:
    """One kept-alive HTTP/1.1 connection over TLS, speaking just enough HTTP for this benchmark.

    Hand-written rather than aiohttp's client: with 200 requests in flight aiohttp's per-request work
    on the client core shows up in the latency figures, and this measures the webhook, not the client.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int, ctx: ssl.SSLContext) -> Connection:
        reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=SERVER_NAME, ssl_handshake_timeout=30)
        return cls(reader, writer)

    async def answer(self) -> bytes:
        """The next response, whole (status line and headers included)."""
        head = await self.reader.readuntil(b"\r\n\r\n")
        m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        if m is None:
            raise RuntimeError(f"no Content-Length in {head[:200]!r}")
        return head + await self.reader.readexactly(int(m.group(1)))

    def close(self) -> None:
        self.writer.close()


async def burst_pooled(bodies: list[bytes], conns: list[Connection]) -> list[float]:
    """One review on each kept-alive connection, all at once; each latency in ms, from the burst's start."""
    started = time.perf_counter()
    for conn, data in zip(conns, bodies, strict=True):
        conn.writer.write(_request(data, keep_alive=True))

    async def one(conn: Connection) -> tuple[float, bytes]:
        raw = await conn.answer()
        return (time.perf_counter() - started) * 1000, raw

    done = await asyncio.gather(*(one(c) for c in conns))
    for _, raw in done:
        _check_raw(raw)
    return [ms for ms, _ in done]


async def _request_on_new_connection(host: str, port: int, ctx: ssl.SSLContext, data: bytes) -> tuple[float, bytes]:
    """One review on a fresh TCP + TLS connection (HTTP/1.1, Connection: close); (ms, raw answer)."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=SERVER_NAME, ssl_handshake_timeout=30)
    writer.write(_request(data, keep_alive=False))
    raw = await reader.read()  # Connection: close: the server ends the stream after the answer
    elapsed = (time.perf_counter() - started) * 1000
    writer.close()
    return elapsed, raw


def _request(data: bytes, *, keep_alive: bool) -> bytes:
    # The API server's request line: the path with its ?timeout query.
    return (
        b"POST /mutate?timeout=10s HTTP/1.1\r\nHost: " + SERVER_NAME.encode() + b"\r\nContent-Type: application/json\r\n"
        + (b"" if keep_alive else b"Connection: close\r\n")
        + b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data
    )


def _check_raw(raw: bytes) -> None:
    head, _, payload = raw.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200") or b'"patch"' not in payload:
        raise RuntimeError(f"unexpected answer: {raw[:200]!r}")


async def burst_fresh(host: str, port: int, ctx: ssl.SSLContext, bodies: list[bytes]) -> tuple[list[float], int]:
    """Every review on its own new connection; (latencies in ms, how many handshakes resumed a session)."""
    done = await asyncio.gather(*(_request_on_new_connection(host, port, ctx, b) for b in bodies))
    for _, raw in done:
        _check_raw(raw)
    return [ms for ms, _ in done], 0


async def burst_resumed(host: str, port: int, ctx: ssl.SSLContext, bodies: list[bytes], sessions: list[ssl.SSLSession | None]) -> tuple[list[float], int]:
    """Like burst_fresh, but connection i offers the TLS session its predecessor i got (a per-connection cache)."""
    loop = asyncio.get_running_loop()

    async def one(i: int, data: bytes) -> tuple[float, bytes, bool]:
        started = time.perf_counter()
        sock = await _connect(loop, host, port)
        # asyncio's ssl= path cannot take a session: wrap the socket with one, handshake, then hand it to streams.
        sslsock = ctx.wrap_socket(sock, server_hostname=SERVER_NAME, do_handshake_on_connect=False, session=sessions[i])
        while True:
            try:
                sslsock.do_handshake()
                break
            except ssl.SSLWantReadError:
                await _wait(loop, sslsock, readable=True)
            except ssl.SSLWantWriteError:
                await _wait(loop, sslsock, readable=False)
        view = memoryview(_request(data, keep_alive=False))
        while view:
            try:
                view = view[sslsock.send(view):]
            except ssl.SSLWantWriteError:
                await _wait(loop, sslsock, readable=False)
            except ssl.SSLWantReadError:
                await _wait(loop, sslsock, readable=True)
        chunks = []
        while True:
            try:
                chunk = sslsock.recv(65536)
            except ssl.SSLWantReadError:
                await _wait(loop, sslsock, readable=True)
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        elapsed = (time.perf_counter() - started) * 1000
        reused = bool(sslsock.session_reused)
        sessions[i] = sslsock.session
        sslsock.close()
        return elapsed, b"".join(chunks), reused

    done = await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)))
    for _, raw, _ in done:
        _check_raw(raw)
    return [ms for ms, _, _ in done], sum(1 for *_, reused in done if reused)


async def _connect(loop: asyncio.AbstractEventLoop, host: str, port: int) -> Any:
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await loop.sock_connect(sock, (host, port))
    return sock


async def _wait(loop: asyncio.AbstractEventLoop, sock: Any, *, readable: bool) -> None:
    fut: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    if readable:
        loop.add_reader(fd, ready)
    else:
        loop.add_writer(fd, ready)
    try:
        await fut
    finally:
        if readable:
            loop.remove_reader(fd)
        else:
            loop.remove_writer(fd)


def machine_busy(interval: float = 0.5) -> float:
    """Fraction of all cores busy over `interval` seconds (Linux /proc/stat)."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    busy0, total0 = sample()
    time.sleep(interval)
    busy1, total1 = sample()
    return (busy1 - busy0) / max(1, total1 - total0)


def wait_until_quiet(limit_s: float, *, threshold: float = 0.15) -> float:
    """Wait (at most limit_s) until other jobs leave the machine nearly idle; the busy fraction last seen.

    On a shared machine other jobs' load lands in the latency figures: measuring in quiet moments makes runs comparable.
    """
    deadline = time.monotonic() + limit_s
    busy = machine_busy()
    while busy > threshold and time.monotonic() < deadline:
        busy = machine_busy()
    return round(busy, 2)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summarize(lat: list[float], per_round_p99: list[float]) -> dict[str, Any]:
    return {
        "reviews": len(lat),
        "p50_ms": round(statistics.median(lat), 2),
        "p99_ms": round(percentile(lat, 99), 2),
        "max_ms": round(max(lat), 2),
        "round_p99_ms": [round(x, 1) for x in per_round_p99],
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    body = json.loads(REVIEW.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        now = dt.datetime.now(dt.UTC)
        ca = pki.create_ca(trust_domain=None, common_name="bench CA", now=now)
        pair = pki.issue_serving(ca, service_dns_names(), now=now)
        (Path(tmp) / "tls.crt").write_bytes(pair.cert_pem)
        (Path(tmp) / "tls.key").write_bytes(pair.key_pem)
        (Path(tmp) / "config.yaml").write_text('kubernetesVersion: "1.30"\nlogLevel: info\n')
        env = {**os.environ, "KUBECONFIG": str(Path(tmp) / "none"), "POD_NAMESPACE": "kuberpc-system", "PYTHONUNBUFFERED": "1"}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        argv = [
            sys.executable, "-m", "webhook", "serve", "--config", f"{tmp}/config.yaml", "--tls-cert", f"{tmp}/tls.crt",
            "--tls-key", f"{tmp}/tls.key", "--host", "127.0.0.1", "--port", "0", "--shutdown-delay", "0",
        ]
        if args.server_cpu is not None:
            argv = ["taskset", "-c", str(args.server_cpu), *argv]
        proc = await asyncio.create_subprocess_exec(*argv, cwd=args.server_src, env=env, stderr=asyncio.subprocess.PIPE)
        assert proc.stderr is not None
        profiler: asyncio.subprocess.Process | None = None
        results: dict[str, Any] = {}
        try:
            async with asyncio.timeout(DEADLINE_S):
                # INFO logs only state changes (per-review lines are DEBUG), so the pipe never fills.
                port = await _wait_port(proc.stderr)
                ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())
                vary = "annotations" if args.distinct_workloads else "labels" if args.distinct or args.templates else ""
                reviews = Reviews(body, args.concurrency, vary=vary, templates=args.templates)
                # Warm-up: imports, first handshakes, the server's caches.
                await burst_fresh("127.0.0.1", port, ctx, reviews.next()[:20])
                if args.profile:
                    # py-spy attaches to the server and runs on the client's core (it inherits this process' affinity).
                    profiler = await asyncio.create_subprocess_exec(
                        str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(proc.pid), "--rate", "500",
                        "--output", str(args.profile), "--format", args.profile_format, "--nonblocking",
                        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                    )
                for shape in args.shapes:
                    busy = await asyncio.to_thread(wait_until_quiet, args.quiet_wait) if args.quiet_wait > 0 else None
                    results[shape] = r = await _shape(shape, port, ctx, reviews, args.rounds, proc.pid)
                    r["machine_busy_before"] = busy
                    print(f"{shape:16s} {args.concurrency} concurrent x {args.rounds}: p50 {r['p50_ms']} ms, "
                          f"p99 {r['p99_ms']} ms, max {r['max_ms']} ms; server CPU {r['server_cpu_us_per_review']} us/review; "
                          f"p99 per round {r['round_p99_ms']}; machine busy before {busy}"
                          + (f"; resumed {r['resumed']}/{r['reviews']}" if "resumed" in r else ""), flush=True)
        finally:
            if profiler is not None and profiler.returncode is None:
                profiler.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
                await _wait_or_kill(profiler, 30)
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                await _wait_or_kill(proc, 10)
    results["_meta"] = {
        "concurrency": args.concurrency, "distinct_pods": args.distinct, "distinct_workloads": args.distinct_workloads, "templates": args.templates, "rounds": args.rounds, "server_cpu": args.server_cpu,
        "client_cpu": args.client_cpu, "loadavg_1m": os.getloadavg()[0], "server_src": str(args.server_src),
    }
    return results


async def _shape(shape: str, port: int, ctx: ssl.SSLContext, reviews: Reviews, rounds: int, pid: int) -> dict[str, Any]:
    """`rounds` bursts of one shape: latency figures, and the server's CPU per review over the timed bursts only.

    Server CPU per review is the figure other jobs on the machine cannot inflate (latency they can).
    """
    lat: list[float] = []
    per_round: list[float] = []
    resumed = 0
    one_round: Callable[[], Awaitable[tuple[list[float], int]]]
    if shape == "keep-alive":
        # Open the pool first: every timed burst finds its connections warm.
        conns = list(await asyncio.gather(*(Connection.open("127.0.0.1", port, ctx) for _ in range(len(reviews)))))
        try:
            await burst_pooled(reviews.next(), conns)
            cpu = cpu_seconds(pid)
            for _ in range(rounds):
                got = await burst_pooled(reviews.next(), conns)
                lat += got
                per_round.append(percentile(got, 99))
                await asyncio.sleep(0.05)  # bursts, not a closed loop: let the previous one's tail drain
        finally:
            for c in conns:
                c.close()
        out = summarize(lat, per_round)
        out["server_cpu_us_per_review"] = round((cpu_seconds(pid) - cpu) / len(lat) * 1e6)
        return out
    sessions: list[ssl.SSLSession | None] = [None] * len(reviews)
    if shape == "resumed":
        await burst_resumed("127.0.0.1", port, ctx, reviews.next(), sessions)  # every slot gets a session to offer

        async def one_round() -> tuple[list[float], int]:
            return await burst_resumed("127.0.0.1", port, ctx, reviews.next(), sessions)
    else:

        async def one_round() -> tuple[list[float], int]:
            return await burst_fresh("127.0.0.1", port, ctx, reviews.next())

    cpu = cpu_seconds(pid)
    for _ in range(rounds):
        got, n = await one_round()
        lat += got
        resumed += n
        per_round.append(percentile(got, 99))
        await asyncio.sleep(0.05)
    out = summarize(lat, per_round)
    out["server_cpu_us_per_review"] = round((cpu_seconds(pid) - cpu) / len(lat) * 1e6)
    if shape == "resumed":
        out["resumed"] = resumed
    return out


async def _wait_or_kill(proc: asyncio.subprocess.Process, seconds: float) -> None:
    try:
        async with asyncio.timeout(seconds):
            await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()


async def _wait_port(stderr: asyncio.StreamReader) -> int:
    """The port from the server's `event=listening` log line (bounded by the caller's timeout)."""
    while not (m := re.search(rb"event=listening address=(\[.*\])", line := await stderr.readline())):
        if not line:
            raise RuntimeError("the webhook exited before listening")
    return int(json.loads(m.group(1))[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, default=200)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {', '.join(SHAPES)}")
    pods = p.add_mutually_exclusive_group()
    pods.add_argument("--distinct", action="store_true",
                      help="every review's Pod differs in a label, as replicas do (default: one Pod, only uids differ)")
    pods.add_argument("--distinct-workloads", action="store_true",
                      help="every review's Pod differs in an annotation: no answer can be reused")
    pods.add_argument("--templates", type=int, default=0,
                      help="each burst is this many workloads rolling out (new ones each burst), replicas differing in a label")
    p.add_argument("--server-cpu", type=int, default=1, help="core the server is pinned to (-1: no pinning)")
    p.add_argument("--client-cpu", type=int, default=0, help="core this client is pinned to (-1: no pinning)")
    p.add_argument("--quiet-wait", type=float, default=0.0,
                   help="before each shape, wait up to this many seconds for other jobs to leave the machine idle")
    p.add_argument("--server-src", type=Path, default=ROOT,
                   help="directory holding the webhook package to serve (default: this checkout), for A/B runs")
    p.add_argument("--profile", type=Path, help="record the server with py-spy into this file during the bursts")
    p.add_argument("--profile-format", default="flamegraph", choices=("flamegraph", "speedscope", "raw"))
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    args = p.parse_args()
    args.concurrency = min(args.concurrency, 1000)
    args.rounds = min(args.rounds, 50)
    args.quiet_wait = min(args.quiet_wait, 120.0)
    args.shapes = [s for s in args.shapes.split(",") if s]
    if unknown := set(args.shapes) - set(SHAPES):
        p.error(f"unknown shapes: {', '.join(sorted(unknown))}")
    if args.server_cpu is not None and args.server_cpu < 0:
        args.server_cpu = None
    if args.client_cpu is not None and args.client_cpu >= 0:
        os.sched_setaffinity(0, {args.client_cpu})
    else:
        args.client_cpu = None
    figures = uvloop.run(run(args))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
