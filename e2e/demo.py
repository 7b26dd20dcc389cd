"""`python -m e2e.demo` (`make demo`): a whole mesh on loopback, exercised and summarised in under a minute.

Drives the proxy only through its CLI, environment and network contract (never its internals), needs no root,
and must leave no process behind, whatever happens (failure, exception, Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
import yaml

from e2e.arith import client

REPO = Path(__file__).resolve().parents[1]
NODE_DIR = REPO / "e2e" / "arith" / "node"

NAMESPACE = "default"
SERVICE = "arith"
SERVICE_PORT = 50051
AUTHORITY = f"{SERVICE}.{NAMESPACE}:{SERVICE_PORT}"
INBOUND_PORT, OUTBOUND_PORT, ADMIN_PORT, DEBUG_PORT = 15443, 15001, 15090, 15091
CLIENT_IP = "127.0.0.1"
# Each replica's proxy gets its own loopback address, as a pod gets its own IP (Linux routes all of 127/8 to lo).
REPLICAS: tuple[tuple[str, str, int], ...] = (  # (replica / pod name, proxy address, weight)
    ("arith-1", "127.0.0.2", 1),
    ("arith-2", "127.0.0.3", 2),
    ("arith-3", "127.0.0.4", 3),
)
SHARE_TOLERANCE = 0.02  # a replica's share may be off its weight's share by at most 2 percentage points
# `python -m sidecar certs issue --out DIR` writes these three files (see its --help).
CERT_FILE, KEY_FILE, ANCHORS_FILE = "cert.pem", "key.pem", "ca.pem"

STEP_TIMEOUT = 30.0  # seconds any one set-up step (certs, a replica starting, proxies ready) may take
STOP_TIMEOUT = 10.0  # seconds all processes get to exit after SIGTERM before they are killed
CALLS_TIMEOUT = 40.0  # seconds the whole call phase may take


class DemoError(Exception):
    """The demo could not set up or run; the message says what and where to look."""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path


class Processes:
    """Owns every child process: started here, always stopped here (SIGTERM, then SIGKILL after a deadline)."""

    def __init__(self, workdir: Path, env: Mapping[str, str]) -> None:
        self._logs = workdir / "logs"
        self._logs.mkdir(parents=True, exist_ok=True)
        self._env = dict(env)
        self.children: list[Child] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        stdout_pipe: bool = False,
    ) -> Child:
        log = self._logs / f"{name}.log"
        with log.open("wb") as sink:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(
                list(argv),
                cwd=REPO,
                env={**self._env, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else sink,
                stderr=sink,
            )
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    def check_alive(self) -> None:
        for child in self.children:
            if child.proc.poll() is not None:
                raise DemoError(f"{child.name} exited with status {child.proc.returncode}\n{tail(child.log)}")

    def stop_all(self) -> None:
        """SIGTERM to all (last started first), then SIGKILL whatever is left at the deadline or on a second Ctrl-C."""
        for child in reversed(self.children):
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        try:
            for child in reversed(self.children):
                try:
                    child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    print(
                        f"demo: {child.name} still running {STOP_TIMEOUT:.0f}s after SIGTERM; killing it",
                        file=sys.stderr,
                    )
        finally:
            for child in self.children:
                if child.proc.poll() is None:
                    child.proc.kill()
                    child.proc.wait()
                if child.proc.stdout is not None:
                    child.proc.stdout.close()


def tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"  (no log at {path})"
    return "\n".join(f"  | {line}" for line in text) or f"  (empty log {path})"


def check_free(addresses: Sequence[tuple[str, int]]) -> None:
    """Fail early, naming the address, rather than let a proxy die on a port an earlier run left behind."""
    busy: list[str] = []
    for host, port in addresses:
        with socket.socket() as s:
            # As the proxy's listeners do: connections of an earlier run in TIME_WAIT must not count as busy.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                busy.append(f"{host}:{port} ({e.strerror})")
    if busy:
        raise DemoError(
            "these addresses are not free: " + ", ".join(busy) + "\n"
            "  (another demo or proxy still running? On macOS, add loopback aliases: "
            "sudo ifconfig lo0 alias 127.0.0.2 up, and .3, .4)"
        )


def run_cli(argv: Sequence[str], env: Mapping[str, str]) -> None:
    try:
        done = subprocess.run(
            list(argv), cwd=REPO, env=dict(env), capture_output=True, timeout=STEP_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise DemoError(f"`{' '.join(argv[1:])}` took more than {STEP_TIMEOUT:.0f}s") from e
    if done.returncode != 0:
        raise DemoError(
            f"`{' '.join(argv[1:])}` failed ({done.returncode}):\n{done.stderr.decode(errors='replace')}"
        )


def make_certs(workdir: Path, env: Mapping[str, str]) -> dict[str, Path]:
    """A mesh CA and one workload identity per service account; returns each account's directory."""
    certs = [sys.executable, "-m", "sidecar", "certs"]
    ca = workdir / "ca"
    run_cli([*certs, "ca", "--dir", str(ca)], env)
    out: dict[str, Path] = {}
    for account in (SERVICE, "client"):
        out[account] = workdir / account
        run_cli(
            [*certs, "issue", "--ca-dir", str(ca), "--namespace", NAMESPACE, "--service-account", account,
             "--out", str(out[account])],
            env,
        )  # fmt: skip
    return out


def endpoints_document() -> dict[str, Any]:
    """The discovery file: Service arith.default, its three meshed endpoints weighted 1, 2, 3."""
    return {
        "services": [
            {
                "name": SERVICE,
                "namespace": NAMESPACE,
                "ports": [SERVICE_PORT],
                "annotations": {"kuberpc.io/grpc-services": "arith.Arith"},
                "selector": {"app": SERVICE},  # the replicas' proxies: KUBERPC_POD_LABELS=app=arith
                "endpoints": [
                    {"address": ip, "port": INBOUND_PORT, "weight": weight, "tls": True, "pod": name}
                    for name, ip, weight in REPLICAS
                ],
            }
        ]
    }


def read_serving_line(child: Child, deadline: float) -> int:
    """The replica's port, from its one "serving on host:port" stdout line."""
    assert child.proc.stdout is not None
    buffer = b""
    with selectors.DefaultSelector() as sel:
        sel.register(child.proc.stdout, selectors.EVENT_READ)
        while b"\n" not in buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DemoError(
                    f"{child.name} did not print 'serving on' within {STEP_TIMEOUT:.0f}s\n{tail(child.log)}"
                )
            if sel.select(timeout=left):
                chunk = os.read(child.proc.stdout.fileno(), 4096)
                if not chunk:
                    raise DemoError(f"{child.name} exited before serving\n{tail(child.log)}")
                buffer += chunk
    line = buffer.split(b"\n", 1)[0].decode()
    if not line.startswith("serving on "):
        raise DemoError(f"{child.name} printed {line!r}, expected 'serving on host:port'")
    return int(line.rsplit(":", 1)[1])


def proxy_env(
    *, ip: str, inbound: bool, app_port: int | None, certs: Path, discovery: Path, pod: str, account: str
) -> dict[str, str]:
    env = {
        "KUBERPC_OUTBOUND_ADDR": f"{ip}:{OUTBOUND_PORT}",
        "KUBERPC_INBOUND_ADDR": f"{ip}:{INBOUND_PORT}" if inbound else "off",
        "KUBERPC_ADMIN_ADDR": f"{ip}:{ADMIN_PORT}",
        "KUBERPC_DEBUG_ADDR": f"{ip}:{DEBUG_PORT}",  # each "pod" its own loopback address
        "KUBERPC_DISCOVERY": f"file:{discovery}",
        "KUBERPC_TLS_CERT": str(certs / CERT_FILE),
        "KUBERPC_TLS_KEY": str(certs / KEY_FILE),
        "KUBERPC_TRUST_ANCHORS": str(certs / ANCHORS_FILE),
        # Short drain: the demo stops its proxies only once every call is done.
        "KUBERPC_DRAIN_SECONDS": "2",
        "POD_NAMESPACE": NAMESPACE,
        "POD_NAME": pod,
        "POD_IP": ip,
        "SERVICE_ACCOUNT": account,
    }
    if app_port is not None:
        env["KUBERPC_APP_PORT"] = str(app_port)
        env["KUBERPC_POD_LABELS"] = f"app={account}"  # selected by the Service its account is named after
    return env


def wait_ready(procs: Processes, admins: Sequence[str], deadline: float) -> None:
    """Poll each proxy's /ready until 200, within the deadline; fail at once if any process has died."""
    pending = list(admins)
    while pending:
        procs.check_alive()
        if time.monotonic() > deadline:
            raise DemoError(
                f"proxies not ready within {STEP_TIMEOUT:.0f}s: "
                + ", ".join(f"http://{a}/ready" for a in pending)
            )
        try:
            with urllib.request.urlopen(f"http://{pending[0]}/ready", timeout=1) as resp:
                if resp.status == 200:
                    pending.pop(0)
                    continue
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)


@dataclass
class Results:
    latencies: list[float] = field(default_factory=list)
    replicas: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    unary_errors: Counter[str] = field(default_factory=Counter)  # status and details -> calls that got it
    elapsed: float = 0.0
    streaming: list[tuple[str, str, str, bool]] = field(default_factory=list)  # call, result, replica, ok


async def make_calls(target: str, calls: int, concurrency: int) -> Results:
    """`calls` unary Adds from `concurrency` workers, then one Range, Sum and Accumulate; never raises on RPC errors."""
    results = Results()
    issued = iter(range(calls))

    async def worker(s: Any) -> None:
        for i in issued:  # shared iterator: each call number is taken by exactly one worker
            started = time.perf_counter()
            try:
                answer = await client.add(s, i, 1)
            except grpc.aio.AioRpcError as e:
                results.unary_errors[f"{e.code().name}: {e.details()}"] += 1
                continue
            results.latencies.append(time.perf_counter() - started)
            if answer.value != i + 1:
                results.failures.append(f"Add({i}, 1) returned {answer.value}")
            results.replicas[answer.replica] += 1

    async with client.channel(target, AUTHORITY) as ch:
        s = client.stub(ch)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(CALLS_TIMEOUT):
                await asyncio.gather(*(worker(s) for _ in range(concurrency)))
        except TimeoutError:
            results.failures.append(f"unary calls not done within {CALLS_TIMEOUT:.0f}s")
        results.elapsed = time.perf_counter() - started

        pairs = [(1, 2), (3, 4), (5, 6)]
        checks: list[tuple[str, Any, Any]] = [
            ("Range(0, 5)", lambda: client.range_(s, 0, 5), [0, 1, 2, 3, 4]),
            ("Sum((1,2), (3,4), (5,6))", lambda: client.sum_(s, pairs), 21),
            ("Accumulate((1,2), (3,4), (5,6))", lambda: client.accumulate(s, pairs), [3, 10, 21]),
        ]
        for name, call, expected in checks:
            try:
                answer = await call()
            except grpc.aio.AioRpcError as e:
                results.failures.append(f"{name}: {e.code().name}: {e.details()}")
                results.streaming.append((name, e.code().name, "", False))
                continue
            ok = answer.value == expected
            if not ok:
                results.failures.append(f"{name} returned {answer.value}, expected {expected}")
            results.streaming.append((name, str(answer.value), answer.replica, ok))
    return results


def run_node_client(target: str, env: Mapping[str, str]) -> tuple[str, bool | None]:
    """(what to print, ok); ok is None when skipped because node or its modules are missing."""
    node = shutil.which("node")
    if node is None:
        return "skipped: node is not on PATH", None
    if not (NODE_DIR / "node_modules").is_dir():
        return "skipped: run `npm ci --prefix e2e/arith/node` first", None
    argv = [node, str(NODE_DIR / "client.js"), "--target", target, "--authority", AUTHORITY]
    try:
        done = subprocess.run(argv, env=dict(env), capture_output=True, timeout=STEP_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        return f"failed: no answer within {STEP_TIMEOUT:.0f}s", False
    if done.returncode != 0:
        return f"failed ({done.returncode}): {done.stderr.decode(errors='replace').strip()}", False
    try:
        summary = json.loads(done.stdout)
    except json.JSONDecodeError:
        return f"failed: printed {done.stdout[:200]!r}, not JSON", False
    return json.dumps(summary), True


def scrape(url: str, prefix: str, limit: int) -> list[str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
    except (urllib.error.URLError, OSError) as e:
        return [f"(could not scrape {url}: {e})"]
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    return lines[:limit] or [f"(no {prefix} lines yet)"]


def p50_p99(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[49], cuts[98]


def share_problems(replicas: Counter[str]) -> list[str]:
    total = sum(replicas.values())
    weight_sum = sum(w for _, _, w in REPLICAS)
    problems: list[str] = []
    for name, _, weight in REPLICAS:
        share, expected = (replicas[name] / total if total else 0.0), weight / weight_sum
        if abs(share - expected) > SHARE_TOLERANCE:
            problems.append(
                f"{name} got {share:.1%} of calls, expected {expected:.1%} ± {SHARE_TOLERANCE:.0%}"
            )
    strangers = sorted(set(replicas) - {name for name, _, _ in REPLICAS})
    if strangers:
        problems.append(f"calls answered by unknown replicas {strangers}")
    return problems


def report(results: Results, node: tuple[str, bool | None], calls: int, concurrency: int) -> list[str]:
    """Print the summary; return every reason the demo failed (empty: success)."""
    problems = [f"{n} Add calls failed with {error}" for error, n in results.unary_errors.most_common(3)]
    if len(results.unary_errors) > 3:
        problems.append(f"... and {len(results.unary_errors) - 3} other errors")
    problems += results.failures
    weight_sum = sum(w for _, _, w in REPLICAS)
    total = sum(results.replicas.values())
    print(
        f"\n== {calls} unary Add calls via {CLIENT_IP}:{OUTBOUND_PORT}, :authority {AUTHORITY}, {concurrency} concurrent =="
    )
    print(f"{'replica':<10}{'proxy':<18}{'weight':>7}{'calls':>8}{'share':>9}{'expected':>10}{'diff':>10}")
    for name, ip, weight in REPLICAS:
        share = results.replicas[name] / total if total else 0.0
        expected = weight / weight_sum
        print(
            f"{name:<10}{ip + ':' + str(INBOUND_PORT):<18}{weight:>7}{results.replicas[name]:>8}"
            f"{share:>9.1%}{expected:>10.1%}{(share - expected) * 100:>+8.1f}pt"
        )
    problems += share_problems(results.replicas)
    if results.latencies:
        p50, p99 = p50_p99(results.latencies)
        print(
            f"latency (client-observed, {len(results.latencies)} ok in {results.elapsed:.2f}s): "
            f"p50 {p50 * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms"
        )
    print("\n== streaming calls ==")
    for name, value, replica, ok in results.streaming:
        print(f"{name:<34}{value:<20}{'via ' + replica if replica else '':<16}{'ok' if ok else 'FAILED'}")
    text, node_ok = node
    print(f"\n== Node.js client (@grpc/grpc-js) ==\n{text}")
    if node_ok is False:
        problems.append(f"Node client {text}")
    metrics_url = f"http://{CLIENT_IP}:{ADMIN_PORT}/metrics"
    print(f"\n== metrics of the client proxy: {metrics_url} ==")
    for line in scrape(metrics_url, "kuberpc_requests_total", 3):
        print(f"  {line}")
    return problems


def run_demo(workdir: Path, *, calls: int, concurrency: int, hold: bool, keep: bool) -> int:
    # Children import e2e and sidecar from this checkout whatever the caller's directory.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    env.pop("KUBERPC_UPSTREAMS", None)
    check_free([(CLIENT_IP, OUTBOUND_PORT), (CLIENT_IP, ADMIN_PORT)] + [
        (ip, port) for _, ip, _ in REPLICAS for port in (INBOUND_PORT, OUTBOUND_PORT, ADMIN_PORT)
    ])  # fmt: skip
    set_up = time.monotonic()
    print(f"demo: work directory {workdir}")
    certs = make_certs(workdir, env)
    discovery = workdir / "endpoints.yaml"
    discovery.write_text(yaml.safe_dump(endpoints_document(), sort_keys=False))

    procs = Processes(workdir, env)
    try:
        deadline = time.monotonic() + STEP_TIMEOUT
        replicas = [
            procs.start(
                name,
                [sys.executable, "-m", "e2e.arith.server", "--port", "0", "--replica", name],
                stdout_pipe=True,
            )
            for name, _, _ in REPLICAS
        ]
        ports = [read_serving_line(child, deadline) for child in replicas]
        admins: list[str] = []
        for (name, ip, _), port in zip(REPLICAS, ports, strict=True):
            env_p = proxy_env(
                ip=ip,
                inbound=True,
                app_port=port,
                certs=certs[SERVICE],
                discovery=discovery,
                pod=name,
                account=SERVICE,
            )
            procs.start(f"proxy-{name}", [sys.executable, "-m", "sidecar", "run"], env_p)
            admins.append(f"{ip}:{ADMIN_PORT}")
            print(f"demo: {name} serving on 127.0.0.1:{port}, its proxy on {ip}:{INBOUND_PORT}")
        env_c = proxy_env(
            ip=CLIENT_IP,
            inbound=False,
            app_port=None,
            certs=certs["client"],
            discovery=discovery,
            pod="client",
            account="client",
        )
        procs.start("proxy-client", [sys.executable, "-m", "sidecar", "run"], env_c)
        admins.append(f"{CLIENT_IP}:{ADMIN_PORT}")
        wait_ready(procs, admins, time.monotonic() + STEP_TIMEOUT)
        print(f"demo: 4 proxies ready after {time.monotonic() - set_up:.1f}s (logs in {workdir / 'logs'})")

        target = f"{CLIENT_IP}:{OUTBOUND_PORT}"
        started = time.monotonic()
        results = asyncio.run(make_calls(target, calls, concurrency))
        node = run_node_client(target, env)
        procs.check_alive()
        problems = report(results, node, calls, concurrency)
        print(f"\ncalls took {time.monotonic() - started:.1f}s after set-up")
        if problems:
            print("\nFAILED:\n" + "\n".join(f"  - {p}" for p in problems[:20]), file=sys.stderr)
            print(
                f"(logs: {workdir / 'logs'}{'' if keep else '; pass --keep to keep them'})", file=sys.stderr
            )
        else:
            print("\nOK: every call succeeded and every share is within 2 points of its weight")
        if hold:
            print(
                "\nthe mesh stays up until Ctrl-C (try: curl -s http://127.0.0.1:15090/metrics | grep kuberpc_)"
            )
            while True:
                time.sleep(3600)  # the user ends this with Ctrl-C; teardown runs in `finally`
        return 1 if problems else 0
    finally:
        procs.stop_all()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM takes the same way out as Ctrl-C, so `finally` blocks stop every child either way.
    raise KeyboardInterrupt


@contextmanager
def _workdir(keep: bool) -> Iterator[Path]:
    with ExitStack() as stack:
        if keep:
            yield Path(tempfile.mkdtemp(prefix="kuberpc-demo-"))
        else:
            yield Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kuberpc-demo-")))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m e2e.demo", description="A kuberpc mesh on loopback, exercised."
    )
    parser.add_argument("--calls", type=int, default=1200, help="unary Add calls to make (default 1200)")
    parser.add_argument("--concurrency", type=int, default=8, help="calls in flight at once (default 8)")
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (certs, logs) afterwards"
    )
    parser.add_argument(
        "--hold", action="store_true", help="keep the mesh running after the summary until Ctrl-C"
    )
    args = parser.parse_args(argv)
    if args.calls < 1 or args.concurrency < 1:
        parser.error("--calls and --concurrency must be at least 1")
    signal.signal(signal.SIGTERM, _interrupt)
    # Also when started in the background by a shell, which would otherwise leave SIGINT ignored.
    signal.signal(signal.SIGINT, _interrupt)
    try:
        with _workdir(args.keep) as workdir:
            return run_demo(
                workdir, calls=args.calls, concurrency=args.concurrency, hold=args.hold, keep=args.keep
            )
    except DemoError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo: interrupted; every process stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
