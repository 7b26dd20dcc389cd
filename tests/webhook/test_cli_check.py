"""`kuberpc check`: ✔ for what holds, ✘ with the fix for what does not, exit 1 on any ✘; against a fake
API server whose pod proxy reaches real proxies on loopback, and the checks' pure rules on made-up facts."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.kubefake import FakeCluster, cluster, kubeconfig
from tests.sidecar.harness import Backend, MeshCerts, backend, mesh_certs, run_pair
from tests.webhook.test_cli_cluster import Mesh, meshed_pod, serve_pod_proxy
from webhook import annotations as a
from webhook.cli import check
from webhook.cli.main import main

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


@pytest.fixture
async def mesh(
    cluster: FakeCluster, mesh_certs: MeshCerts, backend: Backend, tmp_path: Path
) -> AsyncIterator[Mesh]:
    """A healthy mesh: a ready control plane, trust anchors where pods are meshed, two ready proxies."""
    # The kubernetes client asks for /version/ (with the slash), which kmock does not serve by itself.
    cluster.handler["get /version/"] << VERSION
    async with run_pair(mesh_certs, backend.port, tmp_path) as pair:
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
        anchors = anchor_pem(mesh_certs)
        for ns in ("kuberpc-system", "default"):
            publish_anchors(cluster, ns, anchors)
        yield Mesh(pair, cluster, kubeconfig(tmp_path / "kubeconfig", cluster.url))


async def kuberpc_check(mesh: Mesh, *args: str, now: float | None = None) -> tuple[int, list[str]]:
    out = io.StringIO()
    code = await asyncio.to_thread(
        main,
        ["check", *args, "--kubeconfig", str(mesh.kubeconfig)],
        clock=(lambda: now) if now is not None else time.time,
        stdout=out,
        stderr=io.StringIO(),
    )
    return code, out.getvalue().splitlines()


async def test_a_healthy_mesh_passes_every_check(mesh: Mesh) -> None:
    code, lines = await kuberpc_check(mesh)

    assert code == 0, lines
    assert lines == [
        "✔ the API server answers (Kubernetes 1.30)",
        "✔ the control plane is ready (1/1 kuberpc-webhook pods in kuberpc-system)",
        *[line for line in lines if "kuberpc-trust-anchors: 1 trust anchor(s), valid until" in line],
        "✔ every pod asking for a proxy has one (2)",
        "✔ the proxy of default/client-7c9d-x1 is ready with a valid certificate",
        "✔ the proxy of default/echo-5f6b-y2 is ready with a valid certificate",
        "all checks passed",
    ]
    assert len([line for line in lines if "trust anchor(s)" in line]) == 2


async def test_a_pod_created_without_its_proxy_fails_the_check_with_the_fix(mesh: Mesh) -> None:
    legacy = meshed_pod("legacy-1a2b-z3", "legacy", "1a2b")
    del legacy["metadata"]["labels"][a.INJECTED]
    legacy["metadata"]["annotations"] = {a.INJECT: a.INJECT_ENABLED}
    mesh.fake.put(legacy)

    code, lines = await kuberpc_check(mesh)

    assert code == 1
    i = lines.index("✘ default/legacy-1a2b-z3 asks for a proxy (kuberpc.io/inject: enabled) but has none")
    assert lines[i + 1].startswith("    fix: it was created while the injector did not answer")
    assert lines[-1] == "1 check(s) failed"


async def test_a_proxy_whose_certificate_has_expired_fails_the_check(mesh: Mesh) -> None:
    code, lines = await kuberpc_check(mesh, now=time.time() + 2 * DAY)  # workload certificates live 24 h

    assert code == 1
    assert any(
        line.startswith("✘ the proxy of default/client-7c9d-x1 has an expired certificate (since ")
        for line in lines
    )


async def test_missing_trust_anchors_and_an_unready_control_plane_fail_the_check(mesh: Mesh) -> None:
    mesh.fake.put(webhook_pod(ready=False))
    elsewhere = meshed_pod("other-9f8e-q1", "other", "9f8e")
    elsewhere["metadata"]["namespace"] = "shop"  # meshed, but nobody published the anchors there
    mesh.fake.put(elsewhere)

    code, lines = await kuberpc_check(mesh, "-A")

    assert code == 1
    assert "✘ no kuberpc-webhook pod is ready in kuberpc-system" in lines
    assert "✘ shop/kuberpc-trust-anchors is missing" in lines


async def test_pre_checks_only_what_must_hold_before_installing(mesh: Mesh) -> None:
    code, lines = await kuberpc_check(mesh, "--pre")

    assert (code, lines) == (0, ["✔ the API server answers (Kubernetes 1.30)", "all checks passed"])


async def test_an_unreachable_api_server_fails_the_first_check(mesh: Mesh) -> None:
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
