"""`kuberpc stat` and `kuberpc proxy-status` against a fake API server (tests/kubefake.py, kmock) whose
pod proxy reaches real proxies on loopback, as the API server's pods/proxy reaches a pod's admin port.

The commands run in a thread (the kubernetes client is synchronous) while the fake, the proxies and the
calls run in the test's event loop. The entry point is `main`, as `kuberpc` and `kubectl kuberpc` call it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import kmock
import pytest

from tests.kubefake import FakeCluster, cluster, kubeconfig
from tests.sidecar.harness import (
    Backend,
    MeshCerts,
    Pair,
    RunningProxy,
    backend,
    mesh_certs,
    run_pair,
    wait_for,
)
from tests.sidecar.test_mesh import channel
from webhook import annotations as a
from webhook.cli.main import main

__all__ = ["backend", "cluster", "mesh_certs"]  # fixtures used below

CREATED = "2026-12-06T18:00:00Z"
NOW = 1_796_587_200.0  # 2026-12-06T20:00:00Z: the pods are 2 h old


def meshed_pod(name: str, deployment: str, template_hash: str, *, ready: bool = True) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "default",
            "creationTimestamp": CREATED,
            "labels": {
                "app": deployment,
                "pod-template-hash": template_hash,
                a.INJECTED: a.INJECTED_LABEL_VALUE,
            },
            "annotations": {a.INJECTED: "0.1.0"},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": f"{deployment}-{template_hash}",
                    "uid": f"uid-{name}",
                    "controller": True,
                }
            ],
        },
        "spec": {"containers": [{"name": "app", "image": "app:1"}]},
        "status": {
            "phase": "Running",
            "initContainerStatuses": [
                {
                    "name": a.PROXY_CONTAINER,
                    "ready": ready,
                    "restartCount": 0,
                    "image": "proxy",
                    "imageID": "proxy",
                    "state": {},
                }
            ],
        },
    }


@dataclass
class Mesh:
    pair: Pair
    fake: FakeCluster
    kubeconfig: Path


def serve_pod_proxy(fake: FakeCluster, pod: str, proxy: RunningProxy | None) -> None:
    """GET .../pods/POD:15090/proxy/metrics as the API server answers it: the pod's own /metrics, or 503."""

    async def metrics(request: kmock.Request) -> kmock.Response:
        if proxy is None:
            raise kmock.KubernetesError(status=503, reason="ServiceUnavailable", message="no endpoints")
        async with aiohttp.ClientSession() as session, session.get(f"http://{proxy.admin}/metrics") as resp:
            body = await resp.read()
            content_type = resp.headers["Content-Type"]
        return kmock.Response(payload=body, headers={"Content-Type": content_type})

    fake.handler[f"get /api/v1/namespaces/default/pods/{pod}:{a.ADMIN_PORT}/proxy/metrics"] << metrics


@pytest.fixture
async def mesh(
    cluster: FakeCluster, mesh_certs: MeshCerts, backend: Backend, tmp_path: Path
) -> AsyncIterator[Mesh]:
    async with run_pair(mesh_certs, backend.port, tmp_path) as pair:
        cluster.put(
            meshed_pod("client-7c9d-x1", "client", "7c9d"), meshed_pod("echo-5f6b-y2", "echo", "5f6b")
        )
        serve_pod_proxy(cluster, "client-7c9d-x1", pair.client_side)
        serve_pod_proxy(cluster, "echo-5f6b-y2", pair.server_side)
        yield Mesh(pair, cluster, kubeconfig(tmp_path / "kubeconfig", cluster.url))


async def kuberpc(
    mesh: Mesh, *args: str, sleep: Callable[[float], None] = time.sleep
) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(
        main,
        [*args, "--kubeconfig", str(mesh.kubeconfig)],
        sleep=sleep,
        clock=lambda: NOW,
        stdout=out,
        stderr=err,
    )
    return code, out.getvalue(), err.getvalue()


def served(p: RunningProxy, n: int) -> Callable[[], bool]:
    """The server-side proxy has finished `n` calls (its duration histogram counts them)."""
    labels = {"direction": "inbound", "service": "echo.default", "method": "/test.Echo/Unary"}
    return lambda: p.proxy.registry.get_sample_value("kuberpc_request_duration_seconds_count", labels) == n


async def test_stat_deploy_shows_the_calls_each_workload_served_in_the_window(mesh: Mesh) -> None:
    scraped_once, loaded = threading.Event(), threading.Event()

    def between_scrapes(seconds: float) -> None:
        assert seconds == 5
        scraped_once.set()
        assert loaded.wait(30), "the test never made its calls"

    command = asyncio.create_task(
        kuberpc(mesh, "stat", "deploy", "-o", "json", "--window", "5", sleep=between_scrapes)
    )
    assert await asyncio.to_thread(scraped_once.wait, 30)
    async with channel(mesh.pair.target) as ch:
        for i in range(20):
            md = (("x-status", "NOT_FOUND"),) if i % 4 == 0 else ()
            with pytest.raises(grpc.aio.AioRpcError) if md else contextlib.nullcontext():
                await ch.unary_unary("/test.Echo/Unary")(b"x", metadata=md, timeout=10)
    await wait_for(served(mesh.pair.server_side, 20), "the server proxy to count every call")
    loaded.set()
    code, out, err = await command

    assert (code, err) == (0, "")
    rows = {r["name"]: r for r in json.loads(out)["items"]}
    assert rows.keys() == {"client", "echo"}
    echo = rows["echo"]
    assert (echo["calls"], echo["success"], echo["rps"], echo["meshed"]) == (20, 0.75, 4.0, "1/1")
    assert 0 < echo["latency_seconds"]["p50"] <= echo["latency_seconds"]["p99"] < 10
    assert (rows["client"]["calls"], rows["client"]["success"]) == (0, None)  # it served nothing


async def test_stat_svc_and_a_name_narrow_the_table_to_a_service_idle_in_the_window(mesh: Mesh) -> None:
    async with channel(mesh.pair.target) as ch:
        await ch.unary_unary("/test.Echo/Unary")(b"x", timeout=10)  # before the window
    await wait_for(served(mesh.pair.server_side, 1), "the server proxy to count the call")

    code, out, _ = await kuberpc(mesh, "stat", "svc", "echo", "--window", "1", sleep=lambda s: None)

    lines = out.splitlines()
    assert code == 0
    assert lines[0].split() == [
        "NAME",
        "MESHED",
        "SUCCESS",
        "RPS",
        "LATENCY_P50",
        "LATENCY_P95",
        "LATENCY_P99",
    ]
    assert lines[1].split() == ["echo", "1/1", "-", "0.0", "-", "-", "-"]


async def test_stat_of_an_unknown_name_fails_and_an_unknown_kind_is_a_usage_error(mesh: Mesh) -> None:
    code, _, err = await kuberpc(mesh, "stat", "deploy", "nope", sleep=lambda s: None)
    assert code == 1 and "no meshed deploy named 'nope'" in err

    code, _, err = await kuberpc(mesh, "stat", "cronjobs", sleep=lambda s: None)
    assert code == 2 and "unknown kind 'cronjobs'" in err


async def test_proxy_status_lists_every_meshed_pod_with_what_its_proxy_reports(mesh: Mesh) -> None:
    code, out, err = await kuberpc(mesh, "proxy-status", "-o", "json")

    assert (code, err) == (0, "")
    rows = {r["name"]: r for r in json.loads(out)["items"]}
    assert rows.keys() == {"client-7c9d-x1", "echo-5f6b-y2"}
    client = rows["client-7c9d-x1"]
    assert (client["workload"], client["version"], client["ready"], client["reachable"]) == (
        "deploy/client",
        "0.1.0",
        True,
        True,
    )
    assert client["services_with_endpoints"] == ["echo.default"]
    assert client["discovery_updates"] >= 1
    assert client["cert_expiry"] > time.time()
    assert client["age_seconds"] == 7200


async def test_proxy_status_fails_when_a_proxy_is_not_ready_or_cannot_be_read(mesh: Mesh) -> None:
    mesh.fake.put(meshed_pod("stuck-1a2b-z3", "stuck", "1a2b", ready=False))
    serve_pod_proxy(mesh.fake, "stuck-1a2b-z3", None)

    code, out, err = await kuberpc(mesh, "proxy-status")

    stuck = next(line.split() for line in out.splitlines() if line.startswith("stuck-"))
    assert code == 1
    assert stuck[:4] == ["stuck-1a2b-z3", "0.1.0", "false", "?"]
    assert "reading the proxy metrics of default/stuck-1a2b-z3: HTTP 503" in err


async def test_an_unreachable_api_server_is_an_error_naming_what_failed(mesh: Mesh) -> None:
    await mesh.fake.stop()

    code, _, err = await kuberpc(mesh, "proxy-status")

    assert code == 1 and err.startswith("kuberpc proxy-status: listing meshed pods: ")
