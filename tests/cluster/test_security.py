"""Authorization on the real control plane: a Service in another namespace cannot hijack calls by claiming the
example's gRPC service, and naming another Service (one backed by a hand-written EndpointSlice listing the
victim's pod) does not get a caller past the victim's `kuberpc.io/allow`."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.cluster.conftest import EXAMPLE, PYTHON, SERVER, Kube, call

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

ATTACKER = "attacker"

# One unary Add through the local proxy with a chosen :authority; prints the replica or the status name.
PROBE = r"""
import asyncio, sys
import grpc
from e2e.arith import client

async def main(target, authority):
    async with client.channel(target, authority or None) as ch:
        try:
            answer = await client.add(client.stub(ch), 2, 3, deadline=10)
            print(answer.replica)
        except grpc.aio.AioRpcError as e:
            print(e.code().name, e.details())

asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ""))
"""


def pod(name: str, namespace: str, sa: str, annotations: dict[str, str], args: list[str], labels: dict[str, str]) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels,
                     "annotations": {"kuberpc.io/inject": "enabled", **annotations}},
        "spec": {
            "serviceAccountName": sa,
            # Pod Security `restricted`, which the example's namespace enforces.
            "securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "app", "image": "ghcr.io/kuberpc/arith-example:0.1.0",
                "command": ["python"], "args": args,
                "ports": [{"name": "grpc", "containerPort": 50051}],
                "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
            }],
        },
    }


def cluster_binding(name: str, namespace: str, sa: str) -> dict[str, object]:
    # Cluster-wide direct discovery, as the default install's proxies have it: they see every namespace.
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kuberpc-proxy"},
        "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": namespace}],
    }


def probe(kube: Kube, namespace: str, name: str, target: str, authority: str = "") -> str:
    done = kube.exec(namespace, name, [PYTHON, "-c", PROBE, target, authority], timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


@pytest.fixture(scope="module")
def attacker(example: Kube) -> Iterator[Kube]:
    k = example
    k.kubectl("create", "namespace", ATTACKER)
    for ns, sa in ((ATTACKER, "intruder"), (ATTACKER, "impostor"), (EXAMPLE, "wide-client")):
        k.kubectl("create", "serviceaccount", sa, "-n", ns)
        k.kubectl("apply", "-f", "-", input=json.dumps(cluster_binding(f"kuberpc-proxy-{ns}-{sa}", ns, sa)))
    victim = k.ready_pods(EXAMPLE, SERVER)[0]
    docs: list[dict[str, object]] = [
        # A meshed server in the attacker's namespace whose Service claims the example's gRPC service name.
        pod("impostor", ATTACKER, "impostor", {"kuberpc.io/app-port": "50051"},
            ["-m", "e2e.arith.server", "--port", "50051", "--replica", "IMPOSTOR"], {"app": "impostor"}),
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "a", "namespace": ATTACKER, "annotations": {"kuberpc.io/grpc-services": "arith.Arith"}},
         "spec": {"selector": {"app": "impostor"}, "ports": [{"name": "grpc", "port": 50051, "targetPort": 50051}]}},
        # A Service with no selector and a hand-written EndpointSlice that lists the victim's pod address.
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "evil", "namespace": ATTACKER},
         "spec": {"ports": [{"name": "grpc", "port": 50051, "targetPort": 50051}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "evil-1", "namespace": ATTACKER, "labels": {"kubernetes.io/service-name": "evil"}},
         "addressType": "IPv4", "ports": [{"name": "grpc", "port": 50051}],
         "endpoints": [{"addresses": [victim["status"]["podIP"]], "conditions": {"ready": True},
                        "targetRef": {"kind": "Pod", "namespace": EXAMPLE, "name": victim["metadata"]["name"]}}]},
        # The intruder calls by naming `evil`; a second client in the victim's namespace sees the whole cluster.
        pod("intruder", ATTACKER, "intruder", {"kuberpc.io/upstreams": "evil:50051=9001"},
            ["-c", "import time; time.sleep(3600)"], {"app": "intruder"}),
        pod("wide-client", EXAMPLE, "wide-client", {}, ["-c", "import time; time.sleep(3600)"], {"app": "wide-client"}),
    ]
    for doc in docs:
        k.kubectl("apply", "-f", "-", input=json.dumps(doc))
    for ns, name in ((ATTACKER, "impostor"), (ATTACKER, "intruder"), (EXAMPLE, "wide-client")):
        k.wait(f"{ns}/{name} ready", lambda ns=ns, name=name: any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in k.get("pod", name, "-n", ns)["status"].get("conditions") or []), timeout=120)
    # Only the example's client may call the example's Service.
    k.kubectl("annotate", "service", "arith", "-n", EXAMPLE, f"kuberpc.io/allow={EXAMPLE}/arith-client", "--overwrite")
    yield k
    k.kubectl("annotate", "service", "arith", "-n", EXAMPLE, "kuberpc.io/allow-", check=False)
    k.kubectl("delete", "pod", "wide-client", "-n", EXAMPLE, "--wait=false", check=False)


def test_a_service_of_another_namespace_claiming_the_grpc_service_gets_no_call(attacker: Kube) -> None:
    # gRPC's default :authority for 127.0.0.1:15001 names no Service: the proxy routes by the path's service,
    # and `a.attacker` (sorted first in the cluster) claims arith.Arith too. The caller's own namespace wins.
    for _ in range(5):
        answer = probe(attacker, EXAMPLE, "wide-client", "127.0.0.1:15001")
        # Refused by the example's allow (wide-client is not arith-client), never answered by the impostor.
        assert answer.startswith("PERMISSION_DENIED"), answer
    assert "IMPOSTOR" not in answer
    legit = call(attacker, 20)
    assert all(o.startswith("arith-") for o in legit), legit


def test_naming_another_service_does_not_get_past_the_victims_allow(attacker: Kube) -> None:
    # evil.attacker's hand-written slice lists the victim's address (and even names the victim pod). Neither
    # the intruder's upstream port nor its :authority gets the call to the victim's app: a pod of another
    # namespace is not taken for a meshed peer, and the app listens on the pod's loopback only.
    for target, authority in (("127.0.0.1:9001", ""), ("127.0.0.1:15001", "evil.attacker:50051")):
        answer = probe(attacker, ATTACKER, "intruder", target, authority)
        assert answer.split()[0] in {"PERMISSION_DENIED", "UNAVAILABLE"} and not answer.startswith("arith-"), answer
    # Called by its own name, over mTLS, the victim's proxy refuses the intruder under the Service's allow.
    direct = probe(attacker, ATTACKER, "intruder", "127.0.0.1:15001", f"arith.{EXAMPLE}:50051")
    assert direct.startswith("PERMISSION_DENIED"), direct
