"""The discovery service end to end on loopback: the catalog watching a fake API server (tests/kubefake.py, real
list/watch semantics), served over mTLS by grpcio, called by a real grpcio client holding a mesh certificate."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import http.client
import json
import os
import random
import re
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from proto import discovery_pb2 as pb
from proto import discovery_pb2_grpc
from sidecar import pki as pki_
from sidecar.discovery.watch import Backoff, Credentials
from sidecar.pki import KeyPair, issue_serving
from sidecar.spiffe import SpiffeId
from tests.kubefake import FakeCluster, Obj, cluster, kubeconfig
from webhook.catalog import MeshCatalog
from webhook.discovery_service import DiscoveryMetrics, DiscoveryService, serving
from webhook.fanout import Hub
from webhook.identity import CertificateAuthority
from webhook.identity_service import ServingCertificate

__all__ = ["cluster"]
TD = "cluster.local"
SERVER_NAME = "kuberpc-webhook.kuberpc-system.svc"
WAIT_S = 10.0


# ---- API objects ---------------------------------------------------------------------------------------


def service(name: str, ns: str = "shop", *, annotations: dict[str, str] | None = None, selector: dict[str, str] | None = None) -> Obj:
    spec: Obj = {"ports": [{"name": "grpc", "port": 50051, "targetPort": 8080, "protocol": "TCP"}]}
    if selector is not None:
        spec["selector"] = selector
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "annotations": annotations or {}},
        "spec": spec,
    }


def pod(name: str, ip: str, ns: str = "shop", *, sa: str = "web", labels: dict[str, str] | None = None, weight: str | None = None) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {"kuberpc.io/injected": "true", **(labels or {})},
            "annotations": {"kuberpc.io/weight": weight} if weight is not None else {},
        },
        "spec": {"serviceAccountName": sa},
        "status": {"podIP": ip},
    }


def endpoint_slice(name: str, svc: str, *eps: tuple[str, str | None, bool], ns: str = "shop") -> Obj:
    """eps: (address, pod name or None, ready)."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": [{"name": "grpc", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": [address],
                "conditions": {"ready": ready, "serving": ready, "terminating": False},
                "zone": "zone-a",
                **({"targetRef": {"kind": "Pod", "name": pod_name, "namespace": ns}} if pod_name else {}),
            }
            for address, pod_name, ready in eps
        ],
    }


# ---- a mesh CA, the service, clients -------------------------------------------------------------------


@dataclass
class Pki:
    ca_key: bytes
    ca_cert: bytes

    def credentials(self, ns: str, sa: str) -> grpc.ChannelCredentials:
        issued = pki_.issue_workload(KeyPair(self.ca_cert, self.ca_key), identity=SpiffeId(TD, ns, sa))
        key, chain = issued.key_pem, issued.cert_pem
        return grpc.ssl_channel_credentials(root_certificates=self.ca_cert, private_key=key, certificate_chain=chain)

    def authority(self) -> CertificateAuthority:
        return CertificateAuthority(pki_.Issuer.load(KeyPair(self.ca_cert, self.ca_key)), trust_domain=TD)


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca = pki_.create_ca(trust_domain=TD)
    key, cert = ca.key_pem, ca.cert_pem
    return Pki(key, cert)


@dataclass
class Replica:
    port: int
    catalog: MeshCatalog
    hub: Hub
    registry: CollectorRegistry


@contextlib.asynccontextmanager
async def replica(fake: FakeCluster, pki: Pki) -> AsyncIterator[Replica]:
    """One control-plane replica: its own catalog (three watches) and discovery server."""
    catalog = MeshCatalog()
    hub = Hub(catalog)
    registry = CollectorRegistry()
    service_ = DiscoveryService(catalog, hub, metrics=DiscoveryMetrics(registry))
    clock = lambda: dt.datetime.now(dt.UTC)
    cert = ServingCertificate(pki.authority(), [SERVER_NAME], clock=clock, client_roots=pki.ca_cert)
    task = asyncio.create_task(
        catalog.run(Credentials(host=fake.url), rng=random.Random(1), clock=time.monotonic, backoff=Backoff(0.02, 0.1))
    )
    try:
        async with serving(service_, cert, trust_domain=TD, host="127.0.0.1", port=0, grace=0.1) as port:
            async with asyncio.timeout(WAIT_S):
                await catalog.synced.wait()
            yield Replica(port, catalog, hub, registry)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def channel(port: int, creds: grpc.ChannelCredentials) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(
        f"127.0.0.1:{port}", creds, options=[("grpc.ssl_target_name_override", SERVER_NAME)]
    )


class Stream:
    """A proxy's stream: send requests, read responses with a bounded wait."""

    def __init__(self, ch: grpc.aio.Channel) -> None:
        self.call: Any = discovery_pb2_grpc.DiscoveryStub(ch).Watch()

    async def send(self, **fields: Any) -> None:
        await self.call.write(pb.WatchRequest(**fields))

    async def read(self, timeout: float = WAIT_S) -> pb.WatchResponse:
        async with asyncio.timeout(timeout):
            response = await self.call.read()
        assert response is not grpc.aio.EOF, "the stream ended"
        return response  # type: ignore[no-any-return]

    async def nothing_for(self, seconds: float) -> None:
        with pytest.raises(TimeoutError):
            await self.read(seconds)

    async def code(self) -> grpc.StatusCode:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async with asyncio.timeout(WAIT_S):
                while True:
                    if await self.call.read() is grpc.aio.EOF:
                        break
        return e.value.code()  # type: ignore[no-any-return]


def ref(name: str, ns: str = "shop") -> pb.ServiceRef:
    return pb.ServiceRef(namespace=ns, name=name)


def endpoints(update: pb.ServiceUpdate) -> list[tuple[str, int, int, bool, bool]]:
    return [(e.address, e.port, e.weight, e.tls, e.ready) for e in update.endpoints]


def shop(fake: FakeCluster) -> None:
    fake.put(
        service("cart", annotations={"kuberpc.io/grpc-services": "shop.Cart", "kuberpc.io/lb": "p2c-ewma"}, selector={"app": "cart"}),
        service("web", selector={"app": "web"}),
        pod("cart-0", "10.1.0.1", sa="cart", labels={"app": "cart"}, weight="300"),
        pod("web-0", "10.1.0.9", sa="web", labels={"app": "web"}),
        endpoint_slice("cart-a", "cart", ("10.1.0.1", "cart-0", True), ("10.1.0.2", None, True)),
    )


# ---- the stream ------------------------------------------------------------------------------------------


async def test_subscribe_gets_a_snapshot_then_deltas_then_nothing_after_unsubscribe(cluster: FakeCluster, pki: Pki) -> None:
    shop(cluster)
    async with replica(cluster, pki) as r, channel(r.port, pki.credentials("shop", "web")) as ch:
        s = Stream(ch)
        await s.send(subscribe=[ref("cart")])
        snap = (await s.read()).services
        assert len(snap) == 1 and snap[0].full and snap[0].exists
        assert endpoints(snap[0]) == [("10.1.0.1", 15443, 300, True, True), ("10.1.0.2", 8080, 100, False, True)]
        assert snap[0].endpoints[0].pod == "shop/cart-0" and snap[0].endpoints[0].zone == "zone-a"
        assert snap[0].policy.lb == "p2c-ewma" and list(snap[0].policy.grpc_services) == ["shop.Cart"]
        assert snap[0].policy.allow_any and list(snap[0].ports) == [50051] and dict(snap[0].selector) == {"app": "cart"}

        # An EndpointSlice change: only what changed travels.
        cluster.put(endpoint_slice("cart-a", "cart", ("10.1.0.1", "cart-0", False), ("10.1.0.3", None, True)))
        delta = (await s.read()).services
        assert len(delta) == 1 and not delta[0].full
        assert endpoints(delta[0]) == [("10.1.0.1", 15443, 300, True, False), ("10.1.0.3", 8080, 100, False, True)]
        assert [(k.address, k.port) for k in delta[0].removed] == [("10.1.0.2", 8080)]
        assert not delta[0].HasField("policy") and not delta[0].ports_changed

        # A policy change alone carries the policy; a re-weighted pod only its endpoint.
        cluster.put(service("cart", annotations={"kuberpc.io/grpc-services": "shop.Cart", "kuberpc.io/timeout": "2s"}, selector={"app": "cart"}))
        update = (await s.read()).services[0]
        assert update.policy.lb == "weighted-round-robin" and update.policy.timeout_seconds == 2.0 and not update.endpoints
        cluster.put(pod("cart-0", "10.1.0.1", sa="cart", labels={"app": "cart"}, weight="7"))
        update = (await s.read()).services[0]
        assert endpoints(update) == [("10.1.0.1", 15443, 7, True, False)] and not update.removed

        # Unsubscribed: later changes of that Service are not sent. A stream's requests are handled in order, so
        # the snapshot of a Service subscribed after the unsubscribe says the unsubscribe has been handled (the
        # change made before that could race it and be sent, rightly).
        await s.send(unsubscribe=[ref("cart")])
        await s.send(subscribe=[ref("web")])
        assert [u.service.name for u in (await s.read()).services] == ["web"]
        cluster.put(endpoint_slice("cart-a", "cart", ("10.1.0.4", None, True)))
        await s.nothing_for(0.5)
        s.call.cancel()


async def test_an_unknown_service_is_answered_as_not_existing_and_streamed_when_it_appears(cluster: FakeCluster, pki: Pki) -> None:
    async with replica(cluster, pki) as r, channel(r.port, pki.credentials("shop", "web")) as ch:
        s = Stream(ch)
        await s.send(subscribe=[ref("later")])
        first = (await s.read()).services[0]
        assert (first.exists, first.full, len(first.endpoints)) == (False, True, 0)
        cluster.put(service("later"), endpoint_slice("later-a", "later", ("10.1.0.5", None, True)))
        while True:  # the Service and its slice may arrive in one response or two
            update = (await s.read()).services[0]
            if update.endpoints:
                break
        assert update.exists and update.full and endpoints(update) == [("10.1.0.5", 8080, 100, False, True)]
        cluster.delete(service("later"))
        gone = (await s.read()).services[0]
        assert (gone.exists, gone.full) == (False, True)
        s.call.cancel()


async def test_subscribing_twice_sends_the_snapshot_once(cluster: FakeCluster, pki: Pki) -> None:
    shop(cluster)
    async with replica(cluster, pki) as r, channel(r.port, pki.credentials("shop", "web")) as ch:
        s = Stream(ch)
        await s.send(subscribe=[ref("cart")])
        await s.read()
        await s.send(subscribe=[ref("cart")])
        await s.nothing_for(0.3)
        s.call.cancel()


async def test_grpc_service_names_are_answered_with_their_claims_and_the_claimants_streamed(cluster: FakeCluster, pki: Pki) -> None:
    shop(cluster)
    async with replica(cluster, pki) as r, channel(r.port, pki.credentials("shop", "web")) as ch:
        s = Stream(ch)
        await s.send(grpc_services=["shop.Cart", "nobody.Claims"])
        response = await s.read()
        claims = {c.grpc_service: [(x.namespace, x.name) for x in c.services] for c in response.claims}
        assert claims == {"nobody.Claims": [], "shop.Cart": [("shop", "cart")]}
        assert [u.service.name for u in response.services] == ["cart"] and response.services[0].full
        # A second Service starts claiming the name, in another namespace: claims update, it is streamed too.
        cluster.put(service("cart", ns="other", annotations={"kuberpc.io/grpc-services": "shop.Cart"}))
        response = await s.read()
        assert [(x.namespace, x.name) for x in response.claims[0].services] == [("other", "cart"), ("shop", "cart")]
        assert [(u.service.namespace, u.full) for u in response.services] == [("other", True)]
        s.call.cancel()


async def test_the_pod_is_answered_with_the_services_selecting_it_kept_up_to_date(cluster: FakeCluster, pki: Pki) -> None:
    shop(cluster)
    async with replica(cluster, pki) as r, channel(r.port, pki.credentials("shop", "cart")) as ch:
        s = Stream(ch)
        await s.send(pod=pb.PodRef(namespace="shop", name="cart-0"))
        response = await s.read()
        assert [(x.namespace, x.name) for x in response.selecting.services] == [("shop", "cart")]
        assert [u.service.name for u in response.services] == ["cart"]  # its allow policy is needed
        cluster.put(service("cart-admin", annotations={"kuberpc.io/allow": "ops/*"}, selector={"app": "cart"}))
        response = await s.read()
        assert [x.name for x in response.selecting.services] == ["cart", "cart-admin"]
        assert [(u.service.name, list(u.policy.allow)) for u in response.services] == [("cart-admin", ["ops/*"])]
        s.call.cancel()


# ---- who may ask -----------------------------------------------------------------------------------------


async def test_a_pod_of_another_namespace_is_permission_denied(cluster: FakeCluster, pki: Pki) -> None:
    shop(cluster)
    async with replica(cluster, pki) as r, channel(r.port, pki.credentials("shop", "web")) as ch:
        s = Stream(ch)
        await s.send(pod=pb.PodRef(namespace="bank", name="vault-0"))
        assert await s.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_pod_running_as_another_service_account_is_permission_denied(cluster: FakeCluster, pki: Pki) -> None:
    shop(cluster)
    async with replica(cluster, pki) as r, channel(r.port, pki.credentials("shop", "web")) as ch:
        s = Stream(ch)
        await s.send(pod=pb.PodRef(namespace="shop", name="cart-0"))  # runs as shop/cart
        assert await s.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_malformed_service_name_is_invalid_argument(cluster: FakeCluster, pki: Pki) -> None:
    async with replica(cluster, pki) as r, channel(r.port, pki.credentials("shop", "web")) as ch:
        s = Stream(ch)
        await s.send(subscribe=[ref("Not_A_Name")])
        assert await s.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("who", ["a certificate of another CA", "no certificate"])
async def test_a_client_without_a_mesh_certificate_is_refused(cluster: FakeCluster, pki: Pki, who: str) -> None:
    if who == "no certificate":
        creds = grpc.ssl_channel_credentials(root_certificates=pki.ca_cert)
    else:
        other = pki_.issue_workload(pki_.create_ca(trust_domain=TD), identity=SpiffeId(TD, "shop", "web"))
        key, chain = other.key_pem, other.cert_pem
        creds = grpc.ssl_channel_credentials(root_certificates=pki.ca_cert, private_key=key, certificate_chain=chain)
    shop(cluster)
    async with replica(cluster, pki) as r, channel(r.port, creds) as ch:
        s = Stream(ch)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async with asyncio.timeout(WAIT_S):
                await s.send(subscribe=[ref("cart")])
                await s.call.read()
        # The TLS handshake fails: no stream is ever opened, so nothing was served.
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert r.registry.get_sample_value("kuberpc_discovery_responses_total") == 0


# ---- fan-out -----------------------------------------------------------------------------------------


async def test_a_subscriber_that_does_not_read_gets_coalesced_state_and_does_not_hold_up_the_others(
    cluster: FakeCluster, pki: Pki
) -> None:
    cluster.put(service("hot"), endpoint_slice("hot-a", "hot", ("10.2.0.1", None, True)))
    # The slow client keeps HTTP/2's initial 64 KiB window (no BDP growth): once it is full, the server's write
    # waits, as it would for a proxy that stopped reading.
    slow_options = [("grpc.ssl_target_name_override", SERVER_NAME), ("grpc.http2.bdp_probe", 0)]
    async with (
        replica(cluster, pki) as r,
        grpc.aio.secure_channel(f"127.0.0.1:{r.port}", pki.credentials("shop", "slow"), options=slow_options) as slow_ch,
        channel(r.port, pki.credentials("shop", "fast")) as fast_ch,
    ):
        slow, fast = Stream(slow_ch), Stream(fast_ch)
        for s in (slow, fast):
            await s.send(subscribe=[ref("hot")])
            await s.read()
        # 300 changes of 200 endpoints each (every endpoint flips ready: each delta is ~5 KB).
        changes = 300
        for n in range(changes):
            flip = [(f"10.3.{i // 250}.{i % 250}", None, n % 2 == 0) for i in range(200)]
            cluster.put(endpoint_slice("hot-a", "hot", *flip, (f"10.2.1.{n % 250}", None, True)))
            await asyncio.sleep(0.002)  # paced: the fast reader is sent many of them one by one
        last = f"10.2.1.{(changes - 1) % 250}"
        async with asyncio.timeout(WAIT_S):
            while True:
                update = (await fast.read()).services[0]
                if any(e.address == last for e in update.endpoints):
                    break
        subs = {s.identity.service_account: s for s in r.hub.subscribers}
        # The slow one's writes stopped when its window filled; its changes wait as one mark, not a queue.
        assert subs["slow"].responses < 30 < subs["fast"].responses, (subs["slow"].responses, subs["fast"].responses)
        assert subs["slow"].pending <= 1
        # It finally reads: a bounded number of responses more, ending at the latest state.
        seen = 0
        async with asyncio.timeout(WAIT_S):
            while True:
                update = (await slow.read()).services[0]
                seen += 1
                if any(e.address == last for e in update.endpoints):
                    break
        assert seen < 40, f"{seen} responses for {changes} changes: not coalesced"
        slow.call.cancel()
        fast.call.cancel()


# ---- several replicas -----------------------------------------------------------------------------------


async def test_two_replicas_serve_identical_snapshots_so_a_proxy_may_reconnect_to_either(cluster: FakeCluster, pki: Pki) -> None:
    shop(cluster)
    async with replica(cluster, pki) as one:
        # The second replica starts later, after more changes: it lists what the first learnt by watching.
        cluster.put(endpoint_slice("cart-b", "cart", ("10.1.0.7", None, True)), pod("cart-1", "10.1.0.8", sa="cart"))
        cluster.put(endpoint_slice("cart-a", "cart", ("10.1.0.1", "cart-0", True), ("10.1.0.8", "cart-1", True)))
        async with replica(cluster, pki) as two:
            snapshots = []
            for r in (one, two):
                async with channel(r.port, pki.credentials("shop", "cart")) as ch:
                    s = Stream(ch)
                    await s.send(subscribe=[ref("cart"), ref("web")], grpc_services=["shop.Cart"], pod=pb.PodRef(namespace="shop", name="cart-0"))
                    got = pb.WatchResponse()
                    while len(got.services) < 2 or not got.claims or not got.HasField("selecting"):
                        got.MergeFrom(await s.read())
                    snapshots.append(got)
                    s.call.cancel()
    assert snapshots[0].SerializeToString(deterministic=True) == snapshots[1].SerializeToString(deterministic=True)
    cart = next(u for u in snapshots[0].services if u.service.name == "cart")
    assert sorted(e.address for e in cart.endpoints) == ["10.1.0.1", "10.1.0.7", "10.1.0.8"]


async def test_a_replica_going_away_ends_its_streams_and_the_other_serves_the_same_snapshot(cluster: FakeCluster, pki: Pki) -> None:
    shop(cluster)
    async with replica(cluster, pki) as two:
        async with replica(cluster, pki) as one:
            ch = channel(one.port, pki.credentials("shop", "web"))
            s = Stream(ch)
            await s.send(subscribe=[ref("cart")])
            before = await s.read()
        # The first replica stopped (as on SIGTERM or a crash): its stream ends with an error the proxy retries.
        assert await s.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        await ch.close()
        async with channel(two.port, pki.credentials("shop", "web")) as ch2:
            s2 = Stream(ch2)
            await s2.send(subscribe=[ref("cart")])
            after = await s2.read()
            s2.call.cancel()
    assert after.SerializeToString(deterministic=True) == before.SerializeToString(deterministic=True)


# ---- as users run it ---------------------------------------------------------------------------------------


@dataclass
class Served:
    proc: asyncio.subprocess.Process
    stderr: asyncio.StreamReader
    lines: list[bytes]

    async def address(self, event: str) -> int:
        """The port `event` (e.g. `listening`, `discovery_listening`) says was bound, read from the log."""
        m = re.search(rb"address=(\[.*\])", await self.line(f"event={event} address="))
        assert m is not None
        return int(json.loads(m.group(1))[1])

    async def line(self, needle: str) -> bytes:
        """The first log line holding `needle`, waiting up to 30 s for it."""
        for line in self.lines:
            if needle.encode() in line:
                return line
        async with asyncio.timeout(30):
            while True:
                line = await self.stderr.readline()
                assert line, f"the control plane exited: {b''.join(self.lines).decode(errors='replace')[-2000:]}"
                self.lines.append(line)
                if needle.encode() in line:
                    return line


@contextlib.asynccontextmanager
async def webhook_serve(cluster: FakeCluster, pki: Pki, tmp_path: Path, *extra: str) -> AsyncIterator[Served]:
    """`python -m webhook serve` as the Deployment runs it (identity, discovery), against the fake API server."""
    (tmp_path / "config.yaml").write_text('kubernetesVersion: "1.30"\nlogLevel: info\n')
    (tmp_path / "ca.pem").write_bytes(pki.ca_cert)
    (tmp_path / "ca-key.pem").write_bytes(pki.ca_key)
    serving_pair = issue_serving(KeyPair(pki.ca_cert, pki.ca_key), [SERVER_NAME], now=dt.datetime.now(dt.UTC))
    (tmp_path / "tls.crt").write_bytes(serving_pair.cert_pem)
    (tmp_path / "tls.key").write_bytes(serving_pair.key_pem)
    env = {**os.environ, "KUBECONFIG": str(kubeconfig(tmp_path / "kubeconfig", cluster.url)), "POD_NAMESPACE": "kuberpc-system"}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "webhook", "serve", "--config", str(tmp_path / "config.yaml"),
        "--tls-cert", str(tmp_path / "tls.crt"), "--tls-key", str(tmp_path / "tls.key"), "--host", "127.0.0.1",
        "--port", "0", "--identity-port", "0", "--discovery-port", "0", "--shutdown-delay", "0",
        "--trust-anchors", str(tmp_path / "ca.pem"), "--identity-ca-key", str(tmp_path / "ca-key.pem"),
        "--identity-ca-cert", str(tmp_path / "ca.pem"), *extra,
        cwd=Path(__file__).parents[2], env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    try:
        yield Served(proc, proc.stderr, [])
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_python_m_webhook_serve_streams_discovery_on_its_port_and_stops_on_sigterm(
    cluster: FakeCluster, pki: Pki, tmp_path: Path
) -> None:
    shop(cluster)
    async with webhook_serve(cluster, pki, tmp_path) as served:
        port = await served.address("discovery_listening")
        async with channel(port, pki.credentials("shop", "web")) as ch:
            s = Stream(ch)
            await s.send(subscribe=[ref("cart")])
            snap = (await s.read()).services[0]
            assert snap.full and endpoints(snap)[0] == ("10.1.0.1", 15443, 300, True, True)
            s.call.cancel()
        # One watch per kind the catalog needs, whoever asks (and the trust anchors' namespaces).
        assert {w.plural for w in cluster.watchers} >= {"services", "endpointslices", "pods"}
        assert len([w for w in cluster.watchers if w.plural in ("services", "endpointslices", "pods")]) == 3
        served.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await served.proc.wait() == 0


async def test_the_control_plane_is_ready_only_once_its_discovery_catalog_is_listed(
    cluster: FakeCluster, pki: Pki, tmp_path: Path
) -> None:
    shop(cluster)
    held = cluster.gates["endpointslices"] = asyncio.Event()  # the API server is slow to list EndpointSlices
    async with webhook_serve(cluster, pki, tmp_path) as served:
        get = partial(https_get, pki, await served.address("listening"))
        await asyncio.sleep(1.0)  # well past start-up: only the held list keeps it unready
        assert await asyncio.to_thread(get, "/healthz") == (200, "ok\n")  # alive: no reason to restart it
        status, why = await asyncio.to_thread(get, "/readyz")
        assert status == 503 and "discovery catalog" in why
        held.set()
        deadline = time.monotonic() + 10
        while (answer := await asyncio.to_thread(get, "/readyz")) != (200, "ready\n"):
            assert time.monotonic() < deadline, f"still not ready once listed: {answer}"
            await asyncio.sleep(0.05)


async def test_a_control_plane_that_cannot_list_is_ready_after_the_grace_so_injection_and_identity_serve(
    cluster: FakeCluster, pki: Pki, tmp_path: Path
) -> None:
    shop(cluster)
    cluster.gates["endpointslices"] = asyncio.Event()  # never answered: the list hangs for good
    async with webhook_serve(cluster, pki, tmp_path, "--catalog-ready-grace", "2") as served:
        get = partial(https_get, pki, await served.address("listening"))
        status, why = await asyncio.to_thread(get, "/readyz")
        assert status == 503 and "discovery catalog" in why
        deadline = time.monotonic() + 15
        while (answer := await asyncio.to_thread(get, "/readyz")) != (200, "ready\n"):
            assert time.monotonic() < deadline, f"never ready after the grace: {answer}"
            await asyncio.sleep(0.1)
        await served.line("event=ready_without_catalog")  # said once, in the log


def https_get(pki: Pki, port: int, path: str) -> tuple[int, str]:
    """GET `path` from the webhook's HTTPS port: (status, body)."""
    ctx = ssl.create_default_context(cadata=pki.ca_cert.decode())
    ctx.check_hostname = False  # dialled by address; the chain is still verified (these tests are about readiness)
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=ctx)
    try:
        conn.request("GET", path, headers={"Host": SERVER_NAME})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()
