"""`kuberpc check`: ✔ for what holds, ✘ with the fix for what does not, exit 1 on any ✘; against a fake
API server whose pod proxy reaches real proxies on loopback, and the checks' pure rules on made-up facts."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import io
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import kmock
import pytest
from aiohttp import web
from cryptography import x509

from sidecar import pki
from tests.kubefake import FakeCluster, cluster, kubeconfig
from tests.sidecar.harness import Backend, MeshCerts, backend, mesh_certs, run_pair
from tests.webhook.test_cli_cluster import Mesh, meshed_pod, serve_pod_proxy
from tests.webhook.test_discovery_service import Pki as DiscoveryPki
from tests.webhook.test_discovery_service import replica as discovery_replica
from tests.webhook.test_identity_service import TD, running_service
from tests.webhook.test_identity_service import Mesh as IdentityMesh
from webhook import annotations as a
from webhook import install
from webhook.cli import check
from webhook.cli.kube import CliError, Cluster
from webhook.cli.main import main
from webhook.identity import CertificateAuthority


def identity_mesh(tmp_path: Path) -> IdentityMesh:
    """The mesh CA the identity service signs with (and serves its own port's certificate from)."""
    pair = pki.create_ca(trust_domain=TD, common_name="kuberpc identity CA", now=dt.datetime.now(dt.UTC))
    cert, key = tmp_path / "identity-ca.pem", tmp_path / "identity-ca-key.pem"
    cert.write_bytes(pair.cert_pem)
    key.write_bytes(pair.key_pem)
    return IdentityMesh(pair, CertificateAuthority.load(cert, key, trust_domain=TD), cert, key)

__all__ = ["backend", "cluster", "mesh_certs"]  # fixtures used below

DAY = 86400.0
VERSION = {
    "major": "1",
    "minor": "30",
    "gitVersion": "v1.30.2",
    "gitCommit": "0" * 40,
    "gitTreeState": "clean",
    "buildDate": "2024-06-11T20:20:00Z",
    "goVersion": "go1.22.4",
    "compiler": "gc",
    "platform": "linux/amd64",
}


def webhook_pod(*, ready: bool) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "kuberpc-webhook-6c8f-abcde",
            "namespace": "kuberpc-system",
            "labels": {"app.kubernetes.io/name": "kuberpc-webhook"},
        },
        "spec": {"containers": [{"name": "webhook", "image": "webhook"}]},
        "status": {
            "containerStatuses": [
                {
                    "name": "webhook",
                    "ready": ready,
                    "restartCount": 0,
                    "image": "w",
                    "imageID": "w",
                    "state": {},
                }
            ]
        },
    }


def publish_anchors(fake: FakeCluster, namespace: str, pem: str) -> None:
    cm = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": a.TRUST_ANCHORS_CONFIGMAP, "namespace": namespace},
        "data": {a.TRUST_ANCHORS_KEY: pem},
    }
    fake.handler[f"get /api/v1/namespaces/{namespace}/configmaps/{a.TRUST_ANCHORS_CONFIGMAP}"] << cm


WEBHOOK_POD = "kuberpc-webhook-6c8f-abcde"


class Forwarding(Cluster):
    """The real adapter, except that port-forwards reach servers the test runs on loopback and namespace labels
    come from `opted_in` (kmock cannot parse the path of a Namespace; tests/cluster/test_cli.py reads real ones)."""

    ports: ClassVar[dict[int, str]] = {}
    opted_in: ClassVar[set[str]] = set()

    def _namespace_opted_in(self, namespace: str) -> bool:
        return namespace in self.opted_in

    @contextlib.contextmanager
    def forward(self, namespace: str, pod: str, port: int) -> Iterator[str]:
        if (namespace, pod) != ("kuberpc-system", WEBHOOK_POD) or port not in self.ports:
            raise CliError(f"port-forward to {namespace}/{pod}:{port}: HTTP 404 Not Found")
        yield self.ports[port]


@contextlib.asynccontextmanager
async def webhook_listener(serving: pki.KeyPair, tmp_path: Path) -> AsyncIterator[str]:
    """/healthz over TLS with `serving`, as the webhook's port 8443 answers it."""
    (tmp_path / "tls.crt").write_bytes(serving.cert_pem)
    (tmp_path / "tls.key").write_bytes(serving.key_pem)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    app = web.Application()
    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    try:
        yield f"127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


class ControlPlane:
    """The MutatingWebhookConfiguration (None: absent) and the Service that `python -m webhook install` creates."""

    def __init__(self, fake: FakeCluster, ca_bundle: bytes) -> None:
        self.mwc: dict[str, Any] | None = mwc(ca_bundle)
        fake.handler[f"get /apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{a.WEBHOOK_CONFIGURATION}"] << self._mwc
        fake.handler["get /api/v1/namespaces/kuberpc-system/services/kuberpc-webhook"] << {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "kuberpc-webhook", "namespace": "kuberpc-system"},
            "spec": {"ports": [{"name": "https", "port": 443, "targetPort": 8443}, {"port": 8081, "targetPort": 8081}]},
        }

    def _mwc(self, request: kmock.Request) -> dict[str, Any]:
        if self.mwc is None:
            raise kmock.KubernetesError(status=404, reason="NotFound", message="not found")
        return self.mwc


def mwc(ca_bundle: bytes) -> dict[str, Any]:
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": a.WEBHOOK_CONFIGURATION},
        "webhooks": [
            {
                "name": "inject.kuberpc.io",
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "clientConfig": {
                    "service": {"namespace": "kuberpc-system", "name": "kuberpc-webhook", "port": 443, "path": "/mutate"},
                    "caBundle": base64.b64encode(ca_bundle).decode(),
                },
            }
        ],
    }


@pytest.fixture
async def mesh(
    cluster: FakeCluster, mesh_certs: MeshCerts, backend: Backend, tmp_path: Path
) -> AsyncIterator[CheckedMesh]:
    """A healthy mesh: a ready control plane (its webhook, identity and discovery ports answering), trust anchors where
    pods are meshed, two ready proxies."""
    # The kubernetes client asks for /version/ (with the slash), which kmock does not serve by itself.
    cluster.handler["get /version/"] << VERSION
    now = dt.datetime.now(dt.UTC)
    webhook_ca = pki.create_ca(trust_domain=None, common_name="kuberpc webhook CA", now=now)
    serving = pki.issue_serving(webhook_ca, install.service_dns_names(), now=now)
    control_plane = ControlPlane(cluster, webhook_ca.cert_pem)
    identity = identity_mesh(tmp_path)
    async with (
        run_pair(mesh_certs, backend.port, tmp_path) as pair,
        webhook_listener(serving, tmp_path) as webhook_address,
        running_service(identity, lambda token: None) as identity_service,
        discovery_replica(cluster, DiscoveryPki(identity.pair.key_pem, identity.pair.cert_pem)) as discovery,
    ):
        Forwarding.ports = {
            8443: webhook_address,
            8081: f"127.0.0.1:{identity_service.port}",
            8082: f"127.0.0.1:{discovery.port}",
        }
        Forwarding.opted_in = set()
        cluster.put(
            webhook_pod(ready=True),
            meshed_pod("client-7c9d-x1", "client", "7c9d"),
            meshed_pod("echo-5f6b-y2", "echo", "5f6b"),
        )
        for pod in ("client-7c9d-x1", "echo-5f6b-y2"):
            pod_obj = cluster.objects["pods", "default", pod]
            pod_obj["metadata"]["annotations"][a.INJECT] = a.INJECT_ENABLED
            cluster.put(pod_obj)
        serve_pod_proxy(cluster, "client-7c9d-x1", pair.client_side)
        serve_pod_proxy(cluster, "echo-5f6b-y2", pair.server_side)
        publish_anchors(cluster, "kuberpc-system", identity.pair.cert_pem.decode())
        publish_anchors(cluster, "default", anchor_pem(mesh_certs))
        yield CheckedMesh(pair, cluster, kubeconfig(tmp_path / "kubeconfig", cluster.url), control_plane)


@dataclass
class CheckedMesh(Mesh):
    control_plane: ControlPlane


async def kuberpc_check(mesh: CheckedMesh, *args: str, now: float | None = None) -> tuple[int, list[str]]:
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(
        main,
        ["check", *args, "--kubeconfig", str(mesh.kubeconfig)],
        cluster=Forwarding,
        clock=(lambda: now) if now is not None else time.time,
        stdout=out,
        stderr=err,
    )
    return code, out.getvalue().splitlines() + err.getvalue().splitlines()  # stderr: a command that gave up


async def test_a_healthy_mesh_passes_every_check(mesh: CheckedMesh) -> None:
    code, lines = await kuberpc_check(mesh)

    assert code == 0, lines
    assert lines == [
        "✔ the API server answers (Kubernetes 1.30)",
        "✔ the control plane is ready (1/1 kuberpc-webhook pods in kuberpc-system)",
        *[
            line
            for line in lines
            if line.startswith(f"✔ the webhook in kuberpc-system/{WEBHOOK_POD} answers with a certificate "
                               "its caBundle trusts, valid until ")
        ],
        f"✔ the identity service in kuberpc-system/{WEBHOOK_POD} answers (an empty request: INVALID_ARGUMENT)",
        f"✔ the discovery service in kuberpc-system/{WEBHOOK_POD} answers with the mesh's certificate and requires one",
        *[line for line in lines if "kuberpc-trust-anchors: 1 trust anchor(s), valid until" in line],
        "✔ every pod asking for a proxy has one (2)",
        "✔ the proxy of default/client-7c9d-x1 is ready with a valid certificate",
        "✔ the proxy of default/echo-5f6b-y2 is ready with a valid certificate",
        "all checks passed",
    ]
    assert len([line for line in lines if "trust anchor(s)" in line]) == 2
    assert len([line for line in lines if "the webhook in" in line]) == 1


async def test_a_pod_created_without_its_proxy_fails_the_check_with_the_fix(mesh: CheckedMesh) -> None:
    legacy = meshed_pod("legacy-1a2b-z3", "legacy", "1a2b")
    del legacy["metadata"]["labels"][a.INJECTED]
    legacy["metadata"]["annotations"] = {a.INJECT: a.INJECT_ENABLED}
    mesh.fake.put(legacy)

    code, lines = await kuberpc_check(mesh)

    assert code == 1
    i = lines.index("✘ default/legacy-1a2b-z3 asks for a proxy (kuberpc.io/inject: enabled) but has none")
    assert lines[i + 1].startswith("    fix: it was created before it asked or while the injector did not answer")
    assert lines[-1] == "1 check(s) failed"


async def test_a_finished_job_pod_whose_proxy_is_gone_is_not_checked(mesh: CheckedMesh) -> None:
    done = meshed_pod("migrate-once-q1", "migrate", "q1")  # served by no proxy: its pod proxy would answer 503
    done["metadata"]["annotations"][a.INJECT] = a.INJECT_ENABLED
    done["status"]["phase"] = "Succeeded"
    mesh.fake.put(done)

    code, lines = await kuberpc_check(mesh)

    assert code == 0, lines
    assert not any("migrate-once-q1" in line for line in lines)


async def test_a_proxy_whose_certificate_has_expired_fails_the_check(mesh: CheckedMesh) -> None:
    code, lines = await kuberpc_check(mesh, now=time.time() + 2 * DAY)  # workload certificates live 24 h

    assert code == 1
    assert any(
        line.startswith("✘ the proxy of default/client-7c9d-x1 has an expired certificate (since ")
        for line in lines
    )


async def test_missing_trust_anchors_and_an_unready_control_plane_fail_the_check(mesh: CheckedMesh) -> None:
    mesh.fake.put(webhook_pod(ready=False))
    elsewhere = meshed_pod("other-9f8e-q1", "other", "9f8e")
    elsewhere["metadata"]["namespace"] = "shop"  # meshed, but nobody published the anchors there
    mesh.fake.put(elsewhere)

    code, lines = await kuberpc_check(mesh, "-A")

    assert code == 1
    assert "✘ no kuberpc-webhook pod is ready in kuberpc-system" in lines
    assert "✘ shop/kuberpc-trust-anchors is missing" in lines


async def test_a_pod_of_a_namespace_that_opted_in_by_label_and_has_no_proxy_fails_the_check(mesh: CheckedMesh) -> None:
    Forwarding.opted_in = {"shop"}  # kubectl label namespace shop kuberpc.io/inject=enabled
    before = meshed_pod("cart-1a2b-z3", "cart", "1a2b")
    before["metadata"]["namespace"] = "shop"
    del before["metadata"]["labels"][a.INJECTED]
    before["metadata"]["annotations"] = {}
    says_no = meshed_pod("batch-1a2b-z4", "batch", "1a2b")
    says_no["metadata"]["namespace"] = "shop"
    del says_no["metadata"]["labels"][a.INJECTED]
    says_no["metadata"]["annotations"] = {a.INJECT: "disabled"}  # the pod's annotation wins over the label
    mesh.fake.put(before, says_no)

    code, lines = await kuberpc_check(mesh, "-A")

    assert code == 1
    failed = [line for line in lines if line.startswith("✘")]
    assert failed == ["✘ shop/cart-1a2b-z3 asks for a proxy (namespace label kuberpc.io/inject=enabled) but has none"]


async def test_a_webhook_serving_a_certificate_its_ca_bundle_does_not_trust_fails_the_check(mesh: CheckedMesh) -> None:
    mesh.control_plane.mwc = mwc(pki.create_ca(trust_domain=None, common_name="another CA", now=dt.datetime.now(dt.UTC)).cert_pem)

    code, lines = await kuberpc_check(mesh)

    assert code == 1
    i = next(i for i, line in enumerate(lines) if line.startswith(f"✘ the webhook in kuberpc-system/{WEBHOOK_POD} serves "
                                                                    "a certificate its caBundle does not trust"))
    assert lines[i + 1] == "    fix: python -m webhook install | kubectl apply -f - (it makes the CA, the certificate and the bundle together)"


async def test_a_control_plane_whose_ports_do_not_answer_fails_the_check_naming_them(mesh: CheckedMesh) -> None:
    Forwarding.ports = {}

    code, lines = await kuberpc_check(mesh)

    assert code == 1
    assert f"✘ the webhook in kuberpc-system/{WEBHOOK_POD} does not answer (port-forward to kuberpc-system/{WEBHOOK_POD}:8443: HTTP 404 Not Found)" in lines
    assert any(line.startswith(f"✘ the identity service in kuberpc-system/{WEBHOOK_POD} does not answer as it should (UNREACHABLE: ")
               for line in lines)
    assert any(line.startswith(f"✘ the discovery service in kuberpc-system/{WEBHOOK_POD} does not answer (")
               for line in lines)


async def test_a_discovery_port_that_serves_clients_without_a_mesh_certificate_fails_the_check(mesh: CheckedMesh) -> None:
    # The identity service's port: TLS with the mesh's certificate for the same name, but no client certificate asked.
    Forwarding.ports[8082] = Forwarding.ports[8081]

    code, lines = await kuberpc_check(mesh)

    assert code == 1
    i = lines.index(f"✘ the discovery service in kuberpc-system/{WEBHOOK_POD} serves clients without a mesh certificate")
    assert lines[i + 1] == f"    fix: kubectl -n kuberpc-system logs {WEBHOOK_POD} -c webhook"


async def test_a_discovery_port_whose_certificate_the_trust_anchors_do_not_vouch_for_fails_the_check(
    mesh: CheckedMesh, tmp_path: Path
) -> None:
    other = DiscoveryPki(*(lambda ca: (ca.key_pem, ca.cert_pem))(pki.create_ca(trust_domain=TD, common_name="another mesh CA")))
    async with discovery_replica(mesh.fake, other) as stranger:
        Forwarding.ports[8082] = f"127.0.0.1:{stranger.port}"
        code, lines = await kuberpc_check(mesh)

    assert code == 1
    assert any(line.startswith(f"✘ the discovery service in kuberpc-system/{WEBHOOK_POD} serves a certificate the trust "
                               "anchors do not vouch for") for line in lines), lines


async def test_a_missing_webhook_configuration_fails_the_check(mesh: CheckedMesh) -> None:
    mesh.control_plane.mwc = None

    code, lines = await kuberpc_check(mesh)

    assert code == 1
    assert f"✘ MutatingWebhookConfiguration {a.WEBHOOK_CONFIGURATION} is missing: no pod gets a proxy" in lines


def access_reviews(fake: FakeCluster, denied: set[str]) -> list[dict[str, Any]]:
    """Answers SelfSubjectAccessReviews: allowed unless the resource is in `denied`; returns what was asked."""
    asked: list[dict[str, Any]] = []

    async def review(request: kmock.Request) -> dict[str, Any]:
        body = request.data
        assert isinstance(body, dict)
        attrs = body["spec"]["resourceAttributes"]
        asked.append(attrs)
        return {**body, "status": {"allowed": attrs["resource"] not in denied}}

    fake.handler["post /apis/authorization.k8s.io/v1/selfsubjectaccessreviews"] << review
    return asked


async def test_pre_asks_the_api_server_whether_you_may_create_what_install_creates(mesh: CheckedMesh) -> None:
    asked = access_reviews(mesh.fake, denied=set())

    code, lines = await kuberpc_check(mesh, "--pre")

    assert (code, lines) == (0, [
        "✔ the API server answers (Kubernetes 1.30)",
        "✔ you may create everything kuberpc install creates (10 kinds)",
        "all checks passed",
    ])
    assert {(r["verb"], r.get("group", ""), r["resource"], r.get("namespace")) for r in asked} >= {
        ("create", "admissionregistration.k8s.io", "mutatingwebhookconfigurations", None),
        ("create", "", "secrets", "kuberpc-system"),
        ("create", "rbac.authorization.k8s.io", "clusterrolebindings", None),
    }


async def test_pre_fails_naming_what_you_may_not_create(mesh: CheckedMesh) -> None:
    access_reviews(mesh.fake, denied={"clusterroles", "mutatingwebhookconfigurations"})

    code, lines = await kuberpc_check(mesh, "--pre")

    assert code == 1
    assert lines[1] == "✘ you may not create clusterroles.rbac.authorization.k8s.io, mutatingwebhookconfigurations.admissionregistration.k8s.io"
    assert lines[2].startswith("    fix: install as a cluster administrator")


def test_check_knows_how_to_ask_about_every_kind_install_creates() -> None:
    docs = install.render(install.default_manifests_dir(), namespaces=["shop"], now=dt.datetime.now(dt.UTC))

    assert {str(d["kind"]) for d in docs} <= set(check.INSTALL_RESOURCES)


async def test_an_unreachable_api_server_fails_the_first_check(mesh: CheckedMesh) -> None:
    await mesh.fake.stop()

    code, lines = await kuberpc_check(mesh)

    assert code == 1 and lines[0] == "✘ the API server does not answer"


# ---- the rules on made-up facts -------------------------------------------------------------------

NOW = dt.datetime(2026, 12, 6, 20, 0, tzinfo=dt.UTC)


def test_a_cluster_older_than_endpointslice_v1_is_refused() -> None:
    assert not check.api_version((1, 20)).ok
    assert check.api_version((1, 21)).ok


def anchor_pem(mesh_certs: MeshCerts) -> str:
    return Path(mesh_certs.client.ca).read_text()


def test_trust_anchors_expiring_within_a_month_fail(mesh_certs: MeshCerts) -> None:
    pem = anchor_pem(mesh_certs)
    expiry = x509.load_pem_x509_certificate(pem.encode()).not_valid_after_utc

    assert check.trust_anchors("default", pem, expiry - dt.timedelta(days=40)).ok
    soon = check.trust_anchors("default", pem, expiry - dt.timedelta(days=10))
    assert not soon.ok and soon.fix == "rotate the mesh CA now"
    assert not check.trust_anchors("default", pem, expiry + dt.timedelta(days=1)).ok
    assert not check.trust_anchors("default", "not a pem", NOW).ok


def test_a_ready_proxy_without_a_certificate_fails() -> None:
    assert not check.proxy("default", "p", True, None, NOW).ok
    assert not check.proxy("default", "p", False, NOW.timestamp() + DAY, NOW).ok
    assert check.proxy("default", "p", True, NOW.timestamp() + DAY, NOW).ok
