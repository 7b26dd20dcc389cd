"""The Kubernetes adapter against a fake API server on loopback: /version and namespace labels."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from kubernetes import client

from webhook.kube import NamespaceLabels, NamespaceLookupError, fetch_version

VERSION = {
    "major": "1",
    "minor": "29+",
    "gitVersion": "v1.29.4-eks-036c24b",
    "gitCommit": "abc",
    "gitTreeState": "clean",
    "buildDate": "2026-01-01T00:00:00Z",
    "goVersion": "go1.21.9",
    "compiler": "gc",
    "platform": "linux/amd64",
}


@dataclass
class FakeAPI:
    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)
    status: int = 200
    requests: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        async def version(_: web.Request) -> web.Response:
            return web.json_response(VERSION)

        async def namespace(request: web.Request) -> web.Response:
            name = request.match_info["name"]
            self.requests.append(name)
            if self.status != 200:
                return web.json_response({"kind": "Status", "code": self.status}, status=self.status)
            if name not in self.namespaces:
                return web.json_response({"kind": "Status", "code": 404, "reason": "NotFound"}, status=404)
            return web.json_response(
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": self.namespaces[name]}}
            )

        app = web.Application()
        app.router.add_get("/version", version)
        app.router.add_get("/version/", version)
        app.router.add_get("/api/v1/namespaces/{name}", namespace)
        return app


@pytest.fixture
async def api() -> AsyncIterator[tuple[FakeAPI, client.ApiClient]]:
    fake = FakeAPI()
    async with TestServer(fake.app(), host="127.0.0.1") as served:
        host, port = served.host, served.port
        conf = client.Configuration()
        conf.host = f"http://{host}:{port}"
        with client.ApiClient(conf) as api_client:
            yield fake, api_client


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_the_server_version_is_read_even_with_a_provider_suffix(api: tuple[FakeAPI, client.ApiClient]) -> None:
    assert await fetch_version(api[1]) == (1, 29)


async def test_namespace_labels_are_returned(api: tuple[FakeAPI, client.ApiClient]) -> None:
    fake, api_client = api
    fake.namespaces["shop"] = {"kuberpc.io/inject": "enabled"}
    assert await NamespaceLabels(api_client)("shop") == {"kuberpc.io/inject": "enabled"}


async def test_a_missing_namespace_has_no_labels(api: tuple[FakeAPI, client.ApiClient]) -> None:
    assert await NamespaceLabels(api[1])("gone") == {}


async def test_an_api_error_is_a_lookup_error(api: tuple[FakeAPI, client.ApiClient]) -> None:
    api[0].status = 500
    with pytest.raises(NamespaceLookupError, match="HTTP 500"):
        await NamespaceLabels(api[1])("shop")


async def test_labels_are_cached_for_the_ttl_then_read_again(api: tuple[FakeAPI, client.ApiClient]) -> None:
    fake, api_client = api
    fake.namespaces["shop"] = {"a": "1"}
    clock = FakeClock()
    labels = NamespaceLabels(api_client, ttl=5.0, clock=clock)
    await labels("shop")
    fake.namespaces["shop"] = {"a": "2"}
    clock.now += 4.9
    assert await labels("shop") == {"a": "1"}
    clock.now += 0.2
    assert await labels("shop") == {"a": "2"}
    assert fake.requests == ["shop", "shop"]


async def test_without_credentials_every_lookup_fails() -> None:
    with pytest.raises(NamespaceLookupError, match="no Kubernetes credentials"):
        await NamespaceLabels(None)("shop")


async def test_an_unreachable_api_is_a_lookup_error() -> None:
    conf = client.Configuration()
    conf.host = "http://127.0.0.1:9"  # discard port: nothing listens
    with client.ApiClient(conf) as api_client:
        with pytest.raises(NamespaceLookupError):
            await NamespaceLabels(api_client, timeout=2.0)("shop")
