"""Fixtures for the netns e2e tests: pod namespaces on a bridge, mesh certificates, and a whole running mesh.

Drives the proxy only through its CLI, environment and network contract; outside CI it skips (never fails)
where root or `ip` is missing, and it leaves no namespace or process behind, whatever happens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Generator, Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from e2e import netns

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable  # .venv/bin/python when run as `.venv/bin/python -m pytest`

SUBNET = "198.51.100.0/24"  # TEST-NET-2: never routed anywhere, and the pods get no default route anyway
# pod name -> (pod IP, weight in the endpoints file)
REPLICAS: Mapping[str, tuple[str, int]] = MappingProxyType(
    {"arith-1": ("198.51.100.11", 1), "arith-2": ("198.51.100.12", 2), "arith-3": ("198.51.100.13", 3)}
)
CLIENT, CLIENT_IP = "client", "198.51.100.20"
NAMESPACE, SERVICE, SERVICE_PORT = "default", "arith", 50051
APP_PORT, INBOUND_PORT, OUTBOUND_PORT, ADMIN_PORT, UPSTREAM_PORT = 50051, 15443, 15001, 15090, 9001

START_TIMEOUT = 20.0  # seconds for every app and proxy to come up
STOP_TIMEOUT = 5.0  # seconds all processes get after SIGTERM, together, before SIGKILL
CALL_TIMEOUT = 30.0  # seconds one client run (at most a few hundred sequential calls) may take
LOG_TAIL = 40  # lines of each process's stderr shown with a failure

# Runs inside the client pod: sequential unary Adds through the local proxy, then one JSON list on stdout with,
# per call, the replica that answered or the gRPC status name. Kept as source text because it must run in
# another network namespace, hence in another process; it uses the example app's own client.
CLIENT_SCRIPT = """
import asyncio, json, sys
import grpc
from e2e.arith import client

async def main(target, authority, calls):
    outcomes = []
    async with client.channel(target, authority or None) as ch:
        s = client.stub(ch)
        for i in range(calls):
            try:
                answer = await client.add(s, i, 1)
            except grpc.aio.AioRpcError as e:
                outcomes.append(e.code().name)
                print(f"call {i}: {e.code().name}: {e.details()}", file=sys.stderr)
            else:
                outcomes.append(answer.replica if answer.value == i + 1 else f"wrong sum {answer.value}")
    print(json.dumps(outcomes))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""

# Runs inside the client pod, as Prometheus would from its own pod: GET each URL, one JSON {url: body}.
SCRAPE_SCRIPT = """
import json, sys, urllib.request
print(json.dumps({u: urllib.request.urlopen(u, timeout=5).read().decode() for u in sys.argv[1:]}))
"""

# Runs inside the client pod: the proxy's own `wait-ready` for each admin address, within one overall deadline.
READY_SCRIPT = """
import sys, time
from sidecar.__main__ import main
deadline = time.monotonic() + float(sys.argv[1])
for admin in sys.argv[2:]:
    left = max(0.1, deadline - time.monotonic())
    if main(["wait-ready", "--admin", admin, "--timeout", str(left)]) != 0:
        sys.exit(1)
"""

PROCESS_LOGS = pytest.StashKey[list[Path]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the tail of every mesh process's stderr (the non-empty ones) to a failed test's report."""
    report = yield
    if report.failed and PROCESS_LOGS in item.stash:
        for path in item.stash[PROCESS_LOGS]:
            if path.exists() and path.stat().st_size:
                report.sections.append((f"netns process {path.name}", tail(path)))
    return report


def tail(path: Path, lines: int = LOG_TAIL) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError as e:
        return f"(cannot read {path}: {e.strerror})"
    return "\n".join(text) or "(empty)"


unavailable_reason = netns.unavailable_reason


def skip_or_fail(reason: str) -> None:
    """Outside CI a missing prerequisite skips, with the reason printed; in CI these tests must run."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but the netns e2e tests cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    # The test runner's own KUBERPC_* settings must not leak into the pods' proxies.
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERPC_")}
    return {**env, **(extra or {})}


@pytest.fixture(scope="module")
def netns_usable() -> None:
    """Root and `ip` are here (else skip, or fail in CI), and earlier crashed runs' namespaces are gone."""
    reason = unavailable_reason()
    if reason is not None:
        skip_or_fail(reason)
    try:
        netns.remove_leftovers()
    except netns.NetnsError as e:
        skip_or_fail(f"cannot list or remove network namespaces: {e}")


@pytest.fixture(scope="module")
def cluster(netns_usable: None) -> Iterator[netns.Cluster]:
    """Namespaces kpod-arith-1..3 and kpod-client (suffixed with this run's id) on bridge kbr0 198.51.100.1/24."""
    c = netns.Cluster(subnet=SUBNET)
    try:
        c.start()
        for name, (address, _) in REPLICAS.items():
            c.add_pod(name, address)
        c.add_pod(CLIENT, CLIENT_IP)
    except netns.NetnsError as e:
        c.close()
        skip_or_fail(f"cannot build the pod namespaces: {e}")
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def mesh_certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A mesh CA and workload certificates for service accounts `arith` and `client`: account -> directory."""
    root = tmp_path_factory.mktemp("certs")

    def certs(*args: str) -> None:
        done = subprocess.run(
            [PYTHON, "-m", "sidecar", "certs", *args],
            cwd=REPO,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, f"sidecar certs {' '.join(args)} failed:\n{done.stderr}"

    certs("ca", "--dir", str(root / "ca"))
    for account in ("arith", CLIENT):
        identity = ("--namespace", NAMESPACE, "--service-account", account)
        certs("issue", "--ca-dir", str(root / "ca"), *identity, "--out", str(root / account))
    return {account: root / account for account in ("arith", CLIENT)}


class ArithApps:
    """The Arith server of each arith pod, on 127.0.0.1:50051 inside the pod.

    Shared by the tests of a module (they keep no state, and starting three gRPC servers costs seconds of
    CPU); one a test killed is started again by the next `ensure_running`.
    """

    def __init__(self, cluster: netns.Cluster, log_dir: Path) -> None:
        self.cluster = cluster
        self.log_dir = log_dir
        self.processes: dict[str, netns.NetnsProcess] = {}
        self._starts = 0

    def ensure_running(self, logs: list[Path]) -> None:
        """Start every replica's server that is not running; wait until each says it serves."""
        started = []
        for name in REPLICAS:
            if name in self.processes:
                if self.processes[name].alive():
                    continue
                netns.stop([self.processes[name]], timeout=0)  # reap it and close its pipe
            self._starts += 1
            server = [PYTHON, "-m", "e2e.arith.server"]
            argv = [*server, "--port", str(APP_PORT), "--replica", name, "--grace", "0.5"]
            self.processes[name] = proc = netns.spawn(
                self.cluster.pods[name].netns,
                argv,
                name=f"{name}.app-{self._starts}",
                log_dir=self.log_dir,
                env=child_env(),
                cwd=REPO,
                pipe_stdout=True,
            )
            started.append(proc)
        logs.extend(p.stderr_path for p in self.processes.values())
        deadline = time.monotonic() + START_TIMEOUT
        for proc in started:
            proc.wait_for_line("serving on", timeout=max(0.1, deadline - time.monotonic()))

    def stop(self) -> None:
        netns.stop(self.processes.values(), timeout=STOP_TIMEOUT)


class Mesh:
    """A proxy in each arith pod (before its Arith server) and in the client pod, and one endpoints file."""

    def __init__(
        self,
        cluster: netns.Cluster,
        certs: Mapping[str, Path],
        apps: ArithApps,
        workdir: Path,
        logs: list[Path],
    ) -> None:
        self.cluster = cluster
        self.certs = certs
        self.apps = apps
        self.workdir = workdir
        self.endpoints_file = workdir / "endpoints.yaml"
        self.proxies: dict[str, netns.NetnsProcess] = {}
        self._logs = logs  # shared with the report hook: filled as processes start
        self._runs = 0

    # -- discovery --------------------------------------------------------------------------------

    def write_endpoints(self, weights: Mapping[str, int]) -> None:
        """The Service arith.default with one meshed endpoint per replica named in `weights`.

        Written to a new file renamed over the old one, as a ConfigMap update does: readers never see half a file.
        """
        doc = {
            "services": [
                {
                    "name": SERVICE,
                    "namespace": NAMESPACE,
                    "ports": [SERVICE_PORT],
                    "annotations": {"kuberpc.io/grpc-services": "arith.Arith"},
                    "selector": {"app": SERVICE},  # the replicas' proxies run with KUBERPC_POD_LABELS=app=arith
                    "endpoints": [
                        {
                            "address": REPLICAS[name][0],
                            "port": INBOUND_PORT,
                            "weight": weight,
                            "tls": True,
                            "pod": name,
                        }
                        for name, weight in weights.items()
                    ],
                }
            ]
        }
        tmp = self.endpoints_file.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
        os.replace(tmp, self.endpoints_file)

    # -- processes --------------------------------------------------------------------------------

    def _proxy_env(self, pod: netns.Pod, account: str, **settings: str) -> dict[str, str]:
        d = self.certs[account]
        return child_env(
            {
                "KUBERPC_DISCOVERY": f"file:{self.endpoints_file}",
                "KUBERPC_TLS_CERT": str(d / "cert.pem"),
                "KUBERPC_TLS_KEY": str(d / "key.pem"),
                "KUBERPC_TRUST_ANCHORS": str(d / "ca.pem"),
                "KUBERPC_DRAIN_SECONDS": "1",  # teardown need not wait out the 10 s default
                "POD_NAMESPACE": NAMESPACE,
                "POD_NAME": pod.name,
                "POD_IP": pod.address,
                "SERVICE_ACCOUNT": account,
                **settings,
            }
        )

    def _spawn(
        self, pod: netns.Pod, argv: Sequence[str], name: str, env: Mapping[str, str], *, pipe: bool = False
    ) -> netns.NetnsProcess:
        proc = netns.spawn(
            pod.netns, argv, name=name, log_dir=self.workdir / "logs", env=env, cwd=REPO, pipe_stdout=pipe
        )
        self._logs.append(proc.stderr_path)
        return proc

    def start(self) -> None:
        self.apps.ensure_running(self._logs)
        self.write_endpoints({name: weight for name, (_, weight) in REPLICAS.items()})
        for name in REPLICAS:
            pod = self.cluster.pods[name]
            self.proxies[name] = self._spawn(
                pod,
                [PYTHON, "-m", "sidecar", "run"],
                f"{name}.proxy",
                self._proxy_env(
                    pod,
                    "arith",
                    KUBERPC_INBOUND_ADDR=f"0.0.0.0:{INBOUND_PORT}",
                    KUBERPC_APP_PORT=str(APP_PORT),
                    KUBERPC_ADMIN_ADDR=f"0.0.0.0:{ADMIN_PORT}",
                    KUBERPC_POD_LABELS=f"app={SERVICE}",
                ),
            )
        client = self.cluster.pods[CLIENT]
        self.proxies[CLIENT] = self._spawn(
            client,
            [PYTHON, "-m", "sidecar", "run"],
            f"{CLIENT}.proxy",
            self._proxy_env(
                client,
                CLIENT,
                KUBERPC_INBOUND_ADDR="off",
                KUBERPC_OUTBOUND_ADDR=f"127.0.0.1:{OUTBOUND_PORT}",
                KUBERPC_UPSTREAMS=f"{SERVICE}.{NAMESPACE}:{SERVICE_PORT}={UPSTREAM_PORT}",
                KUBERPC_ADMIN_ADDR=f"0.0.0.0:{ADMIN_PORT}",
            ),
        )
        self._wait_proxies_ready(time.monotonic() + START_TIMEOUT)

    def _wait_proxies_ready(self, deadline: float) -> None:
        """The proxy's own `wait-ready`, run from the client pod against every pod's admin address (one
        process for all: on a busy machine each Python start costs seconds); a proxy that exits fails at once."""
        admins = [f"{self.cluster.pods[name].address}:{ADMIN_PORT}" for name in self.proxies]
        left = max(1.0, deadline - time.monotonic())
        waiter = self._spawn(
            self.cluster.pods[CLIENT],
            [PYTHON, "-c", READY_SCRIPT, str(left), *admins],
            "wait-ready",
            child_env(),
        )
        try:
            while True:
                for name, proxy in self.proxies.items():
                    if not proxy.alive():
                        raise AssertionError(
                            f"the proxy of {name} exited with status {proxy.popen.returncode}"
                        )
                try:
                    status = waiter.popen.wait(timeout=0.05)  # the poll tick: returns as soon as it exits
                except subprocess.TimeoutExpired:
                    continue
                assert status == 0, f"the proxies did not all become ready:\n{tail(waiter.stderr_path)}"
                return
        finally:
            netns.stop([waiter], timeout=STOP_TIMEOUT)

    def kill_proxy(self, name: str) -> None:
        """SIGKILL one pod's proxy: to its peers, the pod's port 15443 now refuses connections."""
        self.proxies[name].kill()

    def kill_app(self, name: str) -> None:
        """SIGKILL one pod's Arith server: its proxy stays up, but nothing listens on the app port any more."""
        self.apps.processes[name].kill()

    def stop(self) -> None:
        # The client's proxy first, so the arith proxies' drains see their callers go away. The apps stay.
        netns.stop([self.proxies[n] for n in (CLIENT, *REPLICAS) if n in self.proxies], timeout=STOP_TIMEOUT)

    # -- what the client pod sees -----------------------------------------------------------------

    def _in_client(self, what: str, argv: Sequence[str]) -> str:
        done = netns.run(
            self.cluster.pods[CLIENT].netns, argv, env=child_env(), cwd=REPO, timeout=CALL_TIMEOUT
        )
        self._runs += 1
        if done.stderr:  # failed calls are described there: shown with the test's failure
            log = self.workdir / "logs" / f"{CLIENT}.{what}-{self._runs}.stderr"
            log.write_text(done.stderr)
            self._logs.append(log)
        assert done.returncode == 0, f"client pod: {what} failed ({done.returncode}):\n{done.stderr}"
        return done.stdout

    def call(
        self, calls: int, *, target: str = f"127.0.0.1:{UPSTREAM_PORT}", authority: str = ""
    ) -> list[str]:
        """`calls` sequential Add calls from the client pod; per call, the replica that answered or the status name."""
        outcomes = json.loads(
            self._in_client("call", [PYTHON, "-c", CLIENT_SCRIPT, target, authority, str(calls)])
        )
        assert isinstance(outcomes, list) and len(outcomes) == calls
        return [str(o) for o in outcomes]

    def requests_total(self, pod: str) -> dict[tuple[str, str, str, str], float]:
        """kuberpc_requests_total at `pod`'s admin address, scraped from the client pod:
        (direction, service, method, grpc_code) -> count."""
        url = f"http://{self.cluster.pods[pod].address}:{ADMIN_PORT}/metrics"
        body = json.loads(self._in_client("scrape", [PYTHON, "-c", SCRAPE_SCRIPT, url]))[url]
        counts: dict[tuple[str, str, str, str], float] = {}
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                if sample.name == "kuberpc_requests_total":
                    labels = sample.labels
                    key = (labels["direction"], labels["service"], labels["method"], labels["grpc_code"])
                    counts[key] = sample.value
        return counts


@pytest.fixture(scope="module")
def arith_apps(cluster: netns.Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ArithApps]:
    apps = ArithApps(cluster, tmp_path_factory.mktemp("apps"))
    try:
        yield apps
    finally:
        apps.stop()


@pytest.fixture
def mesh(
    cluster: netns.Cluster,
    mesh_certs: dict[str, Path],
    arith_apps: ArithApps,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[Mesh]:
    """Freshly started proxies per test (fresh balancers and counters), stopped afterwards."""
    logs: list[Path] = []
    request.node.stash[PROCESS_LOGS] = logs
    m = Mesh(cluster, mesh_certs, arith_apps, tmp_path, logs)
    try:
        m.start()
        yield m
    finally:
        m.stop()
