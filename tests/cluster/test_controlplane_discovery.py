"""Control-plane discovery (the default) on a real control plane: the example runs with no RBAC and no API token in
its pods; endpoint changes (added, removed, re-weighted, not ready, terminating) and Service policy changes move
real calls without restarting anything; the API server's death and a control-plane replica's death fail no call."""

from __future__ import annotations

import collections
import json
import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.conftest import CALLER, CLIENT, EXAMPLE, PYTHON, SERVER, Kube, call, client_pod
from tests.cluster.test_user_path import Traffic, failures

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

MANUAL = "arith-manual"  # a Service without a selector whose EndpointSlice the tests write

# Runs in the client pod: `count` Adds through the proxy's outbound port naming `authority`; one JSON line with
# the replica that answered each call or the status that failed it.
AUTHORITY_CALLER = r"""
import asyncio, json, sys
import grpc
from e2e.arith import client

async def main(authority, count):
    out = []
    async with client.channel("127.0.0.1:15001", authority) as ch:
        s = client.stub(ch)
        for i in range(count):
            try:
                answer = await client.add(s, i, 1, deadline=5)
                out.append(answer.replica)
            except grpc.aio.AioRpcError as e:
                out.append(e.code().name)
    print(json.dumps(out), flush=True)

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""

DEBUG = r"""
import json, urllib.request
print(json.dumps(json.loads(urllib.request.urlopen("http://127.0.0.1:15091/debug", timeout=5).read())))
"""

# Runs in a pod: polls its proxy's /debug every 20 ms until `service` lists `pod` with `weight`, then prints the
# wall-clock time it saw it (the host's clock: every pod shares it).
WEIGHT_WATCHER = r"""
import json, sys, time, urllib.request
service, pod, weight, limit = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
print("watching", flush=True)
deadline = time.monotonic() + limit
while time.monotonic() < deadline:
    try:
        d = json.loads(urllib.request.urlopen("http://127.0.0.1:15091/debug", timeout=2).read())
        eps = (d["routes"]["services"].get(service) or {}).get("endpoints") or []
        if any(str(e.get("pod", "")).rsplit("/", 1)[-1] == pod and e.get("weight") == weight for e in eps):
            print(json.dumps({"seen_at": time.time()}), flush=True)
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.02)
print(json.dumps({"seen_at": None}), flush=True)
"""


def calls_by(kube: Kube, authority: str, count: int = 30) -> collections.Counter[str]:
    done = kube.exec(EXAMPLE, client_pod(kube), [PYTHON, "-c", AUTHORITY_CALLER, authority, str(count)], timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return collections.Counter(json.loads(done.stdout.strip().splitlines()[-1]))


def until_calls(kube: Kube, authority: str, what: str, ok: Callable[[collections.Counter[str]], bool], timeout: float = 30) -> collections.Counter[str]:
    """Call in batches until the outcomes satisfy `ok` (the change has reached the client's proxy)."""
    deadline = time.monotonic() + timeout
    seen: collections.Counter[str] = collections.Counter()
    while time.monotonic() < deadline:
        seen = calls_by(kube, authority)
        if ok(seen):
            return seen
    raise AssertionError(f"{what}: calls went {dict(seen)} for {timeout:.0f}s")


def proxy_debug(kube: Kube, pod: str) -> dict[str, Any]:
    done = kube.exec(EXAMPLE, pod, [PYTHON, "-c", DEBUG], timeout=20)
    assert done.returncode == 0, done.stderr[-2000:]
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def service_json(annotations: dict[str, str] | None = None) -> str:
    return json.dumps({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": MANUAL, "namespace": EXAMPLE, "annotations": annotations or {}},
        "spec": {"ports": [{"name": "grpc", "port": 50051, "targetPort": 50051, "protocol": "TCP", "appProtocol": "grpc"}]},
    })  # fmt: skip


def slice_json(endpoints: list[tuple[dict[str, Any], dict[str, bool]]]) -> str:
    """(pod, conditions) pairs, each pod's IP with a targetRef to it: the control plane dials it at :15443."""
    return json.dumps({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": f"{MANUAL}-a", "namespace": EXAMPLE,
            "labels": {"kubernetes.io/service-name": MANUAL, "endpointslice.kubernetes.io/managed-by": "kuberpc-tests"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "grpc", "port": 50051, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": [pod["status"]["podIP"]],
                "conditions": conditions,
                "targetRef": {"kind": "Pod", "name": pod["metadata"]["name"], "namespace": EXAMPLE},
            }
            for pod, conditions in endpoints
        ],
    })  # fmt: skip


READY = {"ready": True, "serving": True, "terminating": False}
NOT_READY = {"ready": False, "serving": False, "terminating": False}
TERMINATING = {"ready": False, "serving": True, "terminating": True}


@pytest.fixture(scope="module")
def manual(example: Kube) -> Iterator[tuple[Kube, dict[str, Any], dict[str, Any]]]:
    """The Service `arith-manual` and two server pods A and B to list in its slice."""
    pods = sorted(example.ready_pods(EXAMPLE, SERVER), key=lambda p: p["metadata"]["name"])
    assert len(pods) >= 2
    example.kubectl("apply", "-f", "-", input=service_json())
    yield example, pods[0], pods[1]
    example.kubectl("delete", "service", MANUAL, "-n", EXAMPLE, "--ignore-not-found")
    example.kubectl("delete", "endpointslice", f"{MANUAL}-a", "-n", EXAMPLE, "--ignore-not-found")


# ---- no RBAC, no token -------------------------------------------------------------------------------------


def test_the_example_works_with_no_binding_and_no_api_token_in_its_pods(example: Kube) -> None:
    accounts = {"arith", "arith-client"}
    for kind in ("rolebindings", "clusterrolebindings"):
        for b in example.get(kind, "-A")["items"]:
            subjects = {(s.get("namespace", b["metadata"].get("namespace")), s["name"]) for s in b.get("subjects") or []
                        if s.get("kind") == "ServiceAccount"}  # fmt: skip
            assert not subjects & {(EXAMPLE, a) for a in accounts}, b["metadata"]["name"]
    pods = example.pods(EXAMPLE, SERVER) + example.pods(EXAMPLE, CLIENT)
    assert pods
    for pod in pods:  # read back from the API: what the pod really got
        spec = pod["spec"]
        assert spec.get("automountServiceAccountToken") is False or not any(
            v["name"].startswith("kube-api-access") for v in spec.get("volumes") or []
        )
        tokens = [
            src["serviceAccountToken"]
            for v in spec.get("volumes") or []
            for src in (v.get("projected") or {}).get("sources") or []
            if "serviceAccountToken" in src
        ]
        # One projected token, for the identity service only: the API server refuses its audience.
        assert [t.get("audience") for t in tokens] == ["kuberpc-identity"], (pod["metadata"]["name"], tokens)
        proxy = next(c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == "kuberpc-proxy")
        env = {e["name"]: e.get("value") for e in proxy["env"]}
        assert env["KUBERPC_DISCOVERY"] == "control-plane:kuberpc-webhook.kuberpc-system.svc:8082"
        assert not {m["mountPath"] for c in spec.get("initContainers", []) + spec["containers"]
                    for m in c.get("volumeMounts") or []} & {"/var/run/secrets/kubernetes.io/serviceaccount"}  # fmt: skip
    outcomes = call(example, 20)
    assert not failures(outcomes), collections.Counter(outcomes)


def test_a_meshed_apps_own_token_is_forbidden_to_list_pods(example: Kube) -> None:
    token = example.kubectl("create", "token", "arith", "-n", EXAMPLE).stdout.strip()
    assert token
    ctx = ssl.create_default_context(cafile=str(example.cp.pki.ca.cert))
    url = f"https://127.0.0.1:{example.cp.forwarder.port}/api/v1/namespaces/{EXAMPLE}/pods"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, context=ctx, timeout=10)
    assert e.value.code == 403, e.value.read()[:500]


# ---- endpoints move real calls -----------------------------------------------------------------------------


def test_added_removed_reweighted_not_ready_and_terminating_endpoints_move_real_calls(
    manual: tuple[Kube, dict[str, Any], dict[str, Any]],
) -> None:
    kube, a, b = manual
    name_a, name_b = a["metadata"]["name"], b["metadata"]["name"]
    only = lambda n: (lambda c: set(c) == {n})
    kube.kubectl("apply", "-f", "-", input=slice_json([(a, READY)]))
    until_calls(kube, MANUAL, "one endpoint", only(name_a))
    kube.kubectl("apply", "-f", "-", input=slice_json([(a, READY), (b, READY)]))
    until_calls(kube, MANUAL, "an endpoint added", lambda c: set(c) == {name_a, name_b})
    kube.kubectl("annotate", "pod", name_a, "-n", EXAMPLE, "kuberpc.io/weight=0", "--overwrite")
    try:
        until_calls(kube, MANUAL, "A re-weighted to 0", only(name_b))
    finally:
        kube.kubectl("annotate", "pod", name_a, "-n", EXAMPLE, "kuberpc.io/weight=100", "--overwrite")
    until_calls(kube, MANUAL, "A back to weight 100", lambda c: set(c) == {name_a, name_b})
    kube.kubectl("apply", "-f", "-", input=slice_json([(a, READY), (b, NOT_READY)]))
    until_calls(kube, MANUAL, "B not ready", only(name_a))
    # Serving and terminating endpoints take calls only when nothing else is left.
    kube.kubectl("apply", "-f", "-", input=slice_json([(a, NOT_READY), (b, TERMINATING)]))
    until_calls(kube, MANUAL, "only B serving while terminating", only(name_b))
    kube.kubectl("apply", "-f", "-", input=slice_json([(a, READY), (b, TERMINATING)]))
    until_calls(kube, MANUAL, "A ready again, B terminating", only(name_a))
    kube.kubectl("apply", "-f", "-", input=slice_json([(b, READY)]))
    until_calls(kube, MANUAL, "A removed", only(name_b))


# ---- policy changes without restarts -----------------------------------------------------------------------


def test_lb_timeout_allow_and_grpc_services_changes_apply_without_restarts(
    manual: tuple[Kube, dict[str, Any], dict[str, Any]],
) -> None:
    kube, a, b = manual
    kube.kubectl("apply", "-f", "-", input=slice_json([(a, READY), (b, READY)]))
    until_calls(kube, MANUAL, "both endpoints", lambda c: len(c) == 2)
    client = client_pod(kube)
    restarts = {p["metadata"]["name"]: [s.get("restartCount", 0) for s in p["status"].get("containerStatuses", [])]
                for p in kube.pods(EXAMPLE)}  # fmt: skip

    def policy() -> dict[str, Any]:
        services: dict[str, Any] = proxy_debug(kube, client)["routes"]["services"]
        return services.get(f"{MANUAL}.{EXAMPLE}") or {}

    kube.kubectl("annotate", "service", MANUAL, "-n", EXAMPLE, "kuberpc.io/lb=round-robin", "kuberpc.io/timeout=750ms")
    kube.wait("lb and timeout at the client's proxy", lambda: (p := policy()) and p["policy"] == "round-robin" and p["timeout"] == 0.75, timeout=30)
    # A bad value: the control plane logs it and the default applies.
    kube.kubectl("annotate", "service", MANUAL, "-n", EXAMPLE, "kuberpc.io/lb=fastest", "--overwrite")
    kube.wait("the default lb for a bad value", lambda: policy().get("policy") == "weighted-round-robin", timeout=30)

    # allow: enforced by the servers' proxies from the Service selecting them (arith).
    kube.kubectl("annotate", "service", "arith", "-n", EXAMPLE, "kuberpc.io/allow=nobody/*")
    try:
        until_calls(kube, "arith", "calls denied by allow", lambda c: set(c) == {"PERMISSION_DENIED"})
    finally:
        kube.kubectl("annotate", "service", "arith", "-n", EXAMPLE, "kuberpc.io/allow-")
    until_calls(kube, "arith", "calls allowed again", lambda c: all(k.startswith("arith-") for k in c))

    # grpc-services: a call naming no Service (authority 127.0.0.1) is routed by its gRPC service name.
    until_calls(kube, "127.0.0.1", "routing by gRPC name", lambda c: all(k.startswith("arith-") for k in c))
    kube.kubectl("annotate", "service", "arith", "-n", EXAMPLE, "kuberpc.io/grpc-services=other.Other", "--overwrite")
    try:
        until_calls(kube, "127.0.0.1", "the claim withdrawn", lambda c: set(c) == {"UNAVAILABLE"})
    finally:
        kube.kubectl("annotate", "service", "arith", "-n", EXAMPLE, "kuberpc.io/grpc-services=arith.Arith", "--overwrite")
    until_calls(kube, "127.0.0.1", "the claim back", lambda c: all(k.startswith("arith-") for k in c))
    after = {p["metadata"]["name"]: [s.get("restartCount", 0) for s in p["status"].get("containerStatuses", [])]
             for p in kube.pods(EXAMPLE)}  # fmt: skip
    assert {k: v for k, v in after.items() if k in restarts} == restarts, "something restarted"
    kube.kubectl("annotate", "service", MANUAL, "-n", EXAMPLE, "kuberpc.io/lb-", "kuberpc.io/timeout-")


# ---- the API server's death, a control-plane replica's death ----------------------------------------------


def watch_weight(kube: Kube, tmp: Path, pods: list[str], service: str, target: str, weight: int) -> list[Any]:
    watchers = []
    for pod in pods:
        proc = kube.spawn(EXAMPLE, pod, [PYTHON, "-c", WEIGHT_WATCHER, service, target, str(weight), "30"],
                          name=f"watch-{pod}", log_dir=tmp)  # fmt: skip
        proc.wait_for_line("watching", timeout=30)
        watchers.append(proc)
    return watchers


def seen_at(watchers: list[Any]) -> list[float | None]:
    out = []
    for proc in watchers:
        stdout, _ = proc.popen.communicate(timeout=60)
        out.append(json.loads(stdout.decode().strip().splitlines()[-1])["seen_at"])
    return out


def test_the_api_server_killed_fails_no_call_and_a_change_then_reaches_every_proxy_within_2s(
    example: Kube, tmp_path: Path
) -> None:
    client = client_pod(example)
    servers = sorted(p["metadata"]["name"] for p in example.ready_pods(EXAMPLE, SERVER))
    meshed = [*servers, client]
    traffic = Traffic(example, tmp_path, limit_s=120)
    example.cp.kill_apiserver()
    try:
        # Nothing may ask the API server now: the calls are served from the last endpoints the control plane sent.
        done = example.exec(EXAMPLE, client, [PYTHON, "-c", CALLER, "40", "30", "0"], timeout=90)
    finally:
        example.cp.start_apiserver()
        example.cp.wait_ready()
    assert done.returncode == 0, done.stderr[-2000:]
    outcomes_down: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    target = servers[0]
    watchers = watch_weight(example, tmp_path, meshed, f"arith.{EXAMPLE}", target, 7)
    changed_at = time.time()
    example.kubectl("annotate", "pod", target, "-n", EXAMPLE, "kuberpc.io/weight=7", "--overwrite")
    seen = seen_at(watchers)
    example.kubectl("annotate", "pod", target, "-n", EXAMPLE, "kuberpc.io/weight=100", "--overwrite")
    outcomes = traffic.finish()
    assert not failures(outcomes) and not failures(outcomes_down), (collections.Counter(outcomes), collections.Counter(outcomes_down))
    delays = {pod: (s - changed_at if s is not None else None) for pod, s in zip(meshed, seen, strict=True)}
    print(f"change-to-proxy after the API server restart: {delays}")
    assert all(d is not None and d <= 2.0 for d in delays.values()), delays


def test_killing_one_of_two_control_plane_replicas_fails_no_call(example: Kube, tmp_path: Path) -> None:
    client = client_pod(example)
    before = proxy_debug(example, client)["discovery"]
    assert before["current"] is True and before["connected_to"], before
    ip = before["connected_to"].rpartition(":")[0]
    replicas = example.ready_pods("kuberpc-system", "app.kubernetes.io/name=kuberpc-webhook")
    assert len(replicas) == 2
    (victim,) = [p for p in replicas if p["status"].get("podIP") == ip]
    traffic = Traffic(example, tmp_path, limit_s=120)
    netns_name = example.where("kuberpc-system", victim["metadata"]["name"])["netns"]
    pids = subprocess.run(["ip", "netns", "pids", netns_name], capture_output=True, text=True, check=True).stdout.split()
    assert pids
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    # Streaming again: from the other replica, or from the killed one once the runner restarted it.
    example.wait(
        "the client's proxy streaming again",
        lambda: (d := proxy_debug(example, client)["discovery"])["current"] and d["reconnects"] > before["reconnects"],
        timeout=60,
    )
    servers = sorted(p["metadata"]["name"] for p in example.ready_pods(EXAMPLE, SERVER))
    watchers = watch_weight(example, tmp_path, [client], f"arith.{EXAMPLE}", servers[-1], 9)
    example.kubectl("annotate", "pod", servers[-1], "-n", EXAMPLE, "kuberpc.io/weight=9", "--overwrite")
    (seen,) = seen_at(watchers)
    example.kubectl("annotate", "pod", servers[-1], "-n", EXAMPLE, "kuberpc.io/weight=100", "--overwrite")
    outcomes = traffic.finish()
    assert not failures(outcomes), collections.Counter(outcomes)
    assert seen is not None, "a change after the replica's death never reached the client's proxy"
    # The runner restarts the killed replica; it is ready again once its catalog is listed (/readyz). The tests
    # after this one find the control plane as they would have without it.
    example.wait(
        "both control-plane replicas ready again",
        lambda: example.get("deploy", "kuberpc-webhook", "-n", "kuberpc-system")["status"].get("readyReplicas", 0) == 2,
        timeout=90,
    )
