"""An injected pod's proxy end to end with the control plane, as e2e/kind.sh runs it in a cluster: the example
pods admitted by the webhook, started as the kubelet would, certified by the identity service, calling over mTLS.

Everything runs in this process on one host, so each pod's IP is its own 127.0.0.x, and the few settings that
cannot be real here are remapped (REMAPPED); everything else the webhook injected is used as is.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import os
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import pytest
import yaml
from cryptography import x509
from kubernetes import config as kube_config
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from e2e.arith import client as arith_client
from e2e.arith import server as arith_server
from sidecar import config as config_mod
from sidecar import pki
from sidecar.app import Proxy, serve
from tests.kubefake import API_AUDIENCE, FakeCluster, Obj, cluster, free_loopback_addresses, kubeconfig
from tests.ports import free_port
from tests.sidecar.harness import wait_for
from webhook import annotations as a
from webhook.config import InjectorConfig, load_config
from webhook.identity import CertificateAuthority
from webhook.identity_service import (
    IdentityMetrics,
    IdentityService,
    ServingCertificate,
    identity_dns_names,
    serving,
)
from webhook.install import render
from webhook.kube import review_token
from webhook.patch import mutate

__all__ = ["cluster"]  # the fake API server fixture (tests/kubefake.py)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "manifests" / "examples" / "arith"
NS = "default"
SERVER_POD = "arith-6d4cf56db6-x7k2p"
CLIENT_POD = "arith-client-5c7b9d8f4-q9w3z"
# Every port a pod of the example listens on: the proxy's fixed three and the Arith app's.
POD_PORTS = (a.OUTBOUND_PORT, a.INBOUND_PORT, a.ADMIN_PORT, 50051)
WAIT_S = 10.0

# What cannot be real on one host, and nothing else: each proxy's environment differs from the one the
# webhook injected (with the downward API resolved) in exactly these variables; the test asserts it.
MOUNTED_FILES = frozenset(  # in the pod's volumes, which are directories under tmp_path here
    {"KUBERPC_TLS_CERT", "KUBERPC_TLS_KEY", "KUBERPC_TRUST_ANCHORS", "KUBERPC_IDENTITY_TOKEN"}
)
REMAPPED = MOUNTED_FILES | {
    "KUBERPC_IDENTITY_ADDR",  # the same DNS name, with the port the identity service bound here
    "KUBERPC_OUTBOUND_ADDR",  # a pod's own 127.0.0.1 is its 127.0.0.x here
    "KUBERPC_ADMIN_ADDR",  # 0.0.0.0 would be every pod's
    "KUBERPC_DEBUG_ADDR",  # unset (127.0.0.1:15091) would be every pod's
    "KUBECONFIG",  # in a pod: KUBERNETES_SERVICE_HOST and the ServiceAccount token the kubelet mounts
}
SERVER_REMAPPED = REMAPPED | {"KUBERPC_INBOUND_ADDR", "KUBERPC_APP_ADDR"}  # 0.0.0.0 and 127.0.0.1, as above


# ---- the control plane, installed as `python -m webhook install` does it -------------------------------


@dataclass(frozen=True)
class ControlPlane:
    injector: InjectorConfig
    ca: CertificateAuthority
    trust_anchors: Obj  # the ConfigMap of namespace `default`


def install(directory: Path) -> ControlPlane:
    """The manifests with fresh CAs; the CA Secret written as the webhook's Deployment mounts it."""
    docs = render(REPO / "manifests", namespaces=[NS], now=dt.datetime.now(dt.UTC))

    def find(kind: str, name: str, namespace: str) -> Obj:
        (doc,) = [
            d
            for d in docs
            if (d["kind"], d["metadata"]["name"], d["metadata"].get("namespace")) == (kind, name, namespace)
        ]
        return doc

    injector = load_config(
        find("ConfigMap", "kuberpc-injector-config", a.DEFAULT_CONTROL_PLANE_NAMESPACE)["data"]["config.yaml"]
    )
    secret = find("Secret", a.IDENTITY_CA_SECRET, injector.control_plane_namespace)["data"]
    directory.mkdir()
    for key in ("ca.pem", "ca-key.pem"):
        (directory / key).write_bytes(base64.b64decode(secret[key]))
    ca = CertificateAuthority.load(
        directory / "ca.pem", directory / "ca-key.pem", trust_domain=injector.trust_domain
    )
    return ControlPlane(injector, ca, find("ConfigMap", a.TRUST_ANCHORS_CONFIGMAP, NS))


@contextlib.asynccontextmanager
async def identity_service(plane: ControlPlane, api: Any) -> AsyncIterator[tuple[int, CollectorRegistry]]:
    """The identity service wired as webhook/__main__.py wires it, on 127.0.0.1; yields its port and metrics."""
    registry = CollectorRegistry()

    def utcnow() -> dt.datetime:
        return dt.datetime.now(dt.UTC)

    service = IdentityService(
        plane.ca,
        review=partial(review_token, api, audience=a.TOKEN_AUDIENCE),
        metrics=IdentityMetrics(registry),
        clock=utcnow,
    )
    names = identity_dns_names(plane.injector.control_plane_namespace, plane.injector.identity_addr)
    async with serving(
        service, ServingCertificate(plane.ca, names, clock=utcnow), host="127.0.0.1", port=0, grace=1.0
    ) as port:
        yield port, registry


# ---- the example's objects, as the API server holds them after admission ------------------------------


def example_pod(manifest: str, name: str) -> Obj:
    """The Pod the example Deployment's ReplicaSet creates, as the API server sends it to the webhook."""
    template = yaml.safe_load((EXAMPLE / manifest).read_text())["spec"]["template"]
    # Direct discovery against the fake API server: this test is about injection, identity and the proxies'
    # own watch; control-plane discovery (the default) runs against the real control plane in tests/cluster.
    template["metadata"]["annotations"] |= {a.DISCOVERY: a.DISCOVERY_DIRECT, a.DISCOVERY_SCOPE: "namespace"}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {**template["metadata"], "name": name, "namespace": NS},
        "spec": template["spec"],
    }


def admitted(pod: Obj, injector: InjectorConfig, ip: str) -> Obj:
    """The webhook's patch applied, then scheduled: running with `ip` as its pod IP."""
    outcome = mutate(pod, {}, injector, namespace=NS)
    assert outcome.result == "injected", outcome
    patched: Obj = jsonpatch.apply_patch(pod, list(outcome.patch))
    patched["status"] = {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    return patched


def arith_service() -> Obj:
    svc: Obj = yaml.safe_load((EXAMPLE / "service.yaml").read_text())
    svc["metadata"]["namespace"] = NS
    # Only the client's identity may call it: the call then succeeds only if mTLS carried that identity.
    svc["metadata"]["annotations"]["kuberpc.io/allow"] = f"{NS}/arith-client"
    return svc


def endpoint_slice(svc: Obj, pod: Obj) -> Obj:
    """What the EndpointSlice controller writes for the one ready pod the Service selects."""
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (port,) = [
        p
        for c in pod["spec"]["containers"]
        for p in c.get("ports", [])
        if p["name"] == svc["spec"]["ports"][0]["targetPort"]
    ]
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{svc['metadata']['name']}-x8k2d",
            "namespace": NS,
            "labels": {"kubernetes.io/service-name": svc["metadata"]["name"]},
        },
        "addressType": "IPv4",
        "ports": [
            {"name": port["name"], "port": port["containerPort"], "protocol": "TCP", "appProtocol": "grpc"}
        ],
        "endpoints": [
            {
                "addresses": [pod["status"]["podIP"]],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "targetRef": {"kind": "Pod", "name": pod["metadata"]["name"], "namespace": NS},
            }
        ],
    }


# ---- the kubelet's part: the proxy container's environment and volumes ---------------------------------


def proxy_container(pod: Obj) -> Obj:
    spec = pod["spec"]
    (container,) = [
        c for c in (*spec.get("initContainers", []), *spec["containers"]) if c["name"] == a.PROXY_CONTAINER
    ]
    return container


def container_env(pod: Obj, container: Obj) -> dict[str, str]:
    """Literal values, and downward-API fieldRefs read from the running Pod."""
    env: dict[str, str] = {}
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        assert list(var["valueFrom"]) == ["fieldRef"], var  # the only source the webhook uses
        env[var["name"]] = field_value(pod, var["valueFrom"]["fieldRef"]["fieldPath"])
    return env


def field_value(pod: Obj, path: str) -> str:
    """A downward-API fieldRef (`metadata.namespace`, `status.podIP`...) read from the running Pod."""
    value: Any = pod
    for part in path.split("."):
        value = value[part]
    return str(value)


def mount_volumes(pod: Obj, container: Obj, cluster: FakeCluster, root: Path) -> dict[str, Path]:
    """Each of the container's volumes filled as the kubelet fills it, under `root`; mountPath -> directory."""
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    namespace = pod["metadata"]["namespace"]
    mounts: dict[str, Path] = {}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        directory = root / mount["mountPath"].lstrip("/")
        directory.mkdir(parents=True)
        if "emptyDir" in volume:
            pass
        elif "configMap" in volume:
            data = cluster.objects[("configmaps", namespace, volume["configMap"]["name"])]["data"]
            for item in volume["configMap"]["items"]:
                (directory / item["path"]).write_text(data[item["key"]])
        elif "projected" in volume:
            for source in volume["projected"]["sources"]:
                if "serviceAccountToken" in source:  # TokenRequest for the pod's ServiceAccount
                    request = source["serviceAccountToken"]
                    token = cluster.issue_token(
                        namespace,
                        pod["spec"]["serviceAccountName"],
                        audience=request.get("audience", API_AUDIENCE),
                    )
                    (directory / request["path"]).write_text(token)
                elif "configMap" in source:
                    data = cluster.objects[("configmaps", namespace, source["configMap"]["name"])]["data"]
                    for item in source["configMap"]["items"]:
                        (directory / item["path"]).write_text(data[item["key"]])
                else:
                    for item in source["downwardAPI"]["items"]:
                        (directory / item["path"]).write_text(field_value(pod, item["fieldRef"]["fieldPath"]))
        else:
            raise AssertionError(f"volume {mount['name']} is of a kind the webhook does not inject")
        mounts[mount["mountPath"]] = directory
    return mounts


def proxy_env(injected: dict[str, str], mounts: dict[str, Path], **settings: str) -> dict[str, str]:
    """`injected` with paths under a mount moved to its directory, and `settings` added or replaced."""
    env = dict(injected)
    for name, value in injected.items():
        for mount_path, directory in mounts.items():
            if value.startswith(mount_path + "/"):
                env[name] = str(directory) + value[len(mount_path) :]
    return env | settings


def pod_proxy_env(
    pod: Obj, cluster: FakeCluster, root: Path, *, identity_addr: str
) -> tuple[dict[str, str], dict[str, str]]:
    """The proxy container's environment as injected (downward API resolved), and as it runs here (REMAPPED).

    In a pod the API client finds the injected credentials at a fixed path; here KUBECONFIG points the same
    client at the fake API server with the token from that volume (it reads the file, as in a pod).
    """
    container, ip = proxy_container(pod), pod["status"]["podIP"]
    injected = container_env(pod, container)
    mounts = mount_volumes(pod, container, cluster, root)
    api_token = mounts[a.API_ACCESS_DIR] / "token"
    settings = {
        "KUBERPC_IDENTITY_ADDR": identity_addr,
        "KUBECONFIG": str(kubeconfig(root / "kubeconfig", cluster.url, token_file=api_token)),
        "KUBERPC_OUTBOUND_ADDR": f"{ip}:{a.OUTBOUND_PORT}",
        "KUBERPC_ADMIN_ADDR": f"{ip}:{a.ADMIN_PORT}",
        "KUBERPC_DEBUG_ADDR": f"{ip}:{a.DEBUG_PORT}",
    }
    if injected.get("KUBERPC_INBOUND_ADDR") != "off":
        settings |= {"KUBERPC_INBOUND_ADDR": f"{ip}:{a.INBOUND_PORT}", "KUBERPC_APP_ADDR": ip}
    return injected, proxy_env(injected, mounts, **settings)


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}


@dataclass
class ClusterDNS:
    """Answers for the cluster's Service names on this event loop; other names resolve as usual.

    Why: the proxy dials KUBERPC_IDENTITY_ADDR by its host name (and checks the certificate for it) and has
    no setting to connect elsewhere, and /etc/hosts cannot be edited here. asyncio resolves every host name
    through loop.getaddrinfo, which the test replaces on its own loop only.
    """

    loop: asyncio.AbstractEventLoop
    names: dict[str, str]
    answered: list[str] = field(default_factory=list)

    async def getaddrinfo(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name in self.names:
            self.answered.append(name)
            host = self.names[name]
        return await type(self.loop).getaddrinfo(self.loop, host, port, *args, **kwargs)


# ---- running proxies, and looking at them -------------------------------------------------------------


@dataclass
class PodProxy:
    ip: str
    env: dict[str, str]
    task: asyncio.Task[None]
    started: asyncio.Future[Proxy]

    async def ready(self) -> Proxy:
        done, _ = await asyncio.wait(
            {self.task, self.started}, timeout=WAIT_S, return_when=asyncio.FIRST_COMPLETED
        )
        if self.task in done:
            self.task.result()  # raises what stopped it
            raise AssertionError("the proxy stopped before it was ready")
        assert self.started in done, f"proxy at {self.ip} not ready within {WAIT_S} s"
        return self.started.result()


@contextlib.asynccontextmanager
async def running_proxy(ip: str, env: dict[str, str]) -> AsyncIterator[PodProxy]:
    """`python -m sidecar run` with this environment, in this event loop; stopped (and drained) on exit."""
    stop = asyncio.Event()
    started: asyncio.Future[Proxy] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(config_mod.load(env), stop=stop, started=started))
    try:
        yield PodProxy(ip, env, task, started)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def http_get(url: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
        session.get(url) as resp,
    ):
        return resp.status, await resp.text()


async def refused(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(host, port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


async def requests_total(ip: str, direction: str) -> dict[tuple[str, str, str], float]:
    """kuberpc_requests_total of one direction, scraped from the admin port: (service, method, code) -> count."""
    status, text = await http_get(f"http://{ip}:{a.ADMIN_PORT}{a.METRICS_PATH}")
    assert status == 200
    return {
        (s.labels["service"], s.labels["method"], s.labels["grpc_code"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "kuberpc_requests_total" and s.labels["direction"] == direction
    }


def workload_certificate(path: str) -> x509.Certificate:
    """The leaf of the chain the proxy wrote."""
    return x509.load_pem_x509_certificates(Path(path).read_bytes())[0]


def uri_sans(cert: x509.Certificate) -> list[str]:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    )


# ---- the test -----------------------------------------------------------------------------------------


async def test_injected_proxies_are_certified_by_the_control_plane_then_carry_an_arith_call_over_mtls(
    cluster: FakeCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plane = install(tmp_path / "control-plane")
    server_ip, client_ip = free_loopback_addresses(2, POD_PORTS)
    client = example_pod("client.yaml", CLIENT_POD)
    # The example's local port (9001) may be taken on this host: the client pod names a free one instead.
    target, _, _ = client["metadata"]["annotations"][a.UPSTREAMS].partition("=")
    upstream_port = free_port()
    client["metadata"]["annotations"][a.UPSTREAMS] = f"{target}={upstream_port}"
    pods = {
        SERVER_POD: admitted(example_pod("server.yaml", SERVER_POD), plane.injector, server_ip),
        CLIENT_POD: admitted(client, plane.injector, client_ip),
    }
    assert all(p["metadata"]["labels"][a.INJECTED] == a.INJECTED_LABEL_VALUE for p in pods.values())
    service = arith_service()
    # Every namespace holds the cluster's CA as kube-root-ca.crt; the fake API serves plain HTTP, so the proxy's
    # client (pointed at it by KUBECONFIG) never reads this one.
    root_ca = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": a.API_CA_CONFIGMAP, "namespace": NS},
        "data": {"ca.crt": pki.create_ca(trust_domain=None, common_name="kubernetes", now=dt.datetime.now(dt.UTC)).cert_pem.decode()},
    }
    cluster.put(plane.trust_anchors, root_ca, service, endpoint_slice(service, pods[SERVER_POD]), *pods.values())

    identity_host = plane.injector.identity_addr.rpartition(":")[0]
    loop = asyncio.get_running_loop()
    dns = ClusterDNS(loop, {identity_host: "127.0.0.1"})
    monkeypatch.setattr(loop, "getaddrinfo", dns.getaddrinfo)
    config = kubeconfig(tmp_path / "kubeconfig", cluster.url)  # the identity service's, for TokenReviews
    cluster.authenticate = True  # the proxies list and watch with the API token the webhook mounted for them
    cluster.gates["tokenreviews"] = reviews_go_on = asyncio.Event()
    app_port = int(pods[SERVER_POD]["metadata"]["annotations"][a.APP_PORT])

    async with contextlib.AsyncExitStack() as stack:
        api = stack.enter_context(
            kube_config.new_client_from_config(config_file=str(config), persist_config=False)
        )
        await stack.enter_async_context(
            arith_server.running(host=server_ip, port=app_port, replica=SERVER_POD, grace=1.0)
        )
        identity_port, identity_metrics = await stack.enter_async_context(identity_service(plane, api))
        envs: dict[str, dict[str, str]] = {}
        for name, pod in pods.items():
            identity_addr = f"{identity_host}:{identity_port}"
            injected, envs[name] = pod_proxy_env(pod, cluster, tmp_path / name, identity_addr=identity_addr)
            assert changed(injected, envs[name]) == (SERVER_REMAPPED if name == SERVER_POD else REMAPPED)
            assert all(envs[name][v] == str(tmp_path / name) + injected[v] for v in MOUNTED_FILES)
            assert injected["KUBERPC_IDENTITY_ADDR"] == plane.injector.identity_addr
            assert envs[name]["KUBERPC_IDENTITY_ADDR"] == identity_addr  # the same host name

        server_side = await stack.enter_async_context(running_proxy(server_ip, envs[SERVER_POD]))
        client_side = await stack.enter_async_context(running_proxy(client_ip, envs[CLIENT_POD]))
        stack.callback(reviews_go_on.set)  # first on exit: a failure below must not leave a review hanging
        # Both proxies asked for a certificate; the identity service waits on the TokenReview API meanwhile.
        await wait_for(lambda: len(cluster.reviews) == 2, "a TokenReview for each proxy", WAIT_S)
        for ip in (server_ip, client_ip):
            assert await http_get(f"http://{ip}:{a.ADMIN_PORT}{a.READY_PATH}") == (503, "not ready")
            assert await refused(ip, a.OUTBOUND_PORT)
        assert await refused(server_ip, a.INBOUND_PORT) and await refused("127.0.0.1", upstream_port)

        reviews_go_on.set()
        await server_side.ready()
        await client_side.ready()
        issued = identity_metrics.get_sample_value(
            "kuberpc_identity_certificates_total", {"result": "issued"}
        )
        assert issued == 2
        identity_tokens = [t for t, (_, audiences) in cluster.tokens.items() if audiences == (a.TOKEN_AUDIENCE,)]
        assert sorted(cluster.reviews) == sorted((token, (a.TOKEN_AUDIENCE,)) for token in identity_tokens)
        # Each proxy dialled the identity service by its name, and checked the certificate for that name.
        assert dns.answered == [identity_host, identity_host]
        for side, account in ((server_side, "arith"), (client_side, "arith-client")):
            cert = workload_certificate(side.env["KUBERPC_TLS_CERT"])
            cert.verify_directly_issued_by(plane.ca.cert)
            assert uri_sans(cert) == [f"spiffe://{plane.injector.trust_domain}/ns/{NS}/sa/{account}"]
            assert stat.S_IMODE(os.stat(side.env["KUBERPC_TLS_KEY"]).st_mode) == 0o600
            assert await http_get(f"http://{side.ip}:{a.ADMIN_PORT}{a.READY_PATH}") == (200, "ready")

        async with arith_client.channel(f"127.0.0.1:{upstream_port}") as ch:
            answer = await arith_client.add(arith_client.stub(ch), 2, 3)
        assert answer == arith_client.Answer(5, SERVER_POD)
        one_ok_add = {("arith.default", "/arith.Arith/Add", "0"): 1.0}
        assert await requests_total(client_ip, "outbound") == one_ok_add
        assert await requests_total(server_ip, "inbound") == one_ok_add
        # Discovery read the API as each pod's ServiceAccount, with the token from the injected volume.
        assert cluster.readers == {f"system:serviceaccount:{NS}:{sa}" for sa in ("arith", "arith-client")}
        for name in pods:
            api_access = tmp_path / name / a.API_ACCESS_DIR.lstrip("/")
            assert (api_access / "namespace").read_text() == NS
            assert (api_access / "ca.crt").read_text() == root_ca["data"]["ca.crt"]
