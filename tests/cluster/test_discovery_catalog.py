"""The control plane's catalog on the real API server: its three watches (list, then watch with bookmarks from the
list's resourceVersion) follow Services and EndpointSlices as kubectl changes them, and a relist forced by a
410 (an API server restart forgets every watch) loses nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Callable

import pytest

from sidecar.discovery.watch import Backoff, load_credentials
from sidecar.model import ServiceKey
from tests.cluster.conftest import Kube
from webhook.catalog import MeshCatalog

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]
NS = "catalog-real"


def slice_json(addresses: list[str]) -> str:
    return json.dumps(
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "echo-a",
                "namespace": NS,
                "labels": {"kubernetes.io/service-name": "echo", "endpointslice.kubernetes.io/managed-by": "tests"},
            },
            "addressType": "IPv4",
            "ports": [{"name": "grpc", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses],
        }
    )


def test_the_catalog_follows_the_real_api_server_through_a_restart(kube: Kube) -> None:
    kube.kubectl("create", "namespace", NS)
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "echo", "namespace": NS, "annotations": {"kuberpc.io/lb": "round-robin"}},
        "spec": {"ports": [{"name": "grpc", "port": 50051, "protocol": "TCP"}]},  # no selector: our slices
    }
    kube.kubectl("apply", "-f", "-", input=json.dumps(service))
    kube.kubectl("apply", "-f", "-", input=slice_json(["10.20.0.1", "10.20.0.2"]))
    echo = ServiceKey("echo", NS)

    async def run() -> None:
        catalog = MeshCatalog()
        creds = await asyncio.to_thread(load_credentials, kubeconfig=str(kube.cp.kubeconfig))
        task = asyncio.create_task(
            catalog.run(creds, rng=random.Random(1), clock=time.monotonic, backoff=Backoff(base=0.2, cap=2.0))
        )

        async def until(pred: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
            deadline = time.monotonic() + timeout
            while not pred():
                assert not task.done(), task
                assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
                await asyncio.sleep(0.05)

        def addresses() -> list[str]:
            es = catalog.get(echo)
            return sorted(e.address for e in es.endpoints) if es is not None else []

        try:
            async with asyncio.timeout(30):
                await catalog.synced.wait()
            assert addresses() == ["10.20.0.1", "10.20.0.2"]
            es = catalog.get(echo)
            assert es is not None and es.policy.lb == "round-robin"
            # A change arrives by watch and rebuilds its Service once. (Not the global count: the session's
            # other tests keep pods of other namespaces changing meanwhile, and those rebuild their Services.)
            rebuilds = catalog.rebuilds_of[echo]
            await asyncio.to_thread(kube.kubectl, "apply", "-f", "-", input=slice_json(["10.20.0.3"]))
            await until(lambda: addresses() == ["10.20.0.3"], "the slice change")
            assert catalog.rebuilds_of[echo] - rebuilds == 1
            # The API server restarts: the watches break, resume or relist, and a change made meanwhile arrives.
            await asyncio.to_thread(kube.cp.restart_apiserver)
            started = time.monotonic()
            await asyncio.to_thread(kube.kubectl, "apply", "-f", "-", input=slice_json(["10.20.0.4", "10.20.0.5"]))
            written = time.monotonic()
            await until(lambda: addresses() == ["10.20.0.4", "10.20.0.5"], "the change after the restart", 60)
            print(
                f"after the API server restart: kubectl apply took {written - started:.2f} s, "
                f"the catalog had the change {time.monotonic() - written:.2f} s after it returned"
            )
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    try:
        asyncio.run(run())
    finally:
        kube.kubectl("delete", "namespace", NS, "--wait=false", check=False)
