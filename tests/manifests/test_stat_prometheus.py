"""`kuberpc stat --prometheus URL` reads the same server view from a real Prometheus (Debian's) that
scrapes real proxies under load; the pods come from a fake API server, as from a real one."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from tests.kubefake import FakeCluster, cluster, kubeconfig
from tests.manifests.test_dashboards_live import TOLERANCE, make_load, poll, prometheus, query
from tests.sidecar.harness import Backend, MeshCerts, backend, mesh_certs, run_pair
from tests.webhook.test_cli_cluster import meshed_pod
from webhook.cli.main import main

__all__ = ["backend", "cluster", "mesh_certs"]  # fixtures used below


async def test_stat_from_prometheus_counts_what_the_client_made(
    require_tool: Callable[[str, str], str],
    cluster: FakeCluster,
    mesh_certs: MeshCerts,
    backend: Backend,
    tmp_path: Path,
) -> None:
    binary = require_tool("prometheus", "apt-get install prometheus")
    async with run_pair(mesh_certs, backend.port, tmp_path) as pair:
        cluster.put(
            meshed_pod("client-7c9d-x1", "client", "7c9d"), meshed_pod("echo-5f6b-y2", "echo", "5f6b")
        )
        targets = {
            "kuberpc-proxies": [
                {
                    "targets": [pair.client_side.admin],
                    "labels": {"namespace": "default", "pod": "client-7c9d-x1"},
                },
                {
                    "targets": [pair.server_side.admin],
                    "labels": {"namespace": "default", "pod": "echo-5f6b-y2"},
                },
            ]
        }
        with prometheus(binary, tmp_path, targets) as base:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:

                async def both_up() -> bool:
                    try:
                        up = await query(session, base, "up", time.time())
                    except aiohttp.ClientError:
                        return False
                    return len(up) == 2 and all(r["value"][1] == "1" for r in up)

                await poll(both_up, "Prometheus to scrape both proxies", 30)
                load = await make_load(pair.target)

                async def scraped_everything() -> bool:
                    total = await query(
                        session, base, 'sum(kuberpc_requests_total{direction="inbound"})', time.time()
                    )
                    return bool(total) and float(total[0]["value"][1]) == load.calls

                await poll(scraped_everything, "Prometheus to scrape the last call", 30)
            seconds = int(time.time() - load.started) + 5
            args = ["stat", "deploy", "--prometheus", base, "--window", str(seconds), "-o", "json"]
            out = io.StringIO()
            code = await asyncio.to_thread(
                main,
                [*args, "--kubeconfig", str(kubeconfig(tmp_path / "kubeconfig", cluster.url))],
                stdout=out,
            )

    rows = {r["name"]: r for r in json.loads(out.getvalue())["items"]}
    assert code == 0
    echo = rows["echo"]
    assert abs(echo["calls"] / load.calls - 1) <= TOLERANCE, (echo["calls"], load.calls)
    assert abs(echo["success"] - load.ok / load.calls) <= 0.05
    assert 0 < echo["latency_seconds"]["p50"] <= echo["latency_seconds"]["p99"]
    assert (rows["client"]["calls"], rows["client"]["meshed"]) == (0, "1/1")
