"""`python -m bench.discovery`: the control plane's discovery at scale, on a real API server (etcd and
kube-apiserver from e2e/cluster), writing bench/results/discovery-latest.json.

1,000 Services (5 endpoints each, 5,000 in all) and 300 meshed Pods; the control plane as users run it
(`python -m webhook serve`); 200 simulated proxies (grpcio clients with mesh certificates from a test CA, each
subscribed to 5-20 Services). Measures the watches the API server holds (with 0 and 200 subscribers), the control
plane's CPU and RSS, RSS per subscriber, the time from an EndpointSlice write to every subscriber of that Service
having it, and the control plane's CPU per change at 1,000 and then 5,000 Services. Bounded in counts and time;
needs root (network namespaces) like tests/cluster. Run it under `flock /tmp/kuberpc-heavy.lock`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from prometheus_client.parser import text_string_to_metric_families

from bench.procs import stop
from bench.procstat import cpu_seconds, rss_kib
from e2e.cluster.control_plane import ControlPlane
from proto import discovery_pb2 as pb
from proto import discovery_pb2_grpc
from sidecar.pki import KeyPair, create_ca, issue_serving, issue_workload
from sidecar.spiffe import SpiffeId

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "discovery-latest.json"
TD = "cluster.local"
SERVER_NAME = "kuberpc-webhook.kuberpc-system.svc"
NAMESPACES = 10
WATCHED = ("services", "endpointslices", "pods", "namespaces")
CONFIG = """\
image: ghcr.io/kuberpc/proxy:0.1.0
trustDomain: cluster.local
controlPlaneNamespace: kuberpc-system
logLevel: warning
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ns_of(i: int) -> str:
    return f"bench-{i % NAMESPACES}"


def address(i: int, j: int) -> str:
    return f"10.{i // 250}.{i % 250}.{j + 1}"


def service(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": f"svc-{i}",
            "namespace": ns_of(i),
            "annotations": {"kuberpc.io/grpc-services": f"bench.Svc{i}", "kuberpc.io/timeout": "2s"},
        },
        # No selector: the EndpointSlice controller leaves these Services' slices to us. Headless: the test
        # control plane's Service range (a /24) holds far fewer ClusterIPs than the benchmark has Services.
        "spec": {"clusterIP": "None", "ports": [{"name": "grpc", "port": 50051, "protocol": "TCP"}]},
    }


def endpoint_slice(i: int, per_service: int, marker: str | None = None) -> dict[str, Any]:
    eps = []
    for j in range(per_service):
        ep: dict[str, Any] = {"addresses": [address(i, j)], "conditions": {"ready": True}, "zone": f"zone-{j % 3}"}
        if j == 0 and i < 300:
            ep["targetRef"] = {"kind": "Pod", "name": f"pod-{i}", "namespace": ns_of(i)}
        eps.append(ep)
    if marker is not None:
        eps[-1]["addresses"] = [marker]
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"svc-{i}-a",
            "namespace": ns_of(i),
            "labels": {"kubernetes.io/service-name": f"svc-{i}", "endpointslice.kubernetes.io/managed-by": "bench"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "grpc", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps,
    }


def meshed_pod(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"pod-{i}",
            "namespace": ns_of(i),
            "labels": {"kuberpc.io/injected": "true", "app": f"svc-{i}"},
            "annotations": {"kuberpc.io/weight": str(50 + i % 100)},
        },
        # Never scheduled (the benchmark runs no node): the catalog only needs the object.
        "spec": {"containers": [{"name": "app", "image": "example.invalid/app"}]},
    }


class Api:
    """Writes to the API server as the admin, with bounded concurrency; reads its /metrics."""

    def __init__(self, cp: ControlPlane, session: aiohttp.ClientSession) -> None:
        self.base = f"https://127.0.0.1:{cp.forwarder.port}"
        self.session = session
        self.ssl = cp.ssl_context()
        self.limit = asyncio.Semaphore(16)

    async def request(self, method: str, path: str, body: Any = None, ctype: str = "application/json") -> Any:
        async with self.limit:
            for attempt in range(5):
                async with self.session.request(
                    method, self.base + path, data=None if body is None else json.dumps(body),
                    headers={"Content-Type": ctype}, ssl=self.ssl, timeout=aiohttp.ClientTimeout(total=60),
                ) as resp:  # fmt: skip
                    text = await resp.text()
                    if resp.status < 300 or (resp.status == 409 and method == "POST"):
                        return json.loads(text) if text.startswith("{") else text
                    if resp.status >= 500 or resp.status == 429:
                        await asyncio.sleep(0.2 * (attempt + 1))
                        continue
                    raise RuntimeError(f"{method} {path}: HTTP {resp.status}: {text[:300]}")
            raise RuntimeError(f"{method} {path}: the API server kept failing")

    async def exists(self, path: str) -> bool:
        async with self.session.get(self.base + path, ssl=self.ssl, timeout=aiohttp.ClientTimeout(total=10)) as resp:
            return resp.status == 200

    async def create(self, obj: dict[str, Any]) -> None:
        ns = obj["metadata"].get("namespace")
        group = "/api/v1" if obj["apiVersion"] == "v1" else f"/apis/{obj['apiVersion']}"
        plural = {"Service": "services", "EndpointSlice": "endpointslices", "Pod": "pods", "Namespace": "namespaces"}[obj["kind"]]
        await self.request("POST", f"{group}/namespaces/{ns}/{plural}" if ns else f"{group}/{plural}", obj)

    async def set_slice(self, i: int, per_service: int, marker: str) -> None:
        body = endpoint_slice(i, per_service, marker)
        path = f"/apis/discovery.k8s.io/v1/namespaces/{ns_of(i)}/endpointslices/svc-{i}-a"
        await self.request("PATCH", path, {"endpoints": body["endpoints"]}, "application/merge-patch+json")

    async def watches(self) -> dict[str, float]:
        """Watches the API server holds open on the kinds the control plane watches, by resource
        (apiserver_longrunning_requests{verb="WATCH"}; also apiserver_registered_watchers, where it exists)."""
        text = await self.request("GET", "/metrics")
        out: dict[str, float] = dict.fromkeys(WATCHED, 0.0)
        kinds = {"Service": "services", "EndpointSlice": "endpointslices", "Pod": "pods", "Namespace": "namespaces"}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if family.name == "apiserver_longrunning_requests":
                    if s.labels.get("verb") == "WATCH" and s.labels.get("resource") in out:
                        out[s.labels["resource"]] += s.value
                elif family.name == "apiserver_registered_watchers" and s.labels.get("kind") in kinds:
                    key = "registered_" + kinds[s.labels["kind"]]
                    out[key] = out.get(key, 0.0) + s.value
        return out


async def make_namespaces(api: Api) -> None:
    """The bench's namespaces, each with its default ServiceAccount (Pods are refused until the controller
    manager has made it)."""
    await asyncio.gather(*(api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": f"bench-{k}"}}) for k in range(NAMESPACES)))
    for k in range(NAMESPACES):
        await wait_for(f"the default ServiceAccount of bench-{k}", partial(api.exists, f"/api/v1/namespaces/bench-{k}/serviceaccounts/default"), 60)


async def populate(api: Api, first: int, last: int, per_service: int, pods: int) -> float:
    started = time.monotonic()
    objs: list[dict[str, Any]] = []
    for i in range(first, last):
        objs += [service(i), endpoint_slice(i, per_service)]
        if i < pods:
            objs.append(meshed_pod(i))
    await asyncio.gather(*(api.create(o) for o in objs))
    return time.monotonic() - started


@dataclass
class Subscriber:
    n: int
    services: list[int]
    seen: dict[str, float] = field(default_factory=dict)  # marker address -> when first seen
    have: set[str] = field(default_factory=set)  # Services it has received endpoints of
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)


async def subscribe(sub: Subscriber, port: int, creds: grpc.ChannelCredentials, stop: asyncio.Event) -> None:
    opts = [("grpc.ssl_target_name_override", SERVER_NAME)]
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=opts) as ch:
        call = discovery_pb2_grpc.DiscoveryStub(ch).Watch()
        refs = [pb.ServiceRef(namespace=ns_of(i), name=f"svc-{i}") for i in sub.services]
        await call.write(pb.WatchRequest(subscribe=refs))
        reader = asyncio.ensure_future(_read(sub, call))
        await stop.wait()
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await reader


async def _read(sub: Subscriber, call: Any) -> None:
    while (response := await call.read()) is not grpc.aio.EOF:
        now = time.monotonic()
        for update in response.services:
            if update.endpoints:
                sub.have.add(f"{update.service.namespace}/{update.service.name}")
            for e in update.endpoints:
                if e.address.startswith("10.254.") and e.address not in sub.seen:
                    sub.seen[e.address] = now
        if len(sub.have) >= len(sub.services):
            sub.ready.set()
        sub.changed.set()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@dataclass
class ControlPlaneProcess:
    proc: subprocess.Popen[bytes]
    discovery_port: int

    def cpu(self) -> float:
        return cpu_seconds([self.proc.pid])

    def rss_mib(self) -> float:
        return rss_kib(self.proc.pid) / 1024


@contextlib.contextmanager
def control_plane_process(work: Path, kubeconfig: Path, ca: KeyPair) -> Any:
    (work / "config.yaml").write_text(CONFIG)
    (work / "ca.pem").write_bytes(ca.cert_pem)
    (work / "ca-key.pem").write_bytes(ca.key_pem)
    serving = issue_serving(ca, [SERVER_NAME], now=dt.datetime.now(dt.UTC))
    (work / "tls.crt").write_bytes(serving.cert_pem)
    (work / "tls.key").write_bytes(serving.key_pem)
    port = free_port()
    argv = [
        sys.executable, "-m", "webhook", "serve", "--config", str(work / "config.yaml"),
        "--tls-cert", str(work / "tls.crt"), "--tls-key", str(work / "tls.key"), "--host", "127.0.0.1",
        "--port", str(free_port()), "--identity-port", str(free_port()), "--discovery-port", str(port),
        "--trust-anchors", str(work / "ca.pem"), "--identity-ca-key", str(work / "ca-key.pem"),
        "--identity-ca-cert", str(work / "ca.pem"), "--shutdown-delay", "0",
    ]  # fmt: skip
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "POD_NAMESPACE": "kuberpc-system", "PYTHONPATH": str(REPO)}
    with (work / "controlplane.log").open("wb") as log:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield ControlPlaneProcess(proc, port)
    finally:
        stop(proc, grace_s=15)


async def wait_for(what: str, check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:.0f} s")
        await asyncio.sleep(0.5)


async def probe(port: int, creds: grpc.ChannelCredentials, i: int, timeout: float) -> None:
    """Wait until the control plane answers a subscription to Service i with its endpoints (it may be starting,
    or its watch catching up with objects just written)."""
    deadline = time.monotonic() + timeout
    opts = [("grpc.ssl_target_name_override", SERVER_NAME)]
    while True:
        try:
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=opts) as ch:
                call = discovery_pb2_grpc.DiscoveryStub(ch).Watch()
                await call.write(pb.WatchRequest(subscribe=[pb.ServiceRef(namespace=ns_of(i), name=f"svc-{i}")]))
                async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                    while (response := await call.read()) is not grpc.aio.EOF:
                        if any(u.endpoints for u in response.services):
                            call.cancel()
                            return
        except grpc.aio.AioRpcError:
            pass
        except TimeoutError:
            raise RuntimeError(f"the control plane did not serve svc-{i} within {timeout:.0f} s") from None
        if time.monotonic() > deadline:
            raise RuntimeError(f"the control plane did not serve svc-{i} within {timeout:.0f} s")
        await asyncio.sleep(0.5)


async def change_phase(
    api: Api, cpp: ControlPlaneProcess, subs: list[Subscriber], *, changes: int, gap: float, per_service: int,
    first_marker: int, rng: random.Random,
) -> dict[str, Any]:
    """`changes` EndpointSlice writes, one at a time, each to a Service some subscribers have: how long until every
    one of them has it, and the control plane's CPU per change (its idle rate subtracted)."""
    by_service: dict[int, list[Subscriber]] = {}
    for s in subs:
        for i in s.services:
            by_service.setdefault(i, []).append(s)
    targets = sorted(by_service)
    idle_cpu0, idle_t0 = cpu_seconds([cpp.proc.pid]), time.monotonic()
    await asyncio.sleep(5.0)
    idle_rate = (cpu_seconds([cpp.proc.pid]) - idle_cpu0) / (time.monotonic() - idle_t0)
    all_have: list[float] = []
    each: list[float] = []
    missed = 0
    cpu0, t0 = cpp.cpu(), time.monotonic()
    for k in range(changes):
        i = rng.choice(targets)
        n = first_marker + k
        marker = f"10.254.{n // 250}.{n % 250 + 1}"
        waiting = by_service[i]
        started = time.monotonic()
        await api.set_slice(i, per_service, marker)
        arrived = waiting[0].changed  # shared by every subscriber: set on each response any of them reads
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10.0):
                while not all(marker in s.seen for s in waiting):
                    arrived.clear()
                    await arrived.wait()
        got = [s.seen[marker] - started for s in waiting if marker in s.seen]
        missed += len(waiting) - len(got)
        each += got
        if len(got) == len(waiting):
            all_have.append(max(got))
        await asyncio.sleep(gap)
    elapsed = time.monotonic() - t0
    cpu = cpp.cpu() - cpu0
    return {
        "changes": changes,
        "deliveries": len(each),
        "missed_deliveries": missed,
        "propagation_all_p50_s": round(percentile(all_have, 0.5), 4) if all_have else None,
        "propagation_all_p99_s": round(percentile(all_have, 0.99), 4) if all_have else None,
        "propagation_each_p50_s": round(percentile(each, 0.5), 4) if each else None,
        "propagation_each_p99_s": round(percentile(each, 0.99), 4) if each else None,
        "controlplane_idle_cpu_cores": round(idle_rate, 4),
        "controlplane_cpu_per_change_ms": round(1000 * max(0.0, cpu - idle_rate * elapsed) / changes, 3),
    }


async def bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    rng = random.Random(args.seed)
    ca_pair = create_ca(trust_domain=TD)
    key_pem, cert_pem = ca_pair.key_pem, ca_pair.cert_pem
    ca = KeyPair(cert_pem, key_pem)
    result: dict[str, Any] = {"command": " ".join(["python -m bench.discovery", *sys.argv[1:]])}
    with ControlPlane(work / "k8s") as cp:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as session:
            api = Api(cp, session)
            await make_namespaces(api)
            result["populate_s"] = round(await populate(api, 0, args.services, args.per_service, args.pods), 1)
            before = await api.watches()
            with control_plane_process(work, cp.kubeconfig, ca) as cpp:
                probe_creds = credentials(ca, "bench-0", "probe")
                await probe(cpp.discovery_port, probe_creds, args.services - 1, 120)
                await asyncio.sleep(2.0)
                with_cp = await api.watches()
                rss0 = cpp.rss_mib()
                arrived = asyncio.Event()
                subs = [
                    Subscriber(n, rng.sample(range(args.services), rng.randint(5, 20)), changed=arrived)
                    for n in range(args.subscribers)
                ]
                stop = asyncio.Event()
                creds = [credentials(ca, ns_of(n), f"sub-{n}") for n in range(args.subscribers)]
                cpu_before_subs = cpp.cpu()
                started = time.monotonic()
                tasks = [asyncio.ensure_future(subscribe(s, cpp.discovery_port, c, stop)) for s, c in zip(subs, creds, strict=True)]
                try:
                    async with asyncio.timeout(120):
                        await asyncio.gather(*(s.ready.wait() for s in subs))
                    result["all_snapshots_s"] = round(time.monotonic() - started, 2)
                    result["controlplane_cpu_for_snapshots_s"] = round(cpp.cpu() - cpu_before_subs, 2)
                    await asyncio.sleep(2.0)
                    with_subs = await api.watches()
                    rss200 = cpp.rss_mib()
                    small = await change_phase(api, cpp, subs, changes=args.changes, gap=args.gap,
                                               per_service=args.per_service, first_marker=0, rng=rng)
                    result.update(
                        subscribers=args.subscribers,
                        subscriptions=sum(len(s.services) for s in subs),
                        services=args.services,
                        endpoints=args.services * args.per_service,
                        meshed_pods=args.pods,
                        apiserver_watches_before_controlplane=before,
                        apiserver_watches_controlplane_0_subscribers=diff(with_cp, before),
                        apiserver_watches_controlplane_200_subscribers=diff(with_subs, before),
                        apiserver_watches=held(diff(with_subs, before)),
                        controlplane_rss_mib_0_subscribers=round(rss0, 1),
                        controlplane_rss_mib=round(rss200, 1),
                        rss_per_subscriber_kib=round((rss200 - rss0) * 1024 / args.subscribers, 1),
                        propagation_p50_s=small["propagation_all_p50_s"],
                        propagation_p99_s=small["propagation_all_p99_s"],
                        at_services={str(args.services): small},
                    )
                    if args.large > args.services:
                        result["populate_large_s"] = round(await populate(api, args.services, args.large, args.per_service, 0), 1)
                        await probe(cpp.discovery_port, probe_creds, args.large - 1, 300)
                        await asyncio.sleep(2.0)
                        result["apiserver_watches_at_large"] = held(diff(await api.watches(), before))
                        result["controlplane_rss_mib_at_large"] = round(cpp.rss_mib(), 1)
                        large = await change_phase(api, cpp, subs, changes=args.changes, gap=args.gap,
                                                   per_service=args.per_service, first_marker=args.changes, rng=rng)
                        result["at_services"][str(args.large)] = large
                finally:
                    stop.set()
                    await asyncio.gather(*tasks, return_exceptions=True)
    return result


def held(watches: dict[str, float]) -> float:
    """Watches open on the kinds the control plane watches (apiserver_longrunning_requests)."""
    return sum(v for k, v in watches.items() if k in WATCHED)


def diff(now: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: now[k] - before.get(k, 0.0) for k in now}


def credentials(ca: KeyPair, ns: str, sa: str) -> grpc.ChannelCredentials:
    issued = issue_workload(KeyPair(ca.cert_pem, ca.key_pem), identity=SpiffeId(TD, ns, sa))
    key, chain = issued.key_pem, issued.cert_pem
    return grpc.ssl_channel_credentials(root_certificates=ca.cert_pem, private_key=key, certificate_chain=chain)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.discovery", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--services", type=int, default=1000)
    p.add_argument("--per-service", type=int, default=5, help="endpoints per Service (default 5)")
    p.add_argument("--pods", type=int, default=300, help="meshed Pods (default 300)")
    p.add_argument("--subscribers", type=int, default=200)
    p.add_argument("--changes", type=int, default=100, help="EndpointSlice writes per phase (default 100)")
    p.add_argument("--gap", type=float, default=0.1, help="seconds between writes (default 0.1)")
    p.add_argument("--large", type=int, default=5000, help="then grow to this many Services and measure again (0: skip)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--deadline", type=float, default=1500, help="give up after this many seconds (default 1500)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.discovery needs root (the API server runs in its own network namespace)", file=sys.stderr)
        return 2
    result = run_bounded(partial(bench, args), "kuberpc-bench-discovery-", args.deadline, ["controlplane.log"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


def run_bounded(
    bench: Callable[[Path], Awaitable[dict[str, Any]]], prefix: str, deadline: float, logs: list[str]
) -> dict[str, Any]:
    """`bench(work)` in a fresh temporary directory, given up after `deadline` seconds; whether it finished or
    not, the tail of each log in `logs` (globs under the directory) is printed to stderr."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:

        async def bounded() -> dict[str, Any]:
            async with asyncio.timeout(deadline):
                return await bench(Path(tmp))

        try:
            return asyncio.run(bounded())
        finally:
            for log in sorted(f for pattern in logs for f in Path(tmp).glob(pattern)):
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
                print(f"--- {log.relative_to(tmp)} (tail)\n{tail}", file=sys.stderr)

if __name__ == "__main__":
    sys.exit(main())
