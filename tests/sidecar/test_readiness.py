"""Honest readiness: /ready answers 503 while the workload certificate is expired and while an upstream the pod
declared (`kuberpc.io/upstreams`) has never been discovered; /debug says why. Real proxies on loopback."""

from __future__ import annotations

import asyncio
import datetime
import json
import urllib.error
import urllib.request
from pathlib import Path

from sidecar import identity, pki
from tests.ports import free_port
from tests.sidecar.harness import MeshCerts, RunningProxy, Workload, endpoints_yaml, run_proxy, wait_for


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


async def readiness(p: RunningProxy) -> tuple[int, list[str]]:
    """/ready's status and /debug's reasons (the proxy runs in this event loop: fetch from a thread)."""
    status, _ = await asyncio.to_thread(get, f"http://{p.admin}/ready")
    _, body = await asyncio.to_thread(get, f"http://{p.debug}/debug")
    why: list[str] = json.loads(body)["not_ready_because"]
    return status, why


def expired_workload(tmp_path: Path) -> Workload:
    """A certificate from a trusted CA whose 24 h lifetime ended yesterday (renewals failed all along)."""
    two_days_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2)
    ca = pki.create_ca(trust_domain="cluster.local", now=two_days_ago - datetime.timedelta(hours=1))
    ident = identity.SpiffeId("cluster.local", "default", "client")
    issued = pki.issue_workload(ca, identity=ident, now=two_days_ago)
    key, chain, ca_cert = issued.key_pem, issued.cert_pem, ca.cert_pem
    for name, data in (("key.pem", key), ("cert.pem", chain), ("ca.pem", ca_cert)):
        (tmp_path / name).write_bytes(data)
    return Workload(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"), str(tmp_path / "ca.pem"), str(ident))


async def test_a_proxy_whose_certificate_has_expired_is_not_ready_and_says_why(tmp_path: Path) -> None:
    disc = tmp_path / "endpoints.yaml"
    disc.write_text(endpoints_yaml({"echo.default": []}))

    async with run_proxy(expired_workload(tmp_path), disc) as p:
        status, why = await readiness(p)

    assert status == 503
    assert len(why) == 1 and "expired" in why[0]


async def test_a_proxy_with_a_valid_certificate_and_nothing_declared_is_ready(
    mesh_certs: MeshCerts, tmp_path: Path
) -> None:
    disc = tmp_path / "endpoints.yaml"
    disc.write_text(endpoints_yaml({"echo.default": []}))

    async with run_proxy(mesh_certs.client, disc) as p:
        assert await readiness(p) == (200, [])


async def test_a_declared_upstream_never_discovered_keeps_the_proxy_unready_until_it_appears(
    mesh_certs: MeshCerts, tmp_path: Path
) -> None:
    disc = tmp_path / "endpoints.yaml"
    disc.write_text(endpoints_yaml({"echo.default": []}))

    async with run_proxy(mesh_certs.client, disc, KUBERPC_UPSTREAMS=f"ledger.default:7000={free_port()}") as p:
        before = await readiness(p)
        disc.write_text(endpoints_yaml({"ledger.default": [{"address": "127.0.0.1", "port": 7000, "tls": True}]}))
        await wait_for(lambda: not p.proxy.not_ready_because(), "the upstream to be discovered")
        after = await readiness(p)

    assert before[0] == 503
    assert len(before[1]) == 1 and "ledger.default" in before[1][0] and "never been discovered" in before[1][0]
    assert after == (200, [])


async def test_an_upstream_once_discovered_does_not_unready_the_proxy_when_its_endpoints_go(
    mesh_certs: MeshCerts, tmp_path: Path
) -> None:
    disc = tmp_path / "endpoints.yaml"
    disc.write_text(endpoints_yaml({"ledger.default": [{"address": "127.0.0.1", "port": 7000, "tls": True}]}))

    async with run_proxy(mesh_certs.client, disc, KUBERPC_UPSTREAMS=f"ledger.default:7000={free_port()}") as p:
        disc.write_text(endpoints_yaml({"ledger.default": []}))
        await wait_for(
            lambda: all(not st.set.usable() for st in p.proxy.outbound.services.values()), "the endpoints to go"
        )
        # Readiness gates startup: a Service scaled to zero later is the callers' UNAVAILABLE, not a restart.
        assert await readiness(p) == (200, [])
