"""`python -m bench.proxy_churn`: what one proxy pays for churn elsewhere in the cluster, on a real API server (from
e2e/cluster), with control-plane discovery against the same proxy in direct mode as the "before".

1,000 Services (5 endpoints each) and 300 meshed Pods; the control plane as users run it (`python -m webhook
serve`); two real proxies (`python -m sidecar run`), each declaring one upstream (svc-0): one streams from the control
plane, one watches the API itself (direct mode). Then EndpointSlice writes to OTHER Services at `--rate` per second
for `--seconds`: each proxy's CPU (cores) idle and under that churn, its RSS, the Services it holds (its /debug),
and the time for a change of svc-0 itself to reach it. Writes bench/results/proxy-churn-latest.json. Bounded in
counts and time; needs root (network namespaces and a mount namespace); run it under `flock /tmp/kuberpc-heavy.lock`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp

from bench.discovery import (
    SERVER_NAME,
    TD,
    Api,
    control_plane_process,
    credentials,
    free_port,
    make_namespaces,
    ns_of,
    populate,
    probe,
    run_bounded,
)
from bench.procs import stop
from bench.procstat import cpu_seconds_ns, rss_kib
from e2e.cluster.control_plane import ControlPlane
from sidecar.pki import KeyPair, create_ca, issue_workload
from sidecar.spiffe import SpiffeId

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "proxy-churn-latest.json"
UPSTREAM = f"svc-0.{ns_of(0)}"


class PatientApi(Api):
    """bench.discovery's writer, retrying longer: on a loaded 2-core host the API server answers 429/5xx to
    bursts of creates for seconds at a time."""

    async def request(self, method: str, path: str, body: Any = None, ctype: str = "application/json") -> Any:
        for attempt in range(20):
            try:
                return await super().request(method, path, body, ctype)
            except (RuntimeError, aiohttp.ClientError, TimeoutError) as e:
                if "kept failing" not in str(e) and not isinstance(e, aiohttp.ClientError | TimeoutError):
                    raise
                await asyncio.sleep(min(2.0, 0.2 * (attempt + 1)))
        raise RuntimeError(f"{method} {path}: the API server kept failing for a minute")


@dataclass
class ProxyProcess:
    name: str
    proc: subprocess.Popen[bytes]
    admin: int
    debug: int

    def cpu(self) -> float:
        return cpu_seconds_ns(self.proc.pid)

    def rss_mib(self) -> float:
        return rss_kib(self.proc.pid) / 1024

    def get(self, port: int, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            body: bytes = resp.read()
            return body

    def ready(self) -> bool:
        try:
            return self.get(self.admin, "/ready").startswith(b"ready")
        except OSError:
            return False

    def debug_doc(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.get(self.debug, "/debug"))
        return out


@contextlib.contextmanager
def proxy_process(name: str, work: Path, ca: KeyPair, env: dict[str, str], *, hosts: Path | None) -> Iterator[ProxyProcess]:
    d = work / name
    d.mkdir()
    issued = issue_workload(ca, identity=SpiffeId(TD, ns_of(1), name))
    key, chain = issued.key_pem, issued.cert_pem
    (d / "key.pem").write_bytes(key)
    (d / "cert.pem").write_bytes(chain)
    (d / "ca.pem").write_bytes(ca.cert_pem)
    admin, debug = free_port(), free_port()
    full = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO),
        "KUBERPC_OUTBOUND_ADDR": f"127.0.0.1:{free_port()}", "KUBERPC_ADMIN_ADDR": f"127.0.0.1:{admin}",
        "KUBERPC_DEBUG_ADDR": f"127.0.0.1:{debug}", "KUBERPC_INBOUND_ADDR": "off",
        "KUBERPC_UPSTREAMS": f"{UPSTREAM}:50051={free_port()}", "KUBERPC_LOG_LEVEL": "warning",
        "KUBERPC_TLS_CERT": str(d / "cert.pem"), "KUBERPC_TLS_KEY": str(d / "key.pem"),
        "KUBERPC_TRUST_ANCHORS": str(d / "ca.pem"), "POD_NAMESPACE": ns_of(1), **env,
    }  # fmt: skip
    argv = [sys.executable, "-m", "sidecar", "run"]
    if hosts is not None:
        # The control plane's name resolves to it only for this process: a mount namespace of its own with its
        # own /etc/hosts, as a pod's would be.
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                f'mount --bind "{hosts}" /etc/hosts && exec "$@"', "sh", *argv]  # fmt: skip
    with (d / "proxy.log").open("wb") as log:
        proc = subprocess.Popen(argv, cwd=REPO, env=full, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield ProxyProcess(name, proc, admin, debug)
    finally:
        stop(proc, grace_s=15)


def python_pid(p: ProxyProcess) -> None:
    """With `unshare ... exec`, the pid stays the Python process's: nothing to do but make sure it is alive."""
    assert p.proc.poll() is None, f"{p.name} exited with {p.proc.returncode}"


async def wait_ready(p: ProxyProcess, timeout: float) -> float:
    started = time.monotonic()
    while not await asyncio.to_thread(p.ready):
        python_pid(p)
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"{p.name} not ready within {timeout:.0f} s")
        await asyncio.sleep(0.2)
    return time.monotonic() - started


async def cpu_over(proxies: list[ProxyProcess], seconds: float) -> dict[str, float]:
    before = {p.name: p.cpu() for p in proxies}
    t0 = time.monotonic()
    await asyncio.sleep(seconds)
    elapsed = time.monotonic() - t0
    return {p.name: round((p.cpu() - before[p.name]) / elapsed, 6) for p in proxies}


async def churn(api: Api, services: int, per_service: int, rate: float, seconds: float) -> int:
    """EndpointSlice writes to Services other than svc-0, at `rate` per second for `seconds`; how many were made."""
    n = 0
    t0 = time.monotonic()
    pending: set[asyncio.Task[None]] = set()
    while (elapsed := time.monotonic() - t0) < seconds:
        i = 1 + n % (services - 1)
        marker = f"10.253.{n // 250 % 250}.{n % 250 + 1}"
        task = asyncio.ensure_future(api.set_slice(i, per_service, marker))
        pending.add(task)
        task.add_done_callback(pending.discard)
        n += 1
        await asyncio.sleep(max(0.0, n / rate - elapsed))
    await asyncio.gather(*pending)
    return n


async def change_reaches(api: Api, p: ProxyProcess, per_service: int, marker: str, timeout: float = 10.0) -> float | None:
    started = time.monotonic()
    await api.set_slice(0, per_service, marker)
    while time.monotonic() - started < timeout:
        doc = await asyncio.to_thread(p.debug_doc)
        eps = (doc["routes"]["services"].get(UPSTREAM) or {}).get("endpoints") or []
        if any(e.get("address") == marker for e in eps):
            return round(time.monotonic() - started, 3)
        await asyncio.sleep(0.02)
    return None


async def bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    ca = create_ca(trust_domain=TD)
    result: dict[str, Any] = {
        "command": " ".join(["python -m bench.proxy_churn", *sys.argv[1:]]),
        "services": args.services, "endpoints": args.services * args.per_service, "meshed_pods": args.pods,
        "churn_writes_per_s": args.rate, "churn_seconds": args.seconds, "upstream": UPSTREAM,
    }  # fmt: skip
    with ControlPlane(work / "k8s") as cp:
        step("API server up")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as session:
            api = PatientApi(cp, session)
            await make_namespaces(api)
            result["populate_s"] = round(await populate(api, 0, args.services, args.per_service, args.pods), 1)
            step(f"populated in {result['populate_s']} s")
            with control_plane_process(work, cp.kubeconfig, ca) as cpp:
                await probe(cpp.discovery_port, credentials(ca, "bench-0", "probe"), args.services - 1, 180)
                step("control plane serving")
                hosts = work / "hosts"
                hosts.write_text(f"127.0.0.1 localhost {SERVER_NAME}\n")
                with (
                    proxy_process("controlplane", work, ca, {"KUBERPC_DISCOVERY": f"control-plane:{SERVER_NAME}:{cpp.discovery_port}"}, hosts=hosts) as cpx,
                    proxy_process("direct", work, ca, {"KUBERPC_DISCOVERY": "kubernetes", "KUBECONFIG": str(cp.kubeconfig)}, hosts=None) as direct,
                ):  # fmt: skip
                    proxies = [cpx, direct]
                    result["ready_s"] = {p.name: round(await wait_ready(p, 180), 2) for p in proxies}
                    step(f"proxies ready {result['ready_s']}")
                    await asyncio.sleep(3.0)  # the start's own work (imports, first lists) out of the idle window
                    result["idle_cpu_cores"] = await cpu_over(proxies, args.idle)
                    result["rss_mib_idle"] = {p.name: round(p.rss_mib(), 1) for p in proxies}
                    busy = asyncio.ensure_future(cpu_over(proxies, args.seconds))
                    writes = await churn(api, args.services, args.per_service, args.rate, args.seconds)
                    result["churn_cpu_cores"] = await busy
                    result["churn_writes"] = writes
                    result["rss_mib_after_churn"] = {p.name: round(p.rss_mib(), 1) for p in proxies}
                    for p in proxies:
                        python_pid(p)
                    docs = {p.name: await asyncio.to_thread(p.debug_doc) for p in proxies}
                    result["services_held"] = {name: len(d["routes"]["services"]) for name, d in docs.items()}
                    result["controlplane_services"] = sorted(docs["controlplane"]["routes"]["services"])
                    result["change_to_proxy_s"] = {
                        p.name: await change_reaches(api, p, args.per_service, f"10.252.0.{k + 1}") for k, p in enumerate(proxies)
                    }
    return result


def summary(r: dict[str, Any]) -> str:
    """The README's sentence for a result (tests/bench/test_proxy_churn_results.py checks it is quoted)."""
    cp, direct = "controlplane", "direct"
    return (
        f"With {r['churn_writes']} EndpointSlice writes to other Services over {r['churn_seconds']:g} s, the proxy "
        f"fed by the control plane used **{r['churn_cpu_cores'][cp] * 1e6:.0f} µs of CPU per second** "
        f"({r['idle_cpu_cores'][cp] * 1e6:.0f} idle), held {r['services_held'][cp]} Service and "
        f"{r['rss_mib_after_churn'][cp]:g} MiB, and saw a change of its own Service in "
        f"{r['change_to_proxy_s'][cp] * 1000:.0f} ms; the same proxy in direct mode used "
        f"**{r['churn_cpu_cores'][direct]:.2f} of a core**, held {r['services_held'][direct]} Services and "
        f"{r['rss_mib_after_churn'][direct]:g} MiB, and took {r['change_to_proxy_s'][direct] * 1000:.0f} ms."
    )


def step(what: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {what}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.proxy_churn", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--services", type=int, default=1000)
    p.add_argument("--per-service", type=int, default=5)
    p.add_argument("--pods", type=int, default=300)
    p.add_argument("--rate", type=float, default=20.0, help="EndpointSlice writes per second elsewhere (default 20)")
    p.add_argument("--seconds", type=float, default=30.0, help="churn window (default 30)")
    p.add_argument("--idle", type=float, default=10.0, help="idle window (default 10)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--deadline", type=float, default=900, help="give up after this many seconds (default 900)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.proxy_churn needs root (network and mount namespaces)", file=sys.stderr)
        return 2
    result = run_bounded(partial(bench, args), "kuberpc-bench-churn-", args.deadline, ["*/proxy.log", "controlplane.log"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(summary(result))
    return 0

if __name__ == "__main__":
    sys.exit(main())
