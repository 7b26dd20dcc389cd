"""Every dashboard query, evaluated by a real Prometheus (Debian's) scraping a real mesh under load:
each returns data, and none counts a call twice (checked against the client's own count of calls).

The mesh is the loopback pair of the proxy tests (caller -> outbound proxy -> mTLS -> inbound proxy ->
grpcio backend) plus the webhook's HTTPS server for the control-plane panels; Prometheus runs on
127.0.0.1 with its own data directory and scrapes them every second.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import re
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from prometheus_client import CollectorRegistry

from sidecar import pki
from tests.ports import free_port
from tests.sidecar.harness import Backend, MeshCerts, backend, mesh_certs, run_pair
from tests.sidecar.test_mesh import channel
from webhook.config import InjectorConfig
from webhook.install import service_dns_names
from webhook.metrics import WebhookMetrics
from webhook.server import CertReloader, create_app, serving

__all__ = ["backend", "mesh_certs"]  # fixtures used below

pytestmark = pytest.mark.slow

DASHBOARDS = sorted(
    (Path(__file__).resolve().parents[2] / "manifests" / "monitoring" / "dashboards").glob("*.json")
)
SERVICE = "echo.default"
PAYLOAD = b"x" * 100
FRAME = 5 + len(PAYLOAD)  # a gRPC message on the wire: 5-byte prefix and the payload
LOAD_SECONDS = 8.0  # long against the 1 s scrape interval, so that rate()'s edges matter little
MAX_CALLS = 4000
FAILING_EVERY = 10  # one call in ten asks the backend for NOT_FOUND
# rate() over a window extrapolates to its edges: within one scrape interval of LOAD_SECONDS. A query
# summing both proxies' reports would be at 2x.
TOLERANCE = 0.25
STARTUP_TIMEOUT = 30.0
# The webhook serves /metrics over HTTPS with a certificate of the test's own CA.
HTTPS = {"scheme": "https", "tls_config": {"insecure_skip_verify": True}}


@dataclass
class Load:
    started: float  # wall clock, as Prometheus' timestamps
    calls: int
    ok: int


async def make_load(target: str) -> Load:
    """Unary calls, sequential from 4 workers, for LOAD_SECONDS or MAX_CALLS, whichever comes first."""
    started = time.time()
    deadline = time.monotonic() + LOAD_SECONDS
    counts = {"calls": 0, "ok": 0}
    async with channel(target) as ch:
        method = ch.unary_unary("/test.Echo/Unary")

        async def worker() -> None:
            while time.monotonic() < deadline and counts["calls"] < MAX_CALLS:
                counts["calls"] += 1
                fail = counts["calls"] % FAILING_EVERY == 0
                md = (("x-status", "NOT_FOUND"),) if fail else ()
                try:
                    await method(PAYLOAD, metadata=md, timeout=10)
                    counts["ok"] += 1
                except grpc.aio.AioRpcError as e:
                    assert fail and e.code() == grpc.StatusCode.NOT_FOUND, e

        await asyncio.gather(*(worker() for _ in range(4)))
    return Load(started, counts["calls"], counts["ok"])


@contextlib.asynccontextmanager
async def webhook_server(tmp_path: Path) -> AsyncIterator[int]:
    """The injector's real HTTPS app on 127.0.0.1 (its /metrics feeds the control-plane dashboard)."""
    now = dt.datetime.now(dt.UTC)
    pair = pki.issue_serving(pki.create_ca(trust_domain=None, common_name="dashboard test CA", now=now), service_dns_names(), now=now)
    cert, key = tmp_path / "webhook.crt", tmp_path / "webhook.key"
    cert.write_bytes(pair.cert_pem)
    key.write_bytes(pair.key_pem)

    async def no_labels(name: str) -> dict[str, str]:
        return {}

    cfg = InjectorConfig(kubernetes_version=(1, 30), version="0.1.0", image="ghcr.io/kuberpc/proxy:0.1.0")
    app = create_app(cfg=cfg, metrics=WebhookMetrics(CollectorRegistry()), namespace_labels=no_labels)
    async with serving(
        app, host="127.0.0.1", port=0, ssl_context=CertReloader(str(cert), str(key)).context
    ) as (
        _,
        port,
    ):
        yield port


@contextlib.contextmanager
def prometheus(binary: str, tmp_path: Path, targets: dict[str, list[dict[str, Any]]]) -> Iterator[str]:
    """A Prometheus scraping `targets` (job -> static_configs) every second; yields its base URL."""
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [
            {"job_name": job, "static_configs": static, **(HTTPS if job == "kuberpc-webhook" else {})}
            for job, static in targets.items()
        ],
    }
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={path}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


async def query(session: aiohttp.ClientSession, base: str, expr: str, at: float) -> list[dict[str, Any]]:
    async with session.get(f"{base}/api/v1/query", params={"query": expr, "time": str(at)}) as resp:
        body = await resp.json()
    assert body["status"] == "success", f"{expr}: {body}"
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


async def poll(check: Callable[[], Any], what: str, timeout: float) -> None:
    """Bounded wait for Prometheus' state, which changes on its own schedule (scrapes)."""
    end = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.25)


def _targets() -> list[tuple[str, str, str]]:
    """(dashboard uid, panel title, query) of every dashboard target."""
    out = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                out.append((board["uid"], panel["title"], target["expr"]))
    return out


CALL_RATE = re.compile(r"sum by \((\w+)\) \(rate\(kuberpc_requests_total\{[^}]*\}\[\$__rate_interval\]\)\)")
BYTES_RATE = re.compile(
    r"sum by \(service\) \(rate\(kuberpc_(request|response)_bytes_total\{[^}]*\}\[\$__rate_interval\]\)\)"
)


async def test_every_dashboard_query_returns_data_and_counts_each_call_once(
    require_tool: Callable[[str, str], str], mesh_certs: MeshCerts, backend: Backend, tmp_path: Path
) -> None:
    binary = require_tool("prometheus", "apt-get install prometheus")
    async with run_pair(mesh_certs, backend.port, tmp_path) as pair, webhook_server(tmp_path) as webhook_port:
        targets = {
            "kuberpc-proxies": [
                {"targets": [pair.client_side.admin], "labels": {"namespace": "default", "pod": "client-1"}},
                {"targets": [pair.server_side.admin], "labels": {"namespace": "default", "pod": "echo-1"}},
            ],
            "kuberpc-webhook": [
                {
                    "targets": [f"127.0.0.1:{webhook_port}"],
                    "labels": {"namespace": "kuberpc-system", "pod": "kuberpc-webhook-1"},
                }
            ],
        }
        with prometheus(binary, tmp_path, targets) as base:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:

                async def all_up() -> bool:
                    with contextlib.suppress(aiohttp.ClientError):
                        up = await query(session, base, "up", time.time())
                        return len(up) == 3 and all(r["value"][1] == "1" for r in up)
                    return False

                await poll(all_up, "Prometheus to scrape both proxies and the webhook", STARTUP_TIMEOUT)
                load = await make_load(pair.target)

                async def scraped_everything() -> bool:
                    total = await query(
                        session, base, 'sum(kuberpc_requests_total{direction="inbound"})', time.time()
                    )
                    return bool(total) and float(total[0]["value"][1]) == load.calls

                await poll(scraped_everything, "Prometheus to scrape the last call", STARTUP_TIMEOUT)
                at = time.time()
                window = f"{int(at - load.started) + 5}s"  # the whole load and a little before it
                seconds = int(window[:-1])

                checked_calls = checked_bytes = 0
                for uid, title, expr in _targets():
                    promql = (
                        expr.replace("$__rate_interval", window)
                        .replace("$namespace", ".*")
                        .replace("$service", SERVICE if uid == "kuberpc-service" else ".*")
                        .replace("$method", ".*")
                    )
                    result = await query(session, base, promql, at)
                    assert result, f"{uid} / {title}: no data for {promql}"
                    if CALL_RATE.fullmatch(expr):
                        counted = sum(float(r["value"][1]) for r in result) * seconds
                        assert abs(counted / load.calls - 1) <= TOLERANCE, (
                            f"{uid} / {title}: {counted:.0f} calls counted for {load.calls} made: {promql}"
                        )
                        checked_calls += 1
                    elif match := BYTES_RATE.fullmatch(expr):
                        sent = load.calls if match[1] == "request" else load.ok
                        counted = sum(float(r["value"][1]) for r in result) * seconds
                        assert abs(counted / (sent * FRAME) - 1) <= TOLERANCE, (
                            f"{uid} / {title}: {counted:.0f} bytes"
                        )
                        checked_bytes += 1
                    elif 'grpc_code="0"' in expr:
                        # One Service, one method: every success rate is the share of calls that were OK.
                        for r in result:
                            success = float(r["value"][1])
                            assert abs(success - load.ok / load.calls) <= 0.05, f"{uid} / {title}: {success}"
                # The mesh overview and the Service dashboard each count calls in four panels and two tables.
                assert checked_calls >= 10 and checked_bytes == 2
