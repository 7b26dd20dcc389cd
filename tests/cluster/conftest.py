"""A real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler built from the
k8s.io/kubernetes module) and the pod runner playing the kubelet, shared by every test of this package.

Outside CI a missing prerequisite (root, `ip`, etcd, Go) skips with the reason printed; in CI it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from e2e import netns
from e2e.cluster import control_plane as cpm

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
CONTROL_NS = "kuberpc-system"
RUNNER_READY = 30.0


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "the cluster tests need root (network namespaces, mounts)"
    if netns.find_ip() is None:
        return "iproute2's `ip` is not installed"
    if cpm.etcd_binary() is None:
        return "etcd is not installed (Debian: etcd-server; `make tools` installs it)"
    if shutil.which("go") is None and not any((Path.home() / ".cache/kuberpc/k8s").glob("*/bin/kube-apiserver")):
        return "Go is needed to build the Kubernetes binaries"
    return None


def tail(path: Path, lines: int = 40) -> str:
    return cpm.tail(path, lines)


@dataclass
class Kube:
    cp: cpm.ControlPlane
    runner: subprocess.Popen[bytes]
    state: Path

    def kubectl(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.cp.kubectl(*args, **kw)

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def where(self, namespace: str, pod: str) -> dict[str, str]:
        """The pod runner's record of a pod: its network namespace, address and directory."""
        out: dict[str, str] = json.loads((self.state / "where" / namespace / pod).read_text())
        return out

    def exec(self, namespace: str, pod: str, argv: list[str], *, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Like `kubectl exec`: a process in the pod's network namespace (with the repo's Python)."""
        ns = self.where(namespace, pod)["netns"]
        full_env = {"PATH": f"{Path(PYTHON).parent}:/usr/bin:/bin", "PYTHONPATH": str(REPO), **(env or {})}
        return netns.run(ns, argv, env=full_env, cwd=REPO, timeout=timeout)

    def spawn(self, namespace: str, pod: str, argv: list[str], name: str, log_dir: Path) -> netns.NetnsProcess:
        ns = self.where(namespace, pod)["netns"]
        env = {"PATH": f"{Path(PYTHON).parent}:/usr/bin:/bin", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        return netns.spawn(ns, argv, name=name, log_dir=log_dir, env=env, cwd=REPO, pipe_stdout=True)

    def pod_log(self, namespace: str, pod: str, container: str, *, lines: int | None = 60) -> str:
        """The container's log: its last `lines` lines, or all of it with None."""
        try:
            path = Path(self.where(namespace, pod)["dir"]) / "logs" / f"{container}.log"
            return path.read_text(errors="replace") if lines is None else tail(path, lines)
        except (OSError, KeyError):
            return ""

    def wait(self, what: str, check: Callable[[], Any], timeout: float = 90, interval: float = 0.25) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = check()
            except (RuntimeError, OSError, ValueError, KeyError) as e:
                last = e
            else:
                if last:
                    return last
            time.sleep(interval)
        raise AssertionError(f"{what}: not within {timeout:.0f}s (last: {last!r})\n{self.diagnose()}")

    def pods(self, namespace: str, selector: str | None = None) -> list[dict[str, Any]]:
        args = ["pods", "-n", namespace] + (["-l", selector] if selector else [])
        items: list[dict[str, Any]] = self.get(*args)["items"]
        return items

    def ready_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        return [p for p in self.pods(namespace, selector) if is_ready(p) and not p["metadata"].get("deletionTimestamp")]

    def diagnose(self) -> str:
        out = [f"--- runner\n{tail(self.state / 'runner.stderr', 30)}"]
        for name, proc in self.cp.procs.items():
            out.append(f"--- {name} alive={proc.alive()}\n{tail(proc.stderr_path, 8)}")
        return "\n".join(out)


def is_ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions") or [])


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    reason = _missing()
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but the cluster tests cannot run: {reason}", pytrace=False)
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("cluster")
    with cpm.ControlPlane(work) as cp:
        state = work / "runner"
        state.mkdir()
        kc = cp.pod_kubeconfig
        argv = [
            PYTHON, "-m", "e2e.cluster.kubelet", f"--kubeconfig={kc}", "--node=node-1",
            f"--node-netns={cp.net.node}", f"--subnet={cpm.SUBNET}", f"--run-id={cp.net.run_id}",
            f"--prefix={cpm.PREFIX}", f"--api={cpm.API_ADDRESS}:{cpm.API_PORT}", f"--state={state}",
        ]
        with (state / "runner.stderr").open("wb") as err:
            # nsenter, not `ip netns exec`: only the network namespace changes, so the pod namespaces the runner
            # adds are mounted where this process (and cleanup) can see them.
            runner = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{cp.net.node}", *argv], cwd=REPO, stdout=subprocess.PIPE, stderr=err,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
        k = Kube(cp, runner, state)
        try:
            k.wait("the node registered and Ready", lambda: "True" in k.kubectl(
                "get", "node", "node-1", "-o", "jsonpath={.status.conditions[?(@.type=='Ready')].status}", check=False).stdout,
                timeout=RUNNER_READY)
            k.wait("the default ServiceAccount", lambda: k.kubectl("get", "sa", "default", check=False).returncode == 0)
            yield k
        finally:
            runner.terminate()
            try:
                runner.wait(30)
            except subprocess.TimeoutExpired:
                runner.kill()
                runner.wait()
            # Pods the runner had no time to tear down: their namespaces carry this run's id.
            for name in netns.list_netns():
                if name.startswith(cpm.PREFIX) and name.endswith(f"-{cp.net.run_id}") and name not in (cp.net.node, cp.node.netns):
                    netns.delete_netns(name)
            # Memory-backed volumes (workload keys among them) of pods the runner had no time to tear down.
            for record in (state / "where").glob("*/*"):
                uid = json.loads(record.read_text())["uid"]
                for leftover in Path("/dev/shm").glob(f"kuberpc-{uid}-*"):
                    shutil.rmtree(leftover, ignore_errors=True)


@pytest.fixture(scope="session")
def mesh(kube: Kube) -> Kube:
    """kuberpc installed the way the README says: `python -m webhook install | kubectl apply -f -`."""
    rendered = subprocess.run(
        [PYTHON, "-m", "webhook", "install"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    kube.kubectl("apply", "-f", "-", input=rendered)
    kube.wait(
        "the control plane Deployment available",
        lambda: kube.get("deploy", "kuberpc-webhook", "-n", CONTROL_NS)["status"].get("availableReplicas", 0) >= 2,
        timeout=120,
    )
    # The API server calls the webhook at a ready endpoint of its Service: wait until the slice lists one.
    kube.wait(
        "the webhook Service has ready endpoints",
        lambda: any(
            (ep.get("conditions") or {}).get("ready")
            for s in kube.get("endpointslices", "-n", CONTROL_NS, "-l", "kubernetes.io/service-name=kuberpc-webhook")["items"]
            for ep in s.get("endpoints") or []
        ),
    )
    return kube


EXAMPLE = "mesh-example"
SERVER = "app.kubernetes.io/name=arith"
CLIENT = "app.kubernetes.io/name=arith-client"

# Runs in the client pod (like `kubectl exec`): unary Adds through the proxy's upstream port, and one line of
# JSON per finished batch with the replica (pod name) that answered each call or the status that failed it.
CALLER = r"""
import asyncio, json, sys, time
import grpc
from e2e.arith import client
from e2e.arith.stubs import arith_pb2

async def paced_stream(s, messages, gap):
    # A long bidirectional stream, one message every `gap` seconds: it must outlive pods coming and going.
    call = s.Accumulate(timeout=messages * gap + 10)
    total = 0
    for k in range(messages):
        await call.write(arith_pb2.Args(a=k, b=0))
        reply = await call.read()
        total += k
        if reply is grpc.aio.EOF or reply.c != total:
            return f"stream broke at {k}"
        await asyncio.sleep(gap)
    await call.done_writing()
    return "stream"

async def main(calls, seconds, stream_every, stop_file):
    import os
    outcomes = []
    deadline = time.monotonic() + seconds
    async with client.channel("127.0.0.1:9001", None) as ch:
        s = client.stub(ch)
        i = 0
        while i < calls and time.monotonic() < deadline and not (stop_file and os.path.exists(stop_file)):
            try:
                if stream_every and i % stream_every == 0:
                    outcomes.append(await paced_stream(s, 40, 0.05))
                else:
                    answer = await client.add(s, i, 1, deadline=5)
                    outcomes.append(answer.replica if answer.value == i + 1 else f"wrong sum {answer.value}")
            except grpc.aio.AioRpcError as e:
                outcomes.append(e.code().name)
                print(f"call {i}: {e.code().name}: {e.details()}", file=sys.stderr, flush=True)
            i += 1
    print(json.dumps(outcomes), flush=True)

print("calling", flush=True)
asyncio.run(main(int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else ""))
"""


def client_pod(kube: Kube) -> str:
    pods = kube.ready_pods(EXAMPLE, CLIENT)
    assert pods, "no ready client pod"
    return str(pods[0]["metadata"]["name"])


def call(kube: Kube, calls: int, *, seconds: float = 60, stream_every: int = 0) -> list[str]:
    done = kube.exec(EXAMPLE, client_pod(kube), [PYTHON, "-c", CALLER, str(calls), str(seconds), str(stream_every)],
                     timeout=seconds + 60)
    assert done.returncode == 0, done.stderr[-3000:]
    out: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


@pytest.fixture(scope="session")
def example(mesh: Kube) -> Iterator[Kube]:
    """`kubectl apply -k manifests/examples/arith -n <fresh namespace>` in a namespace enforcing Pod Security
    `restricted`, then every pod ready."""
    mesh.kubectl("create", "namespace", EXAMPLE)
    mesh.kubectl("label", "namespace", EXAMPLE, "pod-security.kubernetes.io/enforce=restricted")
    mesh.kubectl("apply", "-k", str(REPO / "manifests/examples/arith"), "-n", EXAMPLE)
    mesh.wait("three ready server pods", lambda: len(mesh.ready_pods(EXAMPLE, SERVER)) == 3, timeout=180)
    mesh.wait("a ready client pod", lambda: len(mesh.ready_pods(EXAMPLE, CLIENT)) == 1, timeout=120)
    yield mesh
