"""Discovery from the control plane: responses applied into Services (pure), and the stream itself against a test
double of the discovery service over real mTLS: subscriptions, readiness, reconnection to any replica with the
last known endpoints kept, and the interest re-sent."""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from proto import discovery_pb2 as pb
from sidecar import identity
from sidecar import pki as _pki
from sidecar.app import _control_plane_context
from sidecar.config import Address
from sidecar.discovery.controlplane import ControlPlaneDiscovery, ServiceView, policy_of, retry_delay
from sidecar.model import Catalog, Endpoint, ServiceKey
from tests.sidecar.fake_control_plane import (
    FakeControlPlane,
    FakeService,
    RunningPlane,
    ServerCert,
    endpoint,
    server_cert,
)
from tests.sidecar.harness import Workload, _issue, wait_for

ARITH = ServiceKey("arith", "default")


def ref(ns: str, name: str) -> pb.ServiceRef:
    return pb.ServiceRef(namespace=ns, name=name)


# ---- the pure part ----------------------------------------------------------------------------------------


def test_a_snapshot_replaces_and_a_delta_adds_replaces_and_removes_by_address_and_port() -> None:
    view = ServiceView()
    view.apply(pb.WatchResponse(services=[pb.ServiceUpdate(
        service=ref("default", "arith"), exists=True, full=True,
        endpoints=[endpoint("10.0.0.1", 15443), endpoint("10.0.0.2", 15443)],
        policy=pb.Policy(lb="round-robin", allow_any=True), ports=[50051], selector={"app": "arith"},
    )]))  # fmt: skip
    changed = view.apply(pb.WatchResponse(services=[pb.ServiceUpdate(
        service=ref("default", "arith"), exists=True, full=False,
        endpoints=[endpoint("10.0.0.2", 15443, weight=300), endpoint("10.0.0.3", 15443)],
        removed=[pb.EndpointKey(address="10.0.0.1", port=15443)],
    )]))  # fmt: skip
    es = view.catalog().get(ARITH)
    assert changed == {ARITH} and es is not None
    assert {(e.address, e.weight) for e in es.endpoints} == {("10.0.0.2", 300), ("10.0.0.3", 100)}
    # A delta without policy, ports or selector keeps them.
    assert es.policy.lb == "round-robin" and es.ports == (50051,) and es.selector == (("app", "arith"),)
    view.apply(pb.WatchResponse(services=[pb.ServiceUpdate(
        service=ref("default", "arith"), exists=True, full=True, endpoints=[endpoint("10.0.0.9", 15443)],
        policy=pb.Policy(lb="p2c-ewma", allow_any=True),
    )]))  # fmt: skip
    es = view.catalog().get(ARITH)
    assert es is not None and [e.address for e in es.endpoints] == ["10.0.0.9"] and es.policy.lb == "p2c-ewma"


def test_a_service_that_does_not_exist_is_answered_and_absent_from_the_catalog() -> None:
    view = ServiceView()
    view.apply(pb.WatchResponse(services=[pb.ServiceUpdate(service=ref("default", "arith"), exists=True, full=True)]))
    view.apply(pb.WatchResponse(services=[pb.ServiceUpdate(service=ref("default", "arith"), exists=False, full=True)]))
    assert ARITH in view.answered and view.catalog().get(ARITH) is None


def test_endpoint_conditions_and_tls_are_kept_and_not_ready_ones_are_unusable() -> None:
    view = ServiceView()
    view.apply(pb.WatchResponse(services=[pb.ServiceUpdate(
        service=ref("default", "arith"), exists=True, full=True,
        endpoints=[endpoint("10.0.0.1", 15443, ready=False), endpoint("10.0.0.2", 8080, tls=False, pod="default/p2")],
    )]))  # fmt: skip
    es = view.catalog().get(ARITH)
    assert es is not None
    assert es.usable() == (Endpoint("10.0.0.2", 8080, tls=False, pod="default/p2"),)


def test_policy_values_are_converted_and_what_the_proxy_cannot_use_falls_back_to_the_default() -> None:
    policy, problems = policy_of(pb.Policy(
        lb="fastest", grpc_services=["arith.Arith"], allow=["default/client", "ops/*"], timeout_seconds=1.5,
        retry_on=["UNAVAILABLE", "resource_exhausted", "NOPE"], retry_budget=0.5, export_grpc_services=True,
    ))  # fmt: skip
    assert policy.lb == "weighted-round-robin"
    assert policy.allow == ("default/client", "ops/*") and policy.timeout == 1.5
    assert policy.retry_on == frozenset({"unavailable", "resource-exhausted"}) and policy.retry_budget == 0.5
    assert policy.grpc_services == ("arith.Arith",) and policy.export_grpc_services
    assert len(problems) == 2 and "fastest" in problems[0] and "NOPE" in problems[1]
    assert policy_of(pb.Policy(allow_any=True))[0].allow is None
    assert policy_of(pb.Policy())[0].allow == ()  # an empty allow list denies everyone: never "any"
    assert policy_of(pb.Policy())[0].timeout is None


def test_claims_are_answered_only_once_every_claiming_service_is() -> None:
    view = ServiceView()
    view.apply(pb.WatchResponse(claims=[pb.GrpcServiceClaims(grpc_service="arith.Arith", services=[ref("default", "arith")])]))
    assert not view.claims_answered("arith.Arith")
    view.apply(pb.WatchResponse(services=[pb.ServiceUpdate(service=ref("default", "arith"), exists=True, full=True)]))
    assert view.claims_answered("arith.Arith") and not view.claims_answered("other.Other")


def test_reconnect_delays_grow_with_jitter_up_to_the_cap() -> None:
    rng = random.Random(1)
    delays = [retry_delay(n, rng, base=0.25, cap=10.0) for n in range(1, 12)]
    assert 0.125 <= delays[0] <= 0.25
    assert all(5.0 <= d <= 10.0 for d in delays[7:])
    assert len(set(delays)) == len(delays)


# ---- the stream against a test double over mTLS ------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    client: Workload
    server: ServerCert
    wrong_name: ServerCert  # a certificate of the mesh CA for another host name
    ca_file: str


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("plane")
    _ca = _pki.create_ca(trust_domain="cluster.local")
    ca_key, ca_cert = _ca.key_pem, _ca.cert_pem
    client = _issue(ca_key, ca_cert, root / "client", "default", "client")
    return Pki(client, server_cert(ca_key, ca_cert), server_cert(ca_key, ca_cert, "other.example"), client.ca)


def client_context(pki: Pki) -> ssl.SSLContext:
    ctx = _control_plane_context(pki.ca_file)
    identity.load_certificate(ctx, pki.client.cert, pki.client.key)
    return ctx


@pytest.fixture
def plane() -> FakeControlPlane:
    plane = FakeControlPlane()
    plane.set_service("default", "arith", FakeService([endpoint("10.0.0.1", 15443)], selector={"app": "arith"}))
    plane.pod_labels[("default", "client-0")] = {"app": "client"}
    return plane


@pytest.fixture
def replica(plane: FakeControlPlane, pki: Pki) -> Iterator[RunningPlane]:
    r = RunningPlane(plane, pki.server)
    r.start()
    yield r
    r.stop()


class Published:
    def __init__(self) -> None:
        self.catalogs: list[Catalog] = []
        self.changed = asyncio.Event()

    def __call__(self, catalog: Catalog) -> None:
        self.catalogs.append(catalog)
        self.changed.set()

    async def until(self, pred: object, what: str, timeout: float = 10.0) -> Catalog:
        assert callable(pred)
        deadline = time.monotonic() + timeout
        while True:
            if self.catalogs and pred(self.catalogs[-1]):
                return self.catalogs[-1]
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}")
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                pass


@pytest.fixture
async def running(request: pytest.FixtureRequest) -> AsyncIterator[list[asyncio.Task[None]]]:
    tasks: list[asyncio.Task[None]] = []
    yield tasks
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def source(pki: Pki, *ports: int, upstreams: tuple[ServiceKey, ...] = (ARITH,), pod: bool = True) -> ControlPlaneDiscovery:
    return ControlPlaneDiscovery(
        [Address("localhost", p) for p in ports],
        ssl_context=client_context(pki),
        upstreams=upstreams,
        pod=("default", "client-0") if pod else None,
        rng=random.Random(7),
        clock=time.monotonic,
        retry_base=0.05,
        retry_cap=0.5,
    )


async def test_the_first_catalog_comes_once_every_declared_upstream_and_the_pods_selectors_are_answered(
    plane: FakeControlPlane, replica: RunningPlane, pki: Pki, running: list[asyncio.Task[None]]
) -> None:
    plane.set_service("default", "client", FakeService([], selector={"app": "client"}))
    published = Published()
    disc = source(pki, replica.port)
    running.append(asyncio.create_task(disc.run(published)))
    first = await published.until(lambda c: True, "the first catalog")
    assert len(published.catalogs) == 1
    assert first.get(ARITH) is not None and first.selecting == frozenset({ServiceKey("client", "default")})
    # One stream, presenting the workload's identity; the pod is sent once, with the declared upstream.
    assert plane.peers == [pki.client.spiffe]
    assert [r.pod.name for r in plane.requests if r.HasField("pod")] == ["client-0"]
    assert [(s.namespace, s.name) for s in plane.requests[0].subscribe] == [("default", "arith")]
    # It holds only what it subscribed to (and what selects its pod), whatever else the control plane has.
    plane.set_service("other", "noise", FakeService([endpoint("10.9.9.9", 15443)]))
    assert set(disc.view.catalog().services) == {ARITH, ServiceKey("client", "default")}


async def test_changes_are_published_as_they_come(
    plane: FakeControlPlane, replica: RunningPlane, pki: Pki, running: list[asyncio.Task[None]]
) -> None:
    published = Published()
    running.append(asyncio.create_task(source(pki, replica.port).run(published)))
    await published.until(lambda c: c.get(ARITH) is not None, "arith")
    plane.delta("default", "arith", pb.ServiceUpdate(
        endpoints=[endpoint("10.0.0.2", 15443, weight=500)], removed=[pb.EndpointKey(address="10.0.0.1", port=15443)]
    ))  # fmt: skip
    cat = await published.until(
        lambda c: [(e.address, e.weight) for e in c.services[ARITH].endpoints] == [("10.0.0.2", 500)], "the delta"
    )
    plane.set_service("default", "arith", FakeService(
        [endpoint("10.0.0.2", 15443)], policy=pb.Policy(lb="round-robin", timeout_seconds=2.0, allow_any=True)
    ))  # fmt: skip
    cat = await published.until(lambda c: c.services[ARITH].policy.lb == "round-robin", "the policy change")
    assert cat.services[ARITH].policy.timeout == 2.0
    plane.delete_service("default", "arith")
    await published.until(lambda c: c.get(ARITH) is None, "the deletion")


async def test_a_control_plane_gone_leaves_the_last_endpoints_and_a_restart_gets_the_whole_interest_again(
    plane: FakeControlPlane, replica: RunningPlane, pki: Pki, running: list[asyncio.Task[None]]
) -> None:
    plane.set_service("default", "extra", FakeService([endpoint("10.0.1.1", 15443)]))
    published = Published()
    disc = source(pki, replica.port)
    running.append(asyncio.create_task(disc.run(published)))
    await published.until(lambda c: c.get(ARITH) is not None, "arith")
    wait = disc.want_service(ServiceKey("extra", "default"))
    assert wait is not None
    await asyncio.wait_for(wait, 10)
    assert disc.current and disc.last_update_age() == 0.0

    replica.stop()
    await wait_for(lambda: not disc.current, "the stream to be seen down")
    await wait_for(lambda: disc.last_update_age() > 0.2, "the age to grow")
    debug = disc.debug()
    assert debug["current"] is False and debug["last_error"]
    # The last known endpoints stay in service: nothing was published that drops them.
    assert published.catalogs[-1].services[ARITH].endpoints[0].address == "10.0.0.1"

    plane.requests.clear()
    plane.set_service("default", "arith", FakeService([endpoint("10.0.0.7", 15443)]))  # changed while away
    replica.start()  # the same port
    await published.until(lambda c: c.services[ARITH].endpoints[0].address == "10.0.0.7", "the change after restart")
    interest = plane.requests[0]
    assert {(s.namespace, s.name) for s in interest.subscribe} == {("default", "arith"), ("default", "extra")}
    assert interest.pod.name == "client-0"
    assert disc.current and disc.last_update_age() == 0.0 and disc.reconnects == 1


async def test_killing_one_of_two_replicas_moves_the_stream_to_the_other(
    plane: FakeControlPlane, pki: Pki, running: list[asyncio.Task[None]]
) -> None:
    a, b = RunningPlane(plane, pki.server), RunningPlane(plane, pki.server)
    a.start()
    b.start()
    try:
        published = Published()
        disc = source(pki, a.port, b.port)
        running.append(asyncio.create_task(disc.run(published)))
        await published.until(lambda c: c.get(ARITH) is not None, "arith")
        first = disc.connected_to
        assert first is not None
        (a if first.endswith(f":{a.port}") else b).stop()
        await wait_for(lambda: disc.connected_to not in (None, first), "the stream on the other replica", 15)
        plane.set_service("default", "arith", FakeService([endpoint("10.0.0.8", 15443)]))
        await published.until(lambda c: c.services[ARITH].endpoints[0].address == "10.0.0.8", "a change via the other")
    finally:
        a.stop()
        b.stop()


async def test_a_server_whose_certificate_names_another_host_is_not_trusted(
    plane: FakeControlPlane, pki: Pki, running: list[asyncio.Task[None]]
) -> None:
    impostor = RunningPlane(plane, pki.wrong_name)
    impostor.start()
    try:
        published = Published()
        disc = source(pki, impostor.port)
        running.append(asyncio.create_task(disc.run(published)))
        await wait_for(lambda: disc.last_error is not None, "a failed connection")
        assert "certificate" in (disc.last_error or "") and not published.catalogs and not plane.requests
    finally:
        impostor.stop()


async def test_on_demand_services_and_grpc_names_are_subscribed_and_answered(
    plane: FakeControlPlane, replica: RunningPlane, pki: Pki, running: list[asyncio.Task[None]]
) -> None:
    plane.set_service("shop", "cart", FakeService(
        [endpoint("10.0.2.1", 15443)], policy=pb.Policy(grpc_services=["shop.Cart"], allow_any=True)
    ))  # fmt: skip
    published = Published()
    disc = source(pki, replica.port, upstreams=(), pod=False)
    running.append(asyncio.create_task(disc.run(published)))
    ghost = disc.want_service(ServiceKey("ghost", "default"))
    cart = disc.want_grpc_service("shop.Cart")
    assert ghost is not None and cart is not None
    await asyncio.wait_for(asyncio.gather(ghost, cart), 10)
    catalog = published.catalogs[-1]
    assert catalog.claiming("shop.Cart") == (ServiceKey("cart", "shop"),)
    assert catalog.get(ServiceKey("ghost", "default")) is None
    assert disc.want_service(ServiceKey("ghost", "default")) is None  # answered: not asked again
    assert disc.debug()["missing"] == ["ghost.default"]


async def test_refused_streams_are_retried_with_backoff_and_said_in_debug(
    plane: FakeControlPlane, replica: RunningPlane, pki: Pki, running: list[asyncio.Task[None]], tmp_path: Path
) -> None:
    plane.refuse = "PERMISSION_DENIED"
    disc = source(pki, replica.port)
    running.append(asyncio.create_task(disc.run(Published())))
    await wait_for(lambda: disc.failures >= 3, "three refusals")
    assert "PERMISSION_DENIED" in (disc.last_error or "")
    plane.refuse = None
    await wait_for(lambda: disc.current, "the stream up once allowed", 15)


async def test_on_demand_subscriptions_are_bounded_and_make_room_by_dropping_services_that_do_not_exist(pki: Pki) -> None:
    disc = ControlPlaneDiscovery(
        [Address("localhost", 1)], ssl_context=client_context(pki), rng=random.Random(1), clock=time.monotonic,
        max_on_demand=2,
    )  # fmt: skip
    a, b, c = (ServiceKey(n, "default") for n in ("a", "b", "c"))
    assert disc.want_service(a) is not None and disc.want_service(b) is not None
    assert disc.want_service(c) is None  # full, and nothing to drop: the call's own miss stands
    disc.view.apply(pb.WatchResponse(services=[pb.ServiceUpdate(service=ref("default", "a"), exists=False, full=True)]))
    assert disc.want_service(c) is not None  # `a` (answered: no such Service) made room
    assert disc.debug()["subscribed"] == ["b.default", "c.default"]
    assert disc.want_service(a) is None  # full again (b and c await their answers)
