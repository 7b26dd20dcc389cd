"""Inbound authorization as a property: whatever Services, selectors, endpoint lists and `allow` policies exist,
and whatever Service a caller names, a call is accepted only if a Service that selects the pod allows the caller.

Pure code (model.selecting, Router, inbound.authorize), as the proxy runs it per call.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.identity import SpiffeId
from sidecar.inbound import allowed, authorize
from sidecar.model import Catalog, Endpoint, EndpointSet, ServiceKey, ServicePolicy, selecting
from sidecar.routing import Router

TRUST_DOMAIN = "cluster.local"
POD_NAMESPACE = "default"
POD_ADDRESS = "10.0.0.7"
NAMESPACES = ("default", "attacker", "payments")
NAMES = ("arith", "echo", "evil", "a")
ACCOUNTS = ("client", "arith", "x")
LABELS = (("app", "arith"), ("app", "evil"), ("tier", "back"), ("version", "v1"))

keys = st.builds(ServiceKey, st.sampled_from(NAMES), st.sampled_from(NAMESPACES))
selectors = st.lists(st.sampled_from(LABELS), max_size=2, unique_by=lambda kv: kv[0]).map(
    lambda pairs: tuple(sorted(pairs))
)
allow_entries = st.builds(
    lambda ns, sa: f"{ns}/{sa}", st.sampled_from(NAMESPACES), st.sampled_from((*ACCOUNTS, "*"))
)
allows = st.none() | st.lists(allow_entries, max_size=3, unique=True).map(tuple)
# Whether a Service's endpoints (an EndpointSlice anyone in its namespace may write) list this pod.
endpoint_lists = st.sampled_from(
    [(), (Endpoint(POD_ADDRESS, 15443),), (Endpoint("10.0.0.8", 15443),), (Endpoint(POD_ADDRESS, 15443), Endpoint("10.0.0.8", 15443))]
)
grpc_names = st.lists(st.sampled_from(("arith.Arith", "test.Echo")), max_size=2, unique=True).map(tuple)


@st.composite
def services(draw: st.DrawFn) -> EndpointSet:
    return EndpointSet(
        draw(keys),
        draw(endpoint_lists),
        ServicePolicy(grpc_services=draw(grpc_names), allow=draw(allows), export_grpc_services=draw(st.booleans())),
        ports=(50051,),
        selector=draw(selectors),
    )


catalogs = st.lists(services(), max_size=6, unique_by=lambda es: es.service)
pod_labels = st.lists(st.sampled_from(LABELS), max_size=3, unique_by=lambda kv: kv[0]).map(dict)
peers = st.none() | st.builds(
    SpiffeId, st.sampled_from((TRUST_DOMAIN, "other.cluster")), st.sampled_from(NAMESPACES), st.sampled_from(ACCOUNTS)
)
authorities = st.none() | st.sampled_from(["127.0.0.1:15001", "arith", "evil.attacker:50051", "a.attacker", "echo.default", "evil.default"])
paths = st.sampled_from(["/arith.Arith/Add", "/test.Echo/Unary", "/x.Y/Z"])


def decide(
    sets: list[EndpointSet], labels: dict[str, str], authority: str | None, path: str, peer: SpiffeId | None
) -> tuple[Catalog, ServiceKey | None, bool]:
    catalog = Catalog(sets, selecting=selecting(sets, POD_NAMESPACE, labels))
    found = Router(catalog, namespace=POD_NAMESPACE).resolve(authority, path)
    named = found if isinstance(found, ServiceKey) else None
    verdict = authorize(catalog, named, peer, namespace=POD_NAMESPACE, trust_domain=TRUST_DOMAIN)
    return catalog, named, verdict.refusal is None


@settings(max_examples=500, deadline=None)
@given(catalogs, pod_labels, authorities, paths, peers)
def test_a_call_is_accepted_only_if_a_service_selecting_the_pod_allows_the_caller(
    sets: list[EndpointSet], labels: dict[str, str], authority: str | None, path: str, peer: SpiffeId | None
) -> None:
    catalog, named, accepted = decide(sets, labels, authority, path, peer)
    if not accepted:
        return
    assert peer is not None and peer.trust_domain == TRUST_DOMAIN
    doors = [es for es in sets if es.selects(POD_NAMESPACE, labels) and allowed(es.policy.allow, peer)]
    assert doors, "accepted without a Service that selects the pod and allows the caller"
    # Naming a Service that selects the pod binds the call to that Service's policy, not to a weaker one.
    if named is not None and (es := catalog.get(named)) is not None and es.selects(POD_NAMESPACE, labels):
        assert allowed(es.policy.allow, peer)


@settings(max_examples=200, deadline=None)
@given(catalogs, pod_labels, authorities, paths, peers)
def test_which_services_list_the_pods_address_never_changes_the_verdict(
    sets: list[EndpointSet], labels: dict[str, str], authority: str | None, path: str, peer: SpiffeId | None
) -> None:
    unlisted = [EndpointSet(es.service, (), es.policy, es.ports, es.selector) for es in sets]
    assert decide(sets, labels, authority, path, peer)[2] == decide(unlisted, labels, authority, path, peer)[2]


@settings(max_examples=200, deadline=None)
@given(catalogs, pod_labels, paths, st.builds(SpiffeId, st.just(TRUST_DOMAIN), st.sampled_from(NAMESPACES), st.sampled_from(ACCOUNTS)))
def test_a_caller_the_named_selecting_service_allows_is_accepted(
    sets: list[EndpointSet], labels: dict[str, str], path: str, peer: SpiffeId
) -> None:
    for es in sets:
        if es.selects(POD_NAMESPACE, labels) and allowed(es.policy.allow, peer):
            assert decide(sets, labels, f"{es.service}:50051", path, peer)[2], es.service
