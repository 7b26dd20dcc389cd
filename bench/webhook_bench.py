"""Benchmark: bursts of 200 concurrent AdmissionReviews over real HTTPS against `python -m webhook serve`.

Not a test: prints p50/p99 latency (ms) per burst shape. The server runs as its own process, as in a cluster.
Usage: .venv/bin/python bench/webhook_bench.py [--concurrency 200] [--rounds 5]
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
from pathlib import Path
from typing import Any

import aiohttp

from webhook.install import generate_ca, issue_serving_cert, service_dns_names

ROOT = Path(__file__).resolve().parents[1]
REVIEW = ROOT / "tests" / "webhook" / "fixtures" / "deployment-pod-review.json"
SERVER_NAME = "kuberpc-webhook.kuberpc-system.svc"
DEADLINE_S = 120.0  # the whole run, whatever the arguments


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def burst(url: str, ctx: ssl.SSLContext, body: dict[str, Any], n: int, *, fresh: bool, session: aiohttp.ClientSession | None) -> list[float]:
    """n reviews at once; each latency in ms. fresh=True: every review on a new TLS connection."""
    bodies = []
    for i in range(n):  # encoded before the clock starts: the client's own JSON work is not the webhook's
        review = copy.deepcopy(body)
        review["request"]["uid"] = f"bench-{i}"
        bodies.append(json.dumps(review).encode())
    headers = {"Content-Type": "application/json"}

    async def one(i: int, s: aiohttp.ClientSession) -> float:
        started = time.perf_counter()
        async with s.post(url, data=bodies[i], headers=headers, ssl=ctx, server_hostname=SERVER_NAME) as resp:
            answer = await resp.json()
        elapsed = (time.perf_counter() - started) * 1000
        if resp.status != 200 or "patch" not in answer["response"]:
            raise RuntimeError(f"unexpected answer {resp.status}")
        return elapsed

    if fresh or session is None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as s:
            return list(await asyncio.gather(*(one(i, s) for i in range(n))))
    return list(await asyncio.gather(*(one(i, session) for i in range(n))))


async def main(concurrency: int, rounds: int) -> dict[str, dict[str, float]]:
    body = json.loads(REVIEW.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        now = dt.datetime.now(dt.UTC)
        ca = generate_ca("bench CA", now=now)
        pair = issue_serving_cert(ca, service_dns_names(), now=now)
        (Path(tmp) / "tls.crt").write_bytes(pair.cert_pem)
        (Path(tmp) / "tls.key").write_bytes(pair.key_pem)
        (Path(tmp) / "config.yaml").write_text('kubernetesVersion: "1.30"\nlogLevel: info\n')
        env = {**os.environ, "KUBECONFIG": str(Path(tmp) / "none"), "POD_NAMESPACE": "kuberpc-system"}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "webhook", "serve", "--config", f"{tmp}/config.yaml", "--tls-cert", f"{tmp}/tls.crt",
            "--tls-key", f"{tmp}/tls.key", "--host", "127.0.0.1", "--port", "0", "--shutdown-delay", "0",
            cwd=ROOT, env={**env, "PYTHONUNBUFFERED": "1"}, stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stderr is not None
        results: dict[str, dict[str, float]] = {}
        try:
            async with asyncio.timeout(DEADLINE_S):
                # INFO logs only state changes (per-review lines are DEBUG), so the pipe never fills.
                port = await _wait_port(proc.stderr)
                url = f"https://127.0.0.1:{port}/mutate?timeout=10s"
                ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())
                await burst(url, ctx, body, 20, fresh=True, session=None)  # warm-up: imports, first handshakes
                for shape, fresh in (("new-connections", True), ("keep-alive", False)):
                    lat: list[float] = []
                    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
                        if not fresh:
                            await burst(url, ctx, body, concurrency, fresh=False, session=s)  # open the pool
                        for _ in range(rounds):
                            lat += await burst(url, ctx, body, concurrency, fresh=fresh, session=s)
                    results[shape] = {
                        "reviews": len(lat),
                        "p50_ms": round(statistics.median(lat), 2),
                        "p99_ms": round(percentile(lat, 99), 2),
                        "max_ms": round(max(lat), 2),
                    }
                    print(f"{shape:16s} {concurrency} concurrent x {rounds}: p50 {results[shape]['p50_ms']} ms, "
                          f"p99 {results[shape]['p99_ms']} ms, max {results[shape]['max_ms']} ms")
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    async with asyncio.timeout(10):
                        await proc.wait()
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
    return results


async def _wait_port(stderr: asyncio.StreamReader) -> int:
    """The port from the server's `event=listening` log line (bounded by the caller's timeout)."""
    while not (m := re.search(rb"event=listening address=(\[.*\])", await stderr.readline())):
        pass
    return int(json.loads(m.group(1))[1])


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--concurrency", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    args = p.parse_args()
    figures = asyncio.run(main(min(args.concurrency, 1000), min(args.rounds, 50)))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
