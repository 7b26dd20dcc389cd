"""Shared fixtures for the webhook tests: API-server-shaped reviews, configs, certificates, a live server."""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import json
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import pytest
import uvloop
from prometheus_client import CollectorRegistry

from sidecar import pki
from sidecar.pki import KeyPair
from webhook.config import InjectorConfig
from webhook.install import service_dns_names
from webhook.kube import NamespaceLookupError
from webhook.metrics import WebhookMetrics
from webhook.patch import Outcome
from webhook.server import CertReloader, create_app, serving

FIXTURES = Path(__file__).parent / "fixtures"
SERVER_NAME = "kuberpc-webhook.kuberpc-system.svc"


# The webhook serves on uvloop (python -m webhook) and its HTTP layer must also hold on asyncio's own loop:
# the tests of that layer and of the server over HTTPS run on both.
BOTH_LOOPS = {"test_server.py"}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    if item.path.name in BOTH_LOOPS:
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}  # the hook must name a loop for every test: the default one


@pytest.fixture
def review() -> Callable[[str], dict[str, Any]]:
    """A fresh copy of a recorded AdmissionReview from fixtures/ (by file stem)."""
    cache: dict[str, dict[str, Any]] = {}

    def load(name: str) -> dict[str, Any]:
        if name not in cache:
            cache[name] = json.loads((FIXTURES / f"{name}.json").read_text())
        return copy.deepcopy(cache[name])

    return load


@pytest.fixture
def native_cfg() -> InjectorConfig:
    return InjectorConfig(kubernetes_version=(1, 30), version="0.1.0", image="ghcr.io/kuberpc/proxy:0.1.0")


@pytest.fixture
def legacy_cfg() -> InjectorConfig:
    return InjectorConfig(kubernetes_version=(1, 27), version="0.1.0", image="ghcr.io/kuberpc/proxy:0.1.0")


@pytest.fixture
def apply() -> Callable[[Mapping[str, Any], Outcome], dict[str, Any]]:
    """The Pod after the outcome's patch, applied the way the API server does (RFC 6902)."""

    def run(pod: Mapping[str, Any], outcome: Outcome) -> dict[str, Any]:
        result: dict[str, Any] = jsonpatch.apply_patch(copy.deepcopy(dict(pod)), list(outcome.patch))
        return result

    return run


def make_serving_pair(tmp: Path, *, name: str = "serving") -> tuple[KeyPair, Path, Path]:
    now = dt.datetime.now(dt.UTC)
    ca = pki.create_ca(trust_domain=None, common_name=f"test CA {name}", now=now)
    pair = pki.issue_serving(ca, service_dns_names(), now=now)
    cert, key = tmp / "tls.crt", tmp / "tls.key"
    cert.write_bytes(pair.cert_pem)
    key.write_bytes(pair.key_pem)
    (tmp / f"{name}-ca.pem").write_bytes(ca.cert_pem)
    return ca, cert, key


@pytest.fixture
def serving_files(tmp_path: Path) -> tuple[KeyPair, Path, Path]:
    """(CA, cert path, key path) of a serving certificate for the webhook Service's DNS name."""
    return make_serving_pair(tmp_path)


@dataclass
class FakeNamespaces:
    """Namespace labels as the API would return them; `broken` makes every lookup fail, `crash` with a bug,
    `entered`/`release` hold it until the test lets it go."""

    labels: dict[str, dict[str, str]] = field(default_factory=dict)
    broken: bool = False
    crash: bool = False
    lookups: list[str] = field(default_factory=list)
    # When set, each lookup signals `entered` and waits for `release`: an answer held in flight.
    entered: asyncio.Event | None = None
    release: asyncio.Event | None = None

    async def __call__(self, name: str) -> Mapping[str, str]:
        self.lookups.append(name)
        if self.entered is not None and self.release is not None:
            self.entered.set()
            await self.release.wait()
        if self.broken:
            raise NamespaceLookupError(f"reading namespace {name}: HTTP 500")
        if self.crash:
            raise RuntimeError("a bug")
        return self.labels.get(name, {})


@dataclass
class LiveServer:
    base: str
    client_ssl: ssl.SSLContext
    session: aiohttp.ClientSession
    namespaces: FakeNamespaces
    registry: CollectorRegistry

    async def post(self, path: str, body: bytes | str | dict[str, Any]) -> aiohttp.ClientResponse:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        return await self.session.post(
            self.base + path,
            data=data,
            ssl=self.client_ssl,
            server_hostname=SERVER_NAME,
            headers={"Content-Type": "application/json"},
        )

    async def get(self, path: str) -> aiohttp.ClientResponse:
        return await self.session.get(self.base + path, ssl=self.client_ssl, server_hostname=SERVER_NAME)


def client_context(ca_pem: bytes) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    return ctx


@pytest.fixture
async def live_server(
    serving_files: tuple[KeyPair, Path, Path], native_cfg: InjectorConfig
) -> AsyncIterator[LiveServer]:
    """The real aiohttp app over HTTPS on 127.0.0.1, an ephemeral port, and a certificate reloader."""
    ca, cert, key = serving_files
    registry = CollectorRegistry()
    namespaces = FakeNamespaces()
    app = create_app(cfg=native_cfg, metrics=WebhookMetrics(registry), namespace_labels=namespaces)
    reloader = CertReloader(str(cert), str(key))
    async with (
        serving(app, host="127.0.0.1", port=0, ssl_context=reloader.context) as (host, port),
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
    ):
        yield LiveServer(f"https://{host}:{port}", client_context(ca.cert_pem), session, namespaces, registry)
