"""The proxy's discovery source (sidecar/discovery/controlplane.py) against the real discovery service: the
control plane's catalog watching a fake API server, served over mTLS by grpcio, one or two replicas. The wire
double in tests/sidecar covers the proxy's side alone; this checks the two sides agree."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable

from sidecar import identity
from sidecar import pki as pki_
from sidecar.app import _control_plane_context
from sidecar.config import Address
from sidecar.discovery.controlplane import ControlPlaneDiscovery
from sidecar.model import Catalog, Endpoint, ServiceKey
from tests.kubefake import FakeCluster
from tests.webhook.test_discovery_service import (
    SERVER_NAME,
    TD,
    Pki,
    cluster,
    endpoint_slice,
    pki,
    pod,
    replica,
    shop,
)

__all__ = ["cluster", "pki"]
CART = ServiceKey("cart", "shop")


async def to_localhost(host: str, port: int) -> list[str]:
    assert host == SERVER_NAME
    return ["127.0.0.1"]


class Published:
    def __init__(self) -> None:
        self.last: Catalog | None = None
        self.changed = asyncio.Event()

    def __call__(self, catalog: Catalog) -> None:
        self.last = catalog
        self.changed.set()

    async def until(self, pred: Callable[[Catalog], bool], what: str, timeout: float = 10.0) -> Catalog:
        deadline = time.monotonic() + timeout
        while self.last is None or not pred(self.last):
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for {what}"
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)
        return self.last


@contextlib.asynccontextmanager
async def proxy_source(pki: Pki, tmp: object, *ports: int) -> AsyncIterator[tuple[ControlPlaneDiscovery, Published]]:
    issued = pki_.issue_workload(pki_.KeyPair(pki.ca_cert, pki.ca_key), identity=identity.SpiffeId(TD, "shop", "web"))
    key, chain = issued.key_pem, issued.cert_pem
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        files = {name: Path(d) / name for name in ("key.pem", "cert.pem", "ca.pem")}
        files["key.pem"].write_bytes(key)
        files["cert.pem"].write_bytes(chain)
        files["ca.pem"].write_bytes(pki.ca_cert)
        ctx = _control_plane_context(str(files["ca.pem"]))
        identity.load_certificate(ctx, str(files["cert.pem"]), str(files["key.pem"]))
        source = ControlPlaneDiscovery(
            [Address(SERVER_NAME, p) for p in ports],
            ssl_context=ctx,
            upstreams=[CART],
            pod=("shop", "web-0"),
            rng=random.Random(3),
            clock=time.monotonic,
            resolve=to_localhost,
            retry_base=0.05,
            retry_cap=0.5,
        )
        published = Published()
        task = asyncio.create_task(source.run(published))
        try:
            yield source, published
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_the_proxy_source_gets_its_upstream_and_selecting_then_deltas_from_the_real_service(
    cluster: FakeCluster, pki: Pki
) -> None:
    shop(cluster)
    async with replica(cluster, pki) as r, proxy_source(pki, None, r.port) as (source, published):
        first = await published.until(lambda c: c.get(CART) is not None, "the first catalog")
        cart = first.get(CART)
        assert cart is not None and cart.policy.lb == "p2c-ewma" and cart.policy.grpc_services == ("shop.Cart",)
        assert {(e.address, e.port, e.weight, e.tls) for e in cart.endpoints} == {
            ("10.1.0.1", 15443, 300, True), ("10.1.0.2", 8080, 100, False)
        }
        assert first.selecting == frozenset({ServiceKey("web", "shop")})
        # An EndpointSlice change reaches the proxy's catalog as a delta.
        cluster.put(endpoint_slice("cart-a", "cart", ("10.1.0.1", "cart-0", False), ("10.1.0.3", None, True)))
        later = await published.until(
            lambda c: {e.address for e in c.services[CART].usable()} == {"10.1.0.3"}, "the slice change"
        )
        assert Endpoint("10.1.0.1", 15443, 300, ready=False, serving=False, pod="shop/cart-0", zone="zone-a") in later.services[CART].endpoints
        # Only what it subscribed to, and what selects its pod.
        assert set(later.services) == {CART, ServiceKey("web", "shop")}


async def test_killing_one_of_two_replicas_moves_the_proxy_to_the_other_keeping_its_endpoints(
    cluster: FakeCluster, pki: Pki
) -> None:
    shop(cluster)
    contexts = [replica(cluster, pki), replica(cluster, pki)]
    live = {(await ctx.__aenter__()).port: ctx for ctx in contexts}
    try:
        async with proxy_source(pki, None, *live) as (source, published):
            await published.until(lambda c: c.get(CART) is not None, "the first catalog")
            first = source.connected_to
            assert first is not None
            await live.pop(int(first.rpartition(":")[2])).__aexit__(None, None, None)  # that replica dies
            deadline = time.monotonic() + 15
            while source.connected_to in (None, first):
                assert time.monotonic() < deadline, "never moved to the other replica"
                assert published.last is not None and published.last.get(CART) is not None  # kept meanwhile
                await asyncio.sleep(0.02)
            cluster.put(pod("cart-0", "10.1.0.1", sa="cart", labels={"app": "cart"}, weight="7"))
            await published.until(
                lambda c: any(e.weight == 7 for e in c.services[CART].endpoints), "a change through the other replica"
            )
    finally:
        for ctx in live.values():
            await ctx.__aexit__(None, None, None)
