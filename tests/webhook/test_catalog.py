"""The control plane's catalog and fan-out, offline: records in, EndpointSets and listener calls out; what each
change costs at 1,000 and 5,000 Services; deltas that rebuild the new state; subscribers marked, not queued."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proto import discovery_pb2 as pb
from sidecar.discovery.objects import (
    Key,
    PodRecord,
    ServicePort,
    ServiceRecord,
    SliceEndpoint,
    SlicePort,
    SliceRecord,
)
from sidecar.model import Endpoint, EndpointSet, ServiceKey, ServicePolicy
from webhook.catalog import MeshCatalog
from webhook.fanout import Hub, InvalidArgument, PermissionDenied, delta_update, full_update
from webhook.identity import WorkloadIdentity


class Recorder:
    def __init__(self) -> None:
        self.services: list[ServiceKey] = []
        self.claims: list[str] = []
        self.selectors: list[str] = []
        self.pods: list[Key] = []

    def services_changed(self, keys: Iterable[ServiceKey]) -> None:
        self.services.extend(keys)

    def claims_changed(self, names: Iterable[str]) -> None:
        self.claims.extend(names)

    def selectors_changed(self, namespace: str) -> None:
        self.selectors.append(namespace)

    def pod_changed(self, key: Key) -> None:
        self.pods.append(key)


def svc(name: str, ns: str = "shop", *, annotations: dict[str, str] | None = None, selector: dict[str, str] | None = None) -> ServiceRecord:
    return ServiceRecord(
        ns, name, (ServicePort("grpc", 50051),), tuple(sorted((annotations or {}).items())), tuple(sorted((selector or {}).items()))
    )


def sl(name: str, service: str, *eps: tuple[str, str], ns: str = "shop", ready: bool = True) -> SliceRecord:
    """eps: (address, pod name or "")."""
    return SliceRecord(
        ns, name, service, (SlicePort("grpc", 8080),), tuple(SliceEndpoint((a,), ready=ready, serving=ready, pod=p) for a, p in eps)
    )


def pod(name: str, ip: str, ns: str = "shop", *, weight: int = 100, labels: dict[str, str] | None = None, sa: str = "default", problem: str = "") -> PodRecord:
    return PodRecord(ns, name, ip, weight, problem, tuple(sorted((labels or {}).items())), sa)


def feed(catalog: MeshCatalog, *records: ServiceRecord | SliceRecord | PodRecord) -> None:
    for r in records:
        key = (r.namespace, r.name)
        if isinstance(r, ServiceRecord):
            catalog.service_changed(key, None, r)
        elif isinstance(r, SliceRecord):
            catalog.slice_changed(key, None, r)
        else:
            catalog.pod_changed(key, None, r)


CART = ServiceKey("cart", "shop")


def addresses(es: EndpointSet | None) -> list[tuple[str, int, int, bool]]:
    assert es is not None
    return sorted((e.address, e.port, e.weight, e.tls) for e in es.endpoints)


# ---- the catalog --------------------------------------------------------------------------------------


def test_a_meshed_pod_is_at_15443_with_tls_and_its_weight_a_plain_one_at_the_target_port() -> None:
    catalog = MeshCatalog()
    feed(catalog, svc("cart"), pod("cart-0", "10.0.0.1", weight=300), sl("cart-a", "cart", ("10.0.0.1", "cart-0"), ("10.0.0.2", "")))
    assert addresses(catalog.get(CART)) == [("10.0.0.1", 15443, 300, True), ("10.0.0.2", 8080, 100, False)]


def test_a_pod_seen_after_its_slice_turns_its_endpoint_meshed() -> None:
    catalog = MeshCatalog()
    feed(catalog, svc("cart"), sl("cart-a", "cart", ("10.0.0.1", "cart-0")))
    assert addresses(catalog.get(CART)) == [("10.0.0.1", 8080, 100, False)]
    feed(catalog, pod("cart-0", "10.0.0.1", weight=5))
    assert addresses(catalog.get(CART)) == [("10.0.0.1", 15443, 5, True)]


def test_slices_seen_before_their_service_count_once_it_exists_and_deleting_it_tells() -> None:
    rec = Recorder()
    catalog = MeshCatalog(rec)
    feed(catalog, sl("cart-a", "cart", ("10.0.0.2", "")))
    assert catalog.get(CART) is None and rec.services == []
    feed(catalog, svc("cart"))
    assert addresses(catalog.get(CART)) == [("10.0.0.2", 8080, 100, False)] and rec.services == [CART]
    catalog.service_changed(("shop", "cart"), svc("cart"), None)
    assert catalog.get(CART) is None and rec.services == [CART, CART]


@pytest.mark.parametrize("size", [1_000, 5_000])
def test_a_change_rebuilds_only_the_services_it_touches_whatever_the_cluster_size(size: int) -> None:
    rec = Recorder()
    catalog = MeshCatalog(rec)

    def full(i: int) -> SliceRecord:
        return sl(f"s{i}-a", f"s{i}", *((f"10.{i // 250}.{i % 250}.{j}", f"p{i}" if j == 1 else "") for j in range(1, 6)))

    def shrunk(i: int) -> SliceRecord:
        return sl(f"s{i}-a", f"s{i}", *((f"10.{i // 250}.{i % 250}.{j}", f"p{i}" if j == 1 else "") for j in range(1, 5)))

    for i in range(size):
        feed(catalog, svc(f"s{i}"), pod(f"p{i}", f"10.{i // 250}.{i % 250}.1"), full(i))
    assert len(catalog) == size
    before, told = catalog.rebuilds, len(rec.services)
    started = time.process_time()
    changes = 200
    for n in range(changes):
        i = (n * 7919) % size
        catalog.slice_changed(("shop", f"s{i}-a"), full(i), shrunk(i))
        catalog.slice_changed(("shop", f"s{i}-a"), shrunk(i), full(i))
    per_change = (time.process_time() - started) / (2 * changes)
    assert catalog.rebuilds - before == 2 * changes  # one Service per slice change, never the cluster
    assert len(rec.services) - told == 2 * changes
    # A pod names one Service: re-weighting it rebuilds that one.
    before = catalog.rebuilds
    catalog.pod_changed(("shop", "p3"), pod("p3", "10.0.3.1"), pod("p3", "10.0.3.1", weight=9))
    assert catalog.rebuilds - before == 1 and (("10.0.3.1", 15443, 9, True) in addresses(catalog.get(ServiceKey("s3", "shop"))))
    assert per_change < 0.005, f"{per_change * 1e6:.0f} µs of CPU per change with {size} Services"


def test_labels_of_a_pod_change_only_who_selects_it_not_any_endpoint_set() -> None:
    rec = Recorder()
    catalog = MeshCatalog(rec)
    feed(catalog, svc("cart", selector={"app": "cart"}), svc("admin", selector={"app": "cart", "tier": "admin"}))
    feed(catalog, pod("cart-0", "10.0.0.1", labels={"app": "cart"}), sl("cart-a", "cart", ("10.0.0.1", "cart-0")))
    assert catalog.selecting(("shop", "cart-0")) == {CART}
    before, told = catalog.rebuilds, len(rec.services)
    catalog.pod_changed(("shop", "cart-0"), catalog.pod(("shop", "cart-0")), pod("cart-0", "10.0.0.1", labels={"app": "cart", "tier": "admin"}))
    assert catalog.selecting(("shop", "cart-0")) == {CART, ServiceKey("admin", "shop")}
    assert (catalog.rebuilds, len(rec.services)) == (before, told) and rec.pods[-1] == ("shop", "cart-0")
    assert catalog.selecting(("shop", "unknown")) is None


def test_claims_follow_the_grpc_services_annotation_and_are_told_when_they_change() -> None:
    rec = Recorder()
    catalog = MeshCatalog(rec)
    feed(catalog, svc("cart", annotations={"kuberpc.io/grpc-services": "shop.Cart"}), svc("cart", ns="b", annotations={"kuberpc.io/grpc-services": "shop.Cart"}))
    assert catalog.claiming("shop.Cart") == (ServiceKey("cart", "b"), CART)
    catalog.service_changed(("shop", "cart"), None, svc("cart", annotations={"kuberpc.io/grpc-services": "shop.Basket"}))
    assert catalog.claiming("shop.Cart") == (ServiceKey("cart", "b"),) and catalog.claiming("shop.Basket") == (CART,)
    assert rec.claims[-2:] == ["shop.Basket", "shop.Cart"]


def test_a_bad_value_is_logged_once_while_it_stays_and_the_default_used(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="webhook.catalog")
    catalog = MeshCatalog()
    bad = svc("cart", annotations={"kuberpc.io/lb": "fastest"})
    weight = "pod shop/cart-0: kuberpc.io/weight: 'x' is not a weight (using 100)"
    feed(catalog, bad, svc("cart2"), pod("cart-0", "10.0.0.1", problem=weight))
    for name in ("cart", "cart2"):  # the pod serves both Services: its problem is still logged once
        feed(catalog, sl(f"{name}-a", name, ("10.0.0.1", "cart-0")))
    for n in range(3):  # unrelated changes of the same Service rebuild it: nothing logged again
        feed(catalog, sl("cart-b", "cart", (f"10.0.1.{n}", "")))
    es = catalog.get(CART)
    assert es is not None and es.policy.lb == "weighted-round-robin"
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert any("kuberpc.io/lb: 'fastest'" in m for m in messages) and any("kuberpc.io/weight: 'x'" in m for m in messages)
    # Fixed, then broken again: logged again.
    catalog.service_changed(("shop", "cart"), bad, svc("cart"))
    catalog.service_changed(("shop", "cart"), svc("cart"), bad)
    assert len([r for r in caplog.records if "fastest" in r.getMessage()]) == 2


# ---- wire values ------------------------------------------------------------------------------------------


def test_the_policy_travels_parsed_with_grpc_status_names() -> None:
    policy = ServicePolicy(lb="p2c-ewma", allow=("ops/*",), timeout=2.5, retry_on=frozenset({"unavailable", "resource-exhausted"}))
    update = full_update(CART, EndpointSet(CART, (Endpoint("10.0.0.1", 15443, pod="cart-0", zone="z1"),), policy, (50051,)))
    assert update.full and update.exists and update.ports_changed and list(update.ports) == [50051]
    assert (update.policy.lb, list(update.policy.allow), update.policy.allow_any, update.policy.timeout_seconds) == ("p2c-ewma", ["ops/*"], False, 2.5)
    assert list(update.policy.retry_on) == ["RESOURCE_EXHAUSTED", "UNAVAILABLE"]
    assert (update.endpoints[0].pod, update.endpoints[0].zone) == ("shop/cart-0", "z1")
    assert full_update(CART, EndpointSet(CART)).policy.allow_any


endpoint_st = st.builds(
    Endpoint,
    address=st.sampled_from(["10.0.0.1", "10.0.0.2", "10.0.0.3", "fd00::1"]),
    port=st.sampled_from([8080, 15443]),
    weight=st.integers(0, 3),
    tls=st.booleans(),
    ready=st.booleans(),
    terminating=st.booleans(),
)
set_st = st.builds(
    lambda eps, lb, ports: EndpointSet(CART, tuple({e.key: e for e in eps}.values()), ServicePolicy(lb=lb), ports),
    st.lists(endpoint_st, max_size=6),
    st.sampled_from(["random", "round-robin"]),
    st.sampled_from([(80,), (80, 81)]),
)


@given(old=set_st, new=set_st)
def test_a_delta_applied_to_the_old_state_gives_the_new_one(old: EndpointSet, new: EndpointSet) -> None:
    update = delta_update(CART, old, new)
    have = {(e.address, e.port): full_update(CART, old).endpoints[i] for i, e in enumerate(sorted(old.endpoints, key=lambda e: e.key))}
    policy, ports = full_update(CART, old).policy, list(old.ports)
    if update is None:
        assert (old.endpoints and sorted(old.endpoints, key=lambda e: e.key)) == (new.endpoints and sorted(new.endpoints, key=lambda e: e.key))
        assert old.policy == new.policy and old.ports == new.ports
        return
    assert not update.full
    for k in update.removed:
        del have[(k.address, k.port)]
    for e in update.endpoints:
        have[(e.address, e.port)] = e
    if update.HasField("policy"):
        policy = update.policy
    if update.ports_changed:
        ports = list(update.ports)
    want = full_update(CART, new)
    assert sorted(have.values(), key=lambda e: (e.address, e.port)) == list(want.endpoints)
    assert policy == want.policy and ports == list(want.ports)


def test_a_service_that_appears_or_goes_is_sent_whole() -> None:
    es = EndpointSet(CART, (Endpoint("10.0.0.1", 8080),))
    assert delta_update(CART, None, None) is None
    gone = delta_update(CART, es, None)
    assert gone is not None and (gone.full, gone.exists) == (True, False)
    back = delta_update(CART, None, es)
    assert back is not None and back.full and back.exists and len(back.endpoints) == 1


# ---- subscribers ------------------------------------------------------------------------------------------


WEB = WorkloadIdentity("cluster.local", "shop", "web")


def test_a_subscriber_that_is_not_written_to_holds_one_mark_per_service_however_many_changes() -> None:
    catalog = MeshCatalog()
    hub = Hub(catalog)
    feed(catalog, svc("cart"), svc("other"))
    sub = hub.subscriber(WEB)
    sub.apply(pb.WatchRequest(subscribe=[pb.ServiceRef(namespace="shop", name="cart")]))
    first = sub.next_response()
    assert first is not None and first.services[0].full
    for n in range(1_000):  # the writer is stuck: changes only mark
        feed(catalog, sl("cart-a", "cart", (f"10.0.{n // 250}.{n % 250}", "")), sl("other-a", "other", ("10.9.0.1", "")))
    assert sub.pending == 1
    update = sub.next_response()
    assert update is not None and [e.address for e in update.services[0].endpoints] == ["10.0.3.249"]
    assert sub.next_response() is None


def test_the_pod_is_checked_against_the_identity() -> None:
    catalog = MeshCatalog()
    hub = Hub(catalog)
    feed(catalog, pod("web-0", "10.0.0.1", sa="web"), pod("cart-0", "10.0.0.2", sa="cart"))
    with pytest.raises(PermissionDenied, match="not in namespace shop"):
        hub.subscriber(WEB).apply(pb.WatchRequest(pod=pb.PodRef(namespace="bank", name="web-0")))
    sub = hub.subscriber(WEB)
    sub.apply(pb.WatchRequest(pod=pb.PodRef(namespace="shop", name="cart-0")))
    with pytest.raises(PermissionDenied, match="runs as service account cart"):
        sub.next_response()
    ok = hub.subscriber(WEB)
    ok.apply(pb.WatchRequest(pod=pb.PodRef(namespace="shop", name="web-0")))
    response = ok.next_response()
    assert response is not None and response.HasField("selecting") and list(response.selecting.services) == []
    with pytest.raises(InvalidArgument, match="cannot change"):
        ok.apply(pb.WatchRequest(pod=pb.PodRef(namespace="shop", name="web-1")))


def test_an_unknown_pod_is_waited_for_then_checked() -> None:
    catalog = MeshCatalog()
    hub = Hub(catalog)
    sub = hub.subscriber(WEB)
    sub.apply(pb.WatchRequest(pod=pb.PodRef(namespace="shop", name="web-0")))
    assert sub.next_response() is None
    feed(catalog, svc("web", selector={"app": "web"}), pod("web-0", "10.0.0.1", sa="web", labels={"app": "web"}))
    response = sub.next_response()
    assert response is not None and [s.name for s in response.selecting.services] == ["web"]
    assert [u.service.name for u in response.services] == ["web"]


def test_removing_a_subscriber_leaves_no_index_behind() -> None:
    catalog = MeshCatalog()
    hub = Hub(catalog)
    feed(catalog, svc("cart", annotations={"kuberpc.io/grpc-services": "shop.Cart"}), pod("web-0", "10.0.0.1", sa="web"))
    sub = hub.subscriber(WEB)
    sub.apply(pb.WatchRequest(subscribe=[pb.ServiceRef(namespace="shop", name="x")], grpc_services=["shop.Cart"], pod=pb.PodRef(namespace="shop", name="web-0")))
    sub.next_response()
    hub.remove(sub)
    assert not hub.subscribers
    assert not (hub._by_service or hub._by_name or hub._by_pod or hub._by_pod_namespace)
