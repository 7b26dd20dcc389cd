"""The trust-anchor controller against a fake API server: list, watch, create, correct, relist on 410."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from kubernetes import client

from sidecar.discovery.watch import Backoff
from webhook.trust import TrustAnchorSync, wants_trust_anchors

BUNDLE = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
ENABLED = {"kuberpc.io/inject": "enabled"}


def namespace(name: str, labels: dict[str, str], rv: int) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels, "resourceVersion": str(rv)}}


@dataclass
class FakeAPI:
    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)
    configmaps: dict[str, dict[str, str]] = field(default_factory=dict)  # namespace -> data
    events: asyncio.Queue[dict[str, Any] | None] = field(default_factory=asyncio.Queue)
    lists: int = 0
    writes: list[tuple[str, str]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    rv: int = 100
    fail_writes: int = 0  # answer this many writes with 500 first

    def app(self) -> web.Application:
        async def list_or_watch(request: web.Request) -> web.StreamResponse:
            assert "labelSelector" not in request.query  # every namespace is considered
            if request.query.get("watch") not in ("true", "True", "1"):
                self.lists += 1
                items = [namespace(n, labels, self.rv) for n, labels in self.namespaces.items()]
                return web.json_response({"kind": "NamespaceList", "apiVersion": "v1", "metadata": {"resourceVersion": str(self.rv)}, "items": items})
            resp = web.StreamResponse()
            await resp.prepare(request)
            try:
                async with asyncio.timeout(float(request.query["timeoutSeconds"])):
                    while (event := await self.events.get()) is not None:
                        await resp.write(json.dumps(event).encode() + b"\n")
            except TimeoutError:
                pass
            return resp

        async def read_cm(request: web.Request) -> web.Response:
            ns = request.match_info["ns"]
            if ns not in self.configmaps:
                return web.json_response({"kind": "Status", "apiVersion": "v1", "code": 404, "reason": "NotFound"}, status=404)
            return web.json_response(self.cm(ns))

        async def write_cm(request: web.Request) -> web.Response:
            ns = request.match_info["ns"]
            if self.fail_writes > 0:
                self.fail_writes -= 1
                self.writes.append(("FAILED", ns))
                return web.json_response({"kind": "Status", "apiVersion": "v1", "code": 500, "reason": "InternalError"}, status=500)
            body = await request.json()
            assert body["metadata"]["name"] == "kuberpc-trust-anchors"
            self.configmaps[ns] = body["data"]
            self.writes.append((request.method, ns))
            self.changed.set()
            return web.json_response(self.cm(ns), status=201 if request.method == "POST" else 200)

        app = web.Application()
        app.router.add_get("/api/v1/namespaces", list_or_watch)
        app.router.add_get("/api/v1/namespaces/{ns}/configmaps/kuberpc-trust-anchors", read_cm)
        app.router.add_put("/api/v1/namespaces/{ns}/configmaps/kuberpc-trust-anchors", write_cm)
        app.router.add_post("/api/v1/namespaces/{ns}/configmaps", write_cm)
        return app

    def cm(self, ns: str) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "kuberpc-trust-anchors", "namespace": ns, "resourceVersion": "7"},
            "data": self.configmaps[ns],
        }

    async def wait_for(self, *writes: tuple[str, str]) -> None:
        async with asyncio.timeout(10):
            while not set(writes) <= set(self.writes):
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeAPI, client.ApiClient]]:
    api = FakeAPI()
    async with TestServer(api.app(), host="127.0.0.1") as served:
        host, port = served.host, served.port
        conf = client.Configuration()
        conf.host = f"http://{host}:{port}"
        with client.ApiClient(conf) as api_client:
            yield api, api_client


def test_every_namespace_but_kubernetes_own_and_the_control_plane_wants_the_bundle() -> None:
    # A pod may opt in by annotation in an unlabelled namespace: its proxy needs the bundle there too.
    assert wants_trust_anchors(ENABLED, control_plane="kuberpc-system", name="shop")
    assert wants_trust_anchors({}, control_plane="kuberpc-system", name="shop")
    assert wants_trust_anchors(None, control_plane="kuberpc-system", name="shop")
    assert not wants_trust_anchors(ENABLED, control_plane="kuberpc-system", name="kuberpc-system")
    for system in ("kube-system", "kube-public", "kube-node-lease"):
        assert not wants_trust_anchors({}, control_plane="kuberpc-system", name=system)


async def test_ensure_creates_then_leaves_alone_then_corrects(fake: tuple[FakeAPI, client.ApiClient]) -> None:
    api, api_client = fake
    sync = TrustAnchorSync(api_client, bundle=BUNDLE)
    assert await asyncio.to_thread(sync.ensure, "shop") == "created"
    assert await asyncio.to_thread(sync.ensure, "shop") == "unchanged"
    api.configmaps["shop"] = {"ca.pem": "stale"}
    assert await asyncio.to_thread(sync.ensure, "shop") == "updated"
    assert api.configmaps["shop"] == {"ca.pem": BUNDLE}
    assert api.writes == [("POST", "shop"), ("PUT", "shop")]


async def test_run_covers_listed_and_new_namespaces_and_stops(fake: tuple[FakeAPI, client.ApiClient]) -> None:
    api, api_client = fake
    api.namespaces = {"shop": ENABLED, "plain": {}, "kuberpc-system": ENABLED, "kube-system": {}}
    api.configmaps["kuberpc-system"] = {"ca.pem": "from install"}
    stop = asyncio.Event()
    sync = TrustAnchorSync(api_client, bundle=BUNDLE, window_seconds=1)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(sync.run(stop))
        await api.wait_for(("POST", "shop"))
        await api.events.put({"type": "ADDED", "object": namespace("new", ENABLED, 101)})
        await api.wait_for(("POST", "new"))
        stop.set()
        await api.events.put(None)  # end the current watch window now
    assert task.done()
    assert {ns for _, ns in api.writes} == {"shop", "plain", "new"}
    assert api.configmaps["kuberpc-system"] == {"ca.pem": "from install"}


async def test_a_gone_watch_relists(fake: tuple[FakeAPI, client.ApiClient]) -> None:
    api, api_client = fake
    api.namespaces = {"shop": ENABLED}
    stop = asyncio.Event()
    sync = TrustAnchorSync(api_client, bundle=BUNDLE, window_seconds=1)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(sync.run(stop))
        await api.wait_for(("POST", "shop"))
        api.namespaces["late"] = ENABLED  # missed by the watch: only a relist finds it
        await api.events.put({"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"}})
        await api.wait_for(("POST", "late"))
        stop.set()
        await api.events.put(None)
    assert api.lists == 2


async def test_bookmarks_move_the_watch_on_without_a_relist(
    fake: tuple[FakeAPI, client.ApiClient], caplog: pytest.LogCaptureFixture
) -> None:
    # The client hands BOOKMARK objects over as plain dicts: reading them as Namespaces raised AttributeError.
    api, api_client = fake
    api.namespaces = {"shop": ENABLED}
    stop = asyncio.Event()
    sync = TrustAnchorSync(api_client, bundle=BUNDLE, window_seconds=5)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(sync.run(stop))
        await api.wait_for(("POST", "shop"))
        bookmark = {"kind": "Namespace", "apiVersion": "v1", "metadata": {"resourceVersion": "150"}}
        await api.events.put({"type": "BOOKMARK", "object": bookmark})
        await api.events.put({"type": "ADDED", "object": namespace("new", ENABLED, 151)})
        await api.wait_for(("POST", "new"))
        stop.set()
        await api.events.put(None)
    assert api.lists == 1
    assert not [r for r in caplog.records if "trust_anchors_error" in r.getMessage()]


async def test_a_failed_write_is_retried_with_backoff_and_the_watch_goes_on(
    fake: tuple[FakeAPI, client.ApiClient], caplog: pytest.LogCaptureFixture
) -> None:
    api, api_client = fake
    api.namespaces = {"shop": ENABLED}
    api.fail_writes = 2
    stop = asyncio.Event()
    sync = TrustAnchorSync(api_client, bundle=BUNDLE, window_seconds=5, backoff=Backoff(base=0.01, cap=0.05))
    async with asyncio.TaskGroup() as tg:
        tg.create_task(sync.run(stop))
        await api.wait_for(("POST", "shop"))
        await api.events.put({"type": "ADDED", "object": namespace("new", ENABLED, 151)})
        await api.wait_for(("POST", "new"))
        stop.set()
    assert api.writes[:2] == [("FAILED", "shop"), ("FAILED", "shop")] and api.lists == 1
    assert len([r for r in caplog.records if "event=trust_anchors_error namespace=shop status=500" in r.getMessage()]) == 2
