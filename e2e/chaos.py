"""Chaos scenarios: three Arith replicas (weights 1:2:3) and a client, each a pod namespace with its proxy, under
bounded gRPC load while one part fails; what each failure cost, as figures (calls, failures, p99, recovery).

Drives the proxy only through its CLI, environment and network contract; shared by tests/chaos (pass/fail)
and bench/chaos.py (figures). Must not change the root namespace nor import the proxy's internals.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from e2e import netns

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
PREFIX = "k11-"  # namespaces of this suite: `k11-<pod>-<pid>-<hex>`, apart from the e2e suite's
SUBNET = "203.0.113.0/24"  # TEST-NET-3: never routed anywhere, and the pods get no default route anyway
REPLICAS: Mapping[str, tuple[str, int]] = {
    "arith-1": ("203.0.113.11", 1),
    "arith-2": ("203.0.113.12", 2),
    "arith-3": ("203.0.113.13", 3),
}
CLIENT, CLIENT_IP = "client", "203.0.113.20"
NAMESPACE, SERVICE, SERVICE_PORT = "default", "arith", 50051
APP_PORT, INBOUND_PORT, DELAYED_PORT, ADMIN_PORT, UPSTREAM_PORT = 50051, 15443, 15444, 15090, 9001

CALLERS = 8  # concurrent callers in the client pod (2 of them server-streaming)
STREAMERS = 2
DEADLINE_S = 2.0  # every call's gRPC deadline
START_TIMEOUT = 30.0  # seconds for a process to say it is ready (a busy 2-core machine)
RECOVERY_WINDOW_S = 0.5  # throughput is compared over windows this long
DURING_S = 3.0  # "during the event": calls started within this long after the fault
# What a replica's proxy answers when its app's connection is lost with the call on it: the request had reached
# the app (which may have acted on it), so only a retry policy may send it again.
APP_LOST = f"upstream 127.0.0.1:{APP_PORT} failed"


@dataclass(frozen=True)
class Call:
    start: float
    end: float
    code: str
    retryable: bool  # the app had not started answering: a proxy could have retried it
    replica: str
    details: str = ""  # a failed call's status message

    @property
    def reached_app(self) -> bool:
        """Failed after its request reached an app (the replica's proxy lost the app mid-call)."""
        return APP_LOST in self.details


@dataclass
class Outcome:
    """One scenario's calls around one fault (or none), and the figures the issue asks for."""

    scenario: str
    calls: list[Call]
    fault_at: float
    retry: bool = True  # the Service had the scenario's retry policy (`kuberpc.io/retry: unavailable`)

    @property
    def failed(self) -> list[Call]:
        return [c for c in self.calls if c.code != "OK"]

    @property
    def failed_retryable(self) -> list[Call]:
        """Failed calls the mesh was allowed to send again: with the retry policy, those whose answer had not
        started; without it, those whose request never reached an app (always safe to place elsewhere)."""
        if self.retry:
            return [c for c in self.failed if c.retryable]
        return [c for c in self.failed if not c.reached_app]

    def share(self, replica: str) -> float:
        ok = [c for c in self.calls if c.code == "OK"]
        return sum(1 for c in ok if c.replica == replica) / max(1, len(ok))

    def p99_during_ms(self) -> float:
        during = sorted(c.end - c.start for c in self.calls if self.fault_at <= c.start < self.fault_at + DURING_S)
        if not during:
            return 0.0
        return 1000 * during[min(len(during) - 1, math.ceil(0.99 * len(during)) - 1)]

    def recovery_s(self) -> float | None:
        """From the fault to the first window whose completed calls reach 90 % of the pace before it."""
        first = min(c.start for c in self.calls)
        before = [c for c in self.calls if first + RECOVERY_WINDOW_S <= c.end < self.fault_at]
        span = self.fault_at - first - RECOVERY_WINDOW_S
        if span <= 0 or not before:
            return None
        pace = len(before) / span
        last = max(c.end for c in self.calls)
        t = self.fault_at
        while t + RECOVERY_WINDOW_S <= last:
            done = sum(1 for c in self.calls if t <= c.end < t + RECOVERY_WINDOW_S and c.code == "OK")
            if done >= 0.9 * pace * RECOVERY_WINDOW_S:
                return round(t - self.fault_at, 2)
            t += 0.1
        return None

    def figures(self) -> dict[str, object]:
        return {
            "scenario": self.scenario,
            "calls": len(self.calls),
            "failed_calls": len(self.failed),
            "retryable": len(self.failed_retryable),
            "p99_during_ms": round(self.p99_during_ms(), 1),
            "recovery_s": self.recovery_s(),
        }


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERPC_")}
    return {**env, **(extra or {})}


def _certs(*args: str) -> None:
    done = subprocess.run(
        [PYTHON, "-m", "sidecar", "certs", *args], cwd=REPO, env=child_env(), capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"sidecar certs {' '.join(args)} failed:\n{done.stderr}")


class ChaosMesh:
    """The pods, their apps and proxies, the endpoints file, and the faults. One per suite (module):
    `scenario()` gives each scenario a fresh client proxy (fresh balancer) and repairs what it broke."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.logs = work / "logs"
        self.cluster = netns.Cluster(subnet=SUBNET, prefix=PREFIX)
        self.endpoints_file = work / "endpoints.yaml"
        self.certs = {account: work / "certs" / account for account in ("arith", CLIENT)}
        self.apps: dict[str, netns.NetnsProcess] = {}
        self.proxies: dict[str, netns.NetnsProcess] = {}
        self.extra: list[netns.NetnsProcess] = []
        self.fail_ratio = 0.0
        self._starts = 0

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        netns.remove_leftovers(PREFIX)
        self.cluster.start()
        for name, (address, _) in REPLICAS.items():
            self.cluster.add_pod(name, address)
        self.cluster.add_pod(CLIENT, CLIENT_IP)
        self.issue_certs()
        self.write_endpoints()
        for name in REPLICAS:
            self.start_app(name)
            self.start_proxy(name)
        self.wait_ready(list(REPLICAS))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            netns.stop([*self.extra, *self.proxies.values(), *self.apps.values()], timeout=3)
        self.cluster.close()

    def issue_certs(self) -> None:
        """A CA (once) and a fresh certificate for each service account, written atomically in place."""
        ca = self.work / "certs" / "ca"
        if not (ca / "ca.pem").exists():
            _certs("ca", "--dir", str(ca))
        for account, out in self.certs.items():
            _certs("issue", "--ca-dir", str(ca), "--namespace", NAMESPACE, "--service-account", account, "--out", str(out))

    def write_endpoints(self, *, lb: str = "weighted-round-robin", retry: bool = False, delayed: str = "") -> None:
        """Service arith.default over the three replicas; `delayed` is reached through its delaying forwarder."""
        annotations = {"kuberpc.io/grpc-services": "arith.Arith", "kuberpc.io/lb": lb}
        if retry:
            annotations["kuberpc.io/retry"] = "unavailable"
        doc = {
            "services": [
                {
                    "name": SERVICE,
                    "namespace": NAMESPACE,
                    "ports": [SERVICE_PORT],
                    "selector": {"app": SERVICE},  # the replicas' proxies run with KUBERPC_POD_LABELS=app=arith
                    "annotations": annotations,
                    "endpoints": [
                        {
                            "address": address,
                            "port": DELAYED_PORT if name == delayed else INBOUND_PORT,
                            "weight": weight,
                            "tls": True,
                            "pod": name,
                        }
                        for name, (address, weight) in REPLICAS.items()
                    ],
                }
            ]
        }
        tmp = self.endpoints_file.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
        os.replace(tmp, self.endpoints_file)

    def _spawn(self, pod: str, argv: list[str], what: str, env: Mapping[str, str], pipe: bool = False) -> netns.NetnsProcess:
        self._starts += 1
        return netns.spawn(
            self.cluster.pods[pod].netns, argv, name=f"{pod}.{what}-{self._starts}", log_dir=self.logs,
            env=env, cwd=REPO, pipe_stdout=pipe,
        )  # fmt: skip

    def start_app(self, name: str) -> None:
        argv = [PYTHON, "-m", "e2e.chaos_app", "--port", str(APP_PORT), "--replica", name]
        argv += ["--fail-ratio", str(self.fail_ratio), "--seed", str(self._starts)]
        proc = self.apps[name] = self._spawn(name, argv, "app", child_env(), pipe=True)
        proc.wait_for_line("serving on", timeout=START_TIMEOUT)

    def start_proxy(self, name: str) -> None:
        pod = self.cluster.pods[name]
        account = CLIENT if name == CLIENT else "arith"
        d = self.certs[account]
        env = {
            "KUBERPC_DISCOVERY": f"file:{self.endpoints_file}",
            "KUBERPC_TLS_CERT": str(d / "cert.pem"),
            "KUBERPC_TLS_KEY": str(d / "key.pem"),
            "KUBERPC_TRUST_ANCHORS": str(d / "ca.pem"),
            "KUBERPC_DRAIN_SECONDS": "0.5",
            "KUBERPC_ADMIN_ADDR": f"0.0.0.0:{ADMIN_PORT}",
            "POD_NAMESPACE": NAMESPACE,
            "POD_NAME": name,
            "POD_IP": pod.address,
            "SERVICE_ACCOUNT": account,
        }
        if name == CLIENT:
            env["KUBERPC_INBOUND_ADDR"] = "off"
            env["KUBERPC_UPSTREAMS"] = f"{SERVICE}.{NAMESPACE}:{SERVICE_PORT}={UPSTREAM_PORT}"
        else:
            env["KUBERPC_INBOUND_ADDR"] = f"0.0.0.0:{INBOUND_PORT}"
            env["KUBERPC_APP_PORT"] = str(APP_PORT)
            env["KUBERPC_POD_LABELS"] = f"app={SERVICE}"  # selected by the Service, so inbound authorizes
        self.proxies[name] = self._spawn(name, [PYTHON, "-m", "sidecar", "run"], "proxy", child_env(env))

    def wait_ready(self, names: list[str]) -> None:
        """Until each proxy logged that it is ready (its stderr), bounded; a proxy that exits fails at once."""
        deadline = time.monotonic() + START_TIMEOUT
        for name in names:
            proc = self.proxies[name]
            while "ready after_ms" not in proc.stderr_path.read_text(errors="replace"):
                if not proc.alive():
                    raise RuntimeError(f"the proxy of {name} exited:\n{proc.stderr_path.read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the proxy of {name} was not ready within {START_TIMEOUT:.0f}s")
                time.sleep(0.05)  # polling a log file: the bounded loop above is the wait

    def reloaded(self) -> set[str]:
        """The running proxies that logged a certificate reload."""
        return {
            name
            for name, proc in self.proxies.items()
            if "certificate reloaded" in proc.stderr_path.read_text(errors="replace")
        }

    # -- faults ------------------------------------------------------------------------------------

    def kill_app(self, name: str) -> None:
        self.apps[name].kill()

    def kill_proxy(self, name: str) -> None:
        self.proxies[name].kill()

    def kill_pod(self, name: str) -> None:
        self.apps[name].kill()
        self.proxies[name].kill()

    def stop_proxy(self, name: str) -> None:
        os.kill(self.proxies[name].popen.pid, signal.SIGSTOP)

    def black_hole(self, name: str) -> None:
        """The pod's interface goes down: its packets are dropped, nobody answers, nothing is reset."""
        netns.ip("-n", self.cluster.pods[name].netns, "link", "set", netns.POD_IFACE, "down")

    def start_delay(self, name: str, delay_ms: int) -> None:
        argv = [PYTHON, "-m", "e2e.chaos_delay", str(DELAYED_PORT), str(INBOUND_PORT), str(delay_ms)]
        proc = self._spawn(name, argv, "delay", child_env(), pipe=True)
        self.extra.append(proc)
        proc.wait_for_line("forwarding on", timeout=START_TIMEOUT)

    def repair(self) -> None:
        """Every replica back to healthy: links up, stopped proxies continued, dead processes restarted."""
        restarted = []
        for name in REPLICAS:
            netns.ip("-n", self.cluster.pods[name].netns, "link", "set", netns.POD_IFACE, "up")
            proxy = self.proxies[name]
            if proxy.alive():
                os.kill(proxy.popen.pid, signal.SIGCONT)
            if not self.apps[name].alive():
                netns.stop([self.apps[name]], timeout=0)
                self.start_app(name)
            if not proxy.alive():
                netns.stop([proxy], timeout=0)
                self.start_proxy(name)
                restarted.append(name)
        netns.stop(self.extra, timeout=3)
        self.extra.clear()
        self.wait_ready(restarted)

    def set_fail_ratio(self, ratio: float) -> None:
        if ratio != self.fail_ratio:
            self.fail_ratio = ratio
            for name in REPLICAS:
                netns.stop([self.apps[name]], timeout=3)
                self.start_app(name)

    # -- one scenario ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def client(self) -> Iterator[None]:
        """A fresh client proxy for the block (fresh balancer state), stopped after it."""
        self.start_proxy(CLIENT)
        try:
            self.wait_ready([CLIENT])
            yield
        finally:
            netns.stop([self.proxies.pop(CLIENT)], timeout=3)

    def logged(self, name: str, text: str) -> bool:
        """Whether the running proxy of `name` logged `text` (its stderr)."""
        return text in self.proxies[name].stderr_path.read_text(errors="replace")

    def run(self, scenario: str, seconds: float, fault: Callable[[], None] = lambda: None, *, retry: bool = True) -> Outcome:
        """Load from the client pod for `seconds`; `fault` runs once the load is warm. Returns the calls
        (`retry`: whether the Service has the retry policy, for the Outcome's judgement)."""
        argv = [PYTHON, "-m", "e2e.chaos_load", f"127.0.0.1:{UPSTREAM_PORT}", "", str(CALLERS), str(STREAMERS)]
        argv += [str(seconds), str(DEADLINE_S)]
        load = self._spawn(CLIENT, argv, f"load-{scenario}", child_env(), pipe=True)
        try:
            load.wait_for_line("warm", timeout=START_TIMEOUT)
            fault_at = time.monotonic()
            fault()
            out, _ = load.popen.communicate(timeout=seconds + START_TIMEOUT)
        finally:
            netns.stop([load], timeout=3)
        if load.popen.returncode != 0:
            raise RuntimeError(f"the load failed ({load.popen.returncode}):\n{load.stderr_path.read_text()[-2000:]}")
        rows = json.loads(out.decode().strip().splitlines()[-1])
        return Outcome(scenario, [Call(*row) for row in rows], fault_at, retry=retry)


@dataclass(frozen=True)
class Scenario:
    """One row of the issue's list: how the Service is set up, what breaks, for how long the load runs."""

    name: str
    fault: Callable[[ChaosMesh], None]
    seconds: float = 5.5
    lb: str = "weighted-round-robin"
    retry: bool = True
    fail_ratio: float = 0.0
    delayed: str = ""
    notes: list[str] = field(default_factory=list)

    def run(self, mesh: ChaosMesh) -> Outcome:
        mesh.set_fail_ratio(self.fail_ratio)
        mesh.write_endpoints(lb=self.lb, retry=self.retry, delayed=self.delayed)
        if self.delayed:
            mesh.start_delay(self.delayed, 200)
        try:
            with mesh.client():
                return mesh.run(self.name, self.seconds, lambda: self.fault(mesh), retry=self.retry)
        finally:
            mesh.repair()


def _flap(mesh: ChaosMesh) -> None:
    """arith-3's proxy: down 2 s, up 2 s, down 2 s, then up for good (the repair)."""
    for cycle in range(2):
        mesh.kill_proxy("arith-3")
        time.sleep(2.0)  # the scenario's schedule: down for 2 s
        netns.stop([mesh.proxies["arith-3"]], timeout=0)
        mesh.start_proxy("arith-3")
        if cycle == 0:
            mesh.wait_ready(["arith-3"])
            time.sleep(2.0)  # up for 2 s


def _rotate(mesh: ChaosMesh) -> None:
    """New certificates for every proxy, written in place; returns once every proxy has reloaded its own,
    bounded, while the load goes on. Proxies poll the files every 10 s, and one that reads the new key
    before the new certificate is written retries at its next poll: up to two polls."""
    mesh.issue_certs()
    deadline = time.monotonic() + 25.0
    while mesh.reloaded() != set(mesh.proxies):
        if time.monotonic() > deadline:
            break  # the test says which proxies did not reload
        time.sleep(0.1)  # polling the proxies' logs: the bounded loop above is the wait


def _discovery_gone(mesh: ChaosMesh) -> None:
    """The endpoints file (the discovery source) is gone for DISCOVERY_GONE_S, then back unchanged."""
    hidden = mesh.endpoints_file.with_suffix(".hidden")
    os.replace(mesh.endpoints_file, hidden)
    time.sleep(DISCOVERY_GONE_S)  # the scenario's schedule: the source stays away this long
    os.replace(hidden, mesh.endpoints_file)


# The issue's figure: the source stays away 30 s (sixty reload polls of a missing file) under load.
DISCOVERY_GONE_S = 30.0

SCENARIOS: tuple[Scenario, ...] = (
    Scenario("kill-app", lambda m: m.kill_app("arith-2")),
    # No retry policy: a call the dead app never got is still placed elsewhere (refused unprocessed).
    Scenario("kill-app-no-retry", lambda m: m.kill_app("arith-2"), retry=False),
    Scenario("kill-proxy", lambda m: m.kill_proxy("arith-2")),
    Scenario("kill-app-and-proxy", lambda m: m.kill_pod("arith-2")),
    Scenario("black-hole", lambda m: m.black_hole("arith-2"), seconds=6.5),
    Scenario("sigstop-proxy", lambda m: m.stop_proxy("arith-2"), seconds=6.5),
    Scenario("delay-200ms-p2c", lambda m: None, lb="p2c-ewma", delayed="arith-3", seconds=4.5),
    Scenario("delay-200ms-wrr", lambda m: None, delayed="arith-3", seconds=4.5),
    Scenario("flapping", _flap, seconds=10.5),
    Scenario("cert-rotation", _rotate, seconds=15.0),
    Scenario("discovery-unreachable", _discovery_gone, seconds=DISCOVERY_GONE_S + 3.0),
    Scenario("unavailable-10pct-retry", lambda m: None, fail_ratio=0.1, seconds=4.5),
)
