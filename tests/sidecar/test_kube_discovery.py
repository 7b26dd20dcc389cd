"""Direct Kubernetes discovery: what Services, EndpointSlices and meshed Pods become, and how the proxy keeps
in step with the API (lists, watches, bookmarks, 410 Gone, outages, bursts); then real calls through proxies
that discover this way. The API is a fake with real list/watch semantics, served by kmock on loopback
(tests/kubefake.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import ssl
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import kmock
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from sidecar import config as config_mod
from sidecar.app import StartupError, serve
from sidecar.discovery import objects, watch
from sidecar.discovery.kubernetes import KubernetesDiscovery
from sidecar.discovery.objects import build_catalog, parse_pod, parse_service, parse_slice
from sidecar.discovery.watch import Backoff, Credentials
from sidecar.model import Catalog, Endpoint, ServiceKey
from tests.kubefake import FakeCluster, Obj, cluster, free_loopback_addresses, kubeconfig
from tests.sidecar.harness import (
    GRPC_OPTIONS,
    MeshCerts,
    run_proxy,
    start_backend,
    wait_for,
    wait_for_endpoints,
)

REPO = Path(__file__).resolve().parents[2]
ECHO = ServiceKey("echo", "default")
GRPC_PORT = [{"name": "grpc", "port": 50051, "targetPort": 8080, "protocol": "TCP"}]
SLICE_PORT = [{"name": "grpc", "port": 8080, "protocol": "TCP"}]
WAIT_S = 5.0
__all__ = ["cluster"]  # the fake API server fixture, shared with tests/e2e_app


# ---- API objects, as the API server returns them ----------------------------------------------------


def service(
    name: str = "echo",
    *,
    ns: str = "default",
    annotations: dict[str, str] | None = None,
    ports: list[Obj] | None = None,
    selector: dict[str, str] | None = None,
) -> Obj:
    spec: Obj = {"ports": GRPC_PORT if ports is None else ports}
    if selector is not None:
        spec["selector"] = selector
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "annotations": annotations or {}},
        "spec": spec,
    }


def pod(name: str, ip: str, *, ns: str = "default", weight: str | None = None, meshed: bool = True) -> Obj:
    labels = {"app": "echo", **({"kuberpc.io/injected": "true"} if meshed else {})}
    annotations = {"kuberpc.io/weight": weight} if weight is not None else {}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels, "annotations": annotations},
        "status": {"podIP": ip},
    }


def endpoint(address: str, pod_name: str | None = None, **conditions: bool) -> Obj:
    ep: Obj = {
        "addresses": [address],
        "conditions": conditions or {"ready": True, "serving": True, "terminating": False},
    }
    if pod_name is not None:
        ep["targetRef"] = {"kind": "Pod", "name": pod_name, "namespace": "default"}
    return ep


def endpoint_slice(
    name: str, svc: str, *endpoints: Obj, ns: str = "default", ports: list[Obj] | None = None
) -> Obj:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": SLICE_PORT if ports is None else ports,
        "endpoints": list(endpoints),
    }


def catalog_of(*objects: Obj) -> tuple[Catalog, list[str]]:
    services = [r for o in objects if o["kind"] == "Service" and (r := parse_service(o)) is not None]
    slices = [r for o in objects if o["kind"] == "EndpointSlice" and (r := parse_slice(o)) is not None]
    pods = {
        (r.namespace, r.name): r for o in objects if o["kind"] == "Pod" and (r := parse_pod(o)) is not None
    }
    return build_catalog(services, slices, pods)


def endpoints(catalog: Catalog, key: ServiceKey = ECHO) -> tuple[Endpoint, ...]:
    es = catalog.get(key)
    assert es is not None, f"{key} is not in the catalog"
    return es.endpoints


# ---- what the objects become (pure) -------------------------------------------------------------------


def test_meshed_pod_is_called_at_its_pod_ip_on_the_proxy_port_with_mtls_and_its_weight() -> None:
    catalog, problems = catalog_of(
        service(),
        pod("echo-0", "10.0.0.5", weight="250"),
        endpoint_slice("echo-a", "echo", endpoint("10.0.0.5", "echo-0")),
    )
    assert problems == []
    assert endpoints(catalog) == (Endpoint("10.0.0.5", 15443, weight=250, tls=True, pod="echo-0"),)


def test_pod_without_the_mesh_label_is_called_on_the_target_port_in_plaintext() -> None:
    catalog, _ = catalog_of(
        service(),
        pod("plain-0", "10.0.0.6", meshed=False),
        endpoint_slice("echo-a", "echo", endpoint("10.0.0.6", "plain-0")),
    )
    assert endpoints(catalog) == (Endpoint("10.0.0.6", 8080, weight=100, tls=False, pod="plain-0"),)


def test_endpoint_conditions_are_copied_and_unset_ones_mean_ready_and_not_terminating() -> None:
    catalog, _ = catalog_of(
        service(),
        endpoint_slice(
            "echo-a",
            "echo",
            endpoint("10.0.0.1", ready=False, serving=True, terminating=True),
            endpoint("10.0.0.2", ready=False, serving=False, terminating=False),
            {"addresses": ["10.0.0.3"]},
        ),
    )
    got = {e.address: (e.ready, e.serving, e.terminating) for e in endpoints(catalog)}
    assert got == {
        "10.0.0.1": (False, True, True),
        "10.0.0.2": (False, False, False),
        "10.0.0.3": (True, True, False),
    }


def test_service_annotations_become_its_policy() -> None:
    catalog, problems = catalog_of(
        service(
            annotations={
                "kuberpc.io/lb": "p2c-ewma",
                "kuberpc.io/grpc-services": "test.Echo",
                "kuberpc.io/allow": "default/client",
                "kuberpc.io/timeout": "1500ms",
                "kuberpc.io/retry": "unavailable",
                "unrelated.example.com/owner": "team-a",
            }
        )
    )
    es = catalog.get(ECHO)
    assert problems == [] and es is not None
    assert (
        es.policy.lb,
        es.policy.grpc_services,
        es.policy.allow,
        es.policy.timeout,
        es.policy.retry_on,
    ) == (
        "p2c-ewma",
        ("test.Echo",),
        ("default/client",),
        1.5,
        frozenset({"unavailable"}),
    )


def test_bad_service_annotation_is_named_and_defaulted() -> None:
    catalog, problems = catalog_of(service(annotations={"kuberpc.io/lb": "fastest"}))
    es = catalog.get(ECHO)
    assert es is not None and es.policy.lb == "weighted-round-robin"
    assert len(problems) == 1 and problems[0].startswith("service echo.default: kuberpc.io/lb: 'fastest'")


@pytest.mark.parametrize("weight", ["heavy", "10001", "-1", ""])
def test_bad_pod_weight_is_named_and_the_default_used(weight: str) -> None:
    catalog, problems = catalog_of(
        service(),
        pod("echo-0", "10.0.0.5", weight=weight),
        endpoint_slice("echo-a", "echo", endpoint("10.0.0.5", "echo-0")),
    )
    assert [e.weight for e in endpoints(catalog)] == [100]
    assert len(problems) == 1 and problems[0].startswith(f"pod default/echo-0: kuberpc.io/weight: {weight!r}")


def test_weight_zero_drains_the_pod() -> None:
    catalog, problems = catalog_of(
        service(),
        pod("echo-0", "10.0.0.5", weight="0"),
        endpoint_slice("echo-a", "echo", endpoint("10.0.0.5", "echo-0")),
    )
    assert problems == [] and [e.weight for e in endpoints(catalog)] == [0]


def test_multi_port_service_calls_plain_backends_on_its_grpc_port_and_lists_its_tcp_ports() -> None:
    ports = [
        {"name": "metrics", "port": 9090, "protocol": "TCP"},
        {"name": "dns", "port": 53, "protocol": "UDP"},
        {"name": "api", "port": 50051, "protocol": "TCP", "appProtocol": "kubernetes.io/h2c"},
    ]
    slice_ports = [
        {"name": "metrics", "port": 9090, "protocol": "TCP"},
        {"name": "dns", "port": 5353, "protocol": "UDP"},
        {"name": "api", "port": 8443, "protocol": "TCP"},
    ]
    catalog, _ = catalog_of(
        service(ports=ports), endpoint_slice("echo-a", "echo", endpoint("10.0.0.7"), ports=slice_ports)
    )
    es = catalog.get(ECHO)
    assert es is not None and es.ports == (9090, 50051)
    assert [str(e) for e in es.endpoints] == ["10.0.0.7:8443"]


def test_service_without_slices_is_known_with_no_endpoints_and_orphan_slices_are_ignored() -> None:
    catalog, _ = catalog_of(service(), endpoint_slice("ghost-a", "ghost", endpoint("10.0.0.9")))
    assert list(catalog.services) == [ECHO] and endpoints(catalog) == ()


def test_pod_listed_in_two_slices_is_one_endpoint_in_its_most_usable_state() -> None:
    catalog, _ = catalog_of(
        service(),
        endpoint_slice("echo-a", "echo", endpoint("10.0.0.5", ready=False, serving=False, terminating=False)),
        endpoint_slice("echo-b", "echo", endpoint("10.0.0.5", ready=True)),
    )
    assert [(str(e), e.ready) for e in endpoints(catalog)] == [("10.0.0.5:8080", True)]


def test_dual_stack_meshed_pod_is_one_peer_at_its_pod_ip() -> None:
    v6 = endpoint_slice("echo-v6", "echo", endpoint("fd00::5", "echo-0"))
    v6["addressType"] = "IPv6"
    catalog, _ = catalog_of(
        service(),
        pod("echo-0", "10.0.0.5"),
        endpoint_slice("echo-v4", "echo", endpoint("10.0.0.5", "echo-0")),
        v6,
    )
    assert [str(e) for e in endpoints(catalog)] == ["10.0.0.5:15443"]


@given(attempt=st.integers(1, 200), seed=st.integers(0, 2**32))
def test_backoff_is_jittered_within_half_to_full_exponential_delay_capped(attempt: int, seed: int) -> None:
    b = Backoff(base=0.5, cap=30.0)
    full = min(30.0, 0.5 * 2 ** (attempt - 1))
    assert full / 2 <= b.delay(attempt, random.Random(seed)) <= full


def test_the_services_selecting_the_proxys_own_pod_come_from_selectors_and_its_labels() -> None:
    objects = [
        service("echo", selector={"app": "echo"}),
        service("other", selector={"app": "other"}),
        # Another namespace: a matching selector and a slice listing the pod's IP change nothing.
        service("evil", ns="attacker", selector={"app": "echo"}),
        endpoint_slice("evil-a", "evil", endpoint("10.0.0.5", "echo-0"), ns="attacker"),
        # A Service without a selector whose hand-written slice lists the pod does not select it.
        service("by-hand"),
        endpoint_slice("by-hand-a", "by-hand", endpoint("10.0.0.5", "echo-0")),
        pod("echo-0", "10.0.0.5"),
    ]
    services = [r for o in objects if o["kind"] == "Service" and (r := parse_service(o)) is not None]
    slices = [r for o in objects if o["kind"] == "EndpointSlice" and (r := parse_slice(o)) is not None]
    pods = {(r.namespace, r.name): r for o in objects if o["kind"] == "Pod" and (r := parse_pod(o)) is not None}
    catalog, _ = build_catalog(services, slices, pods, ("default", "echo-0"))
    assert catalog.selecting == frozenset({ECHO})
    assert build_catalog(services, slices, pods, ("default", "not-seen-yet"))[0].selecting is None
    assert build_catalog(services, slices, pods)[0].selecting is None


def test_config_reads_the_pods_labels_and_names_bad_ones() -> None:
    base = {"KUBERPC_INBOUND_ADDR": "off", "KUBERPC_TLS_CERT": "c", "KUBERPC_TLS_KEY": "k", "KUBERPC_TRUST_ANCHORS": "a"}
    cfg = config_mod.load({**base, "KUBERPC_POD_LABELS": "app=arith, version=v1,"})
    assert cfg.pod_labels == (("app", "arith"), ("version", "v1"))
    with pytest.raises(config_mod.ConfigError, match="KUBERPC_POD_LABELS: 'arith' is not key=value"):
        config_mod.load({**base, "KUBERPC_POD_LABELS": "arith"})


def test_kubernetes_discovery_with_inbound_needs_the_pod_name_and_its_namespace_watched() -> None:
    base = {"KUBERPC_APP_PORT": "50051", "KUBERPC_TLS_CERT": "c", "KUBERPC_TLS_KEY": "k", "KUBERPC_TRUST_ANCHORS": "a"}
    with pytest.raises(config_mod.ConfigError) as e:
        config_mod.load({**base, "POD_NAMESPACE": "shop", "KUBERPC_DISCOVERY_NAMESPACES": "other"})
    assert e.value.problems == [
        "POD_NAME: required with kubernetes discovery while inbound is on (its labels decide whose allow applies)",
        "KUBERPC_DISCOVERY_NAMESPACES: must include this pod's namespace 'shop' while inbound is on",
    ]
    assert config_mod.load({**base, "POD_NAME": "cart-0", "POD_NAMESPACE": "shop"}).pod_name == "cart-0"


def test_config_reads_the_namespaces_to_watch_and_names_bad_ones() -> None:
    base = {
        "KUBERPC_INBOUND_ADDR": "off",
        "KUBERPC_TLS_CERT": "c",
        "KUBERPC_TLS_KEY": "k",
        "KUBERPC_TRUST_ANCHORS": "a",
    }
    cfg = config_mod.load(
        {**base, "KUBERPC_DISCOVERY_NAMESPACES": "team-a, team-b,team-a", "KUBECONFIG": "/k"}
    )
    assert (cfg.discovery, cfg.discovery_namespaces, cfg.kubeconfig) == (
        "kubernetes",
        ("team-a", "team-b"),
        "/k",
    )
    with pytest.raises(
        config_mod.ConfigError, match="KUBERPC_DISCOVERY_NAMESPACES: not namespace names: 'Team_A'"
    ):
        config_mod.load({**base, "KUBERPC_DISCOVERY_NAMESPACES": "Team_A,ok"})


# ---- discovery against the fake API server (tests/kubefake.py) -----------------------------------------


class Published:
    """Collects published catalogs; waits (bounded) for one that satisfies a condition."""

    def __init__(self) -> None:
        self.catalogs: list[Catalog] = []
        self.changed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def __call__(self, catalog: Catalog) -> None:
        self.catalogs.append(catalog)
        self.changed.set()

    @property
    def last(self) -> Catalog:
        assert self.catalogs, "nothing was published"
        return self.catalogs[-1]

    async def until(self, pred: Callable[[Catalog], bool], what: str) -> Catalog:
        deadline = time.monotonic() + WAIT_S
        while not (self.catalogs and pred(self.catalogs[-1])):
            if self.task is not None and self.task.done():
                self.task.result()  # raises what killed discovery
                raise AssertionError("discovery ended")
            self.changed.clear()
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await self.changed.wait()
            except TimeoutError:
                raise AssertionError(f"timed out waiting for {what}; last: {self.catalogs[-1:]}") from None
        return self.catalogs[-1]


@dataclass
class Running:
    published: Published
    restarts: list[str]


@contextlib.asynccontextmanager
async def discovering(cluster: FakeCluster, **kw: Any) -> AsyncIterator[Running]:
    published = Published()
    restarts: list[str] = []
    options: dict[str, Any] = {"coalesce": 0.01, "backoff": Backoff(base=0.02, cap=0.1), **kw}
    disc = KubernetesDiscovery(
        options.pop("credentials", Credentials(host=cluster.url)),
        rng=random.Random(7),
        clock=time.monotonic,
        on_restart=restarts.append,
        **options,
    )
    published.task = asyncio.create_task(disc.run(published))
    try:
        yield Running(published, restarts)
    finally:
        published.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await published.task


def addresses(catalog: Catalog, key: ServiceKey = ECHO) -> list[str]:
    es = catalog.get(key)
    return sorted(f"{e}/w{e.weight}/{'ready' if e.ready else 'unready'}" for e in es.endpoints) if es else []


def echo_with(*eps: Obj) -> list[Obj]:
    return [
        service(annotations={"kuberpc.io/grpc-services": "test.Echo"}),
        endpoint_slice("echo-a", "echo", *eps),
    ]


async def settle(
    cluster: FakeCluster, plurals: tuple[str, ...] = ("services", "endpointslices", "pods")
) -> None:
    """Wait until the discovery has a watch open on each kind (so a change now arrives by watch)."""
    await wait_for(
        lambda: {w.plural for w in cluster.watchers} >= set(plurals), "watches on every kind", WAIT_S
    )


# ---- list and watch ----------------------------------------------------------------------------------


async def test_initial_list_publishes_the_catalog_with_credentials_and_selectors(
    cluster: FakeCluster,
) -> None:
    cluster.put(
        *echo_with(endpoint("10.0.0.5", "echo-0"), endpoint("10.0.0.6", "plain-0")),
        pod("echo-0", "10.0.0.5", weight="300"),
        pod("plain-0", "10.0.0.6", meshed=False),
    )
    creds = Credentials(host=cluster.url, authorization=lambda: "Bearer t0k3n")
    async with discovering(cluster, credentials=creds) as run:
        catalog = await run.published.until(lambda c: ECHO in c.services, "the echo Service")
    assert addresses(catalog) == ["10.0.0.5:15443/w300/ready", "10.0.0.6:8080/w100/ready"]
    assert [e.tls for e in sorted(endpoints(catalog), key=str)] == [True, False]
    lists = [
        r for p in ("services", "endpointslices", "pods") for r in cluster.requests(kmock.action.LIST, p)
    ]
    assert {r.headers.get("Authorization") for r in lists} == {"Bearer t0k3n"}
    assert [r.params.get("labelSelector") for r in cluster.requests(kmock.action.LIST, "pods")] == [
        "kuberpc.io/injected=true"
    ]
    assert [r.params.get("resourceVersion") for r in cluster.requests(kmock.action.LIST, "pods")] == ["0"]
    assert {r.params.get("allowWatchBookmarks") for r in cluster.requests(kmock.action.WATCH, "pods")} == {
        "true"
    }


async def test_nothing_is_published_until_every_kind_has_been_listed(cluster: FakeCluster) -> None:
    cluster.put(*echo_with(endpoint("10.0.0.5", "echo-0")), pod("echo-0", "10.0.0.5", weight="7"))
    cluster.gates["pods"] = gate = asyncio.Event()
    async with discovering(cluster) as run:
        await settle(cluster, ("services", "endpointslices"))
        await asyncio.sleep(0.05)  # several coalescing periods: a partial view would have been published
        assert run.published.catalogs == []
        gate.set()
        catalog = await run.published.until(lambda c: ECHO in c.services, "the first catalog")
    # The first catalog already knows the pod is meshed: never a plaintext guess from a partial view.
    assert len(run.published.catalogs) == 1 and addresses(catalog) == ["10.0.0.5:15443/w7/ready"]


@pytest.mark.parametrize("change", ["added", "modified", "deleted"])
async def test_watch_events_update_the_published_catalog(cluster: FakeCluster, change: str) -> None:
    objects = [*echo_with(endpoint("10.0.0.5", "echo-0")), pod("echo-0", "10.0.0.5", weight="100")]
    cluster.put(*objects)
    async with discovering(cluster) as run:
        await run.published.until(
            lambda c: addresses(c) == ["10.0.0.5:15443/w100/ready"], "the initial endpoint"
        )
        await settle(cluster)
        if change == "added":
            cluster.put(
                pod("echo-1", "10.0.0.6"), endpoint_slice("echo-b", "echo", endpoint("10.0.0.6", "echo-1"))
            )
            want = ["10.0.0.5:15443/w100/ready", "10.0.0.6:15443/w100/ready"]
        elif change == "modified":
            cluster.put(pod("echo-0", "10.0.0.5", weight="40"))
            cluster.put(
                endpoint_slice(
                    "echo-a",
                    "echo",
                    endpoint("10.0.0.5", "echo-0", ready=False, serving=True, terminating=True),
                )
            )
            want = ["10.0.0.5:15443/w40/unready"]
        else:
            cluster.delete(objects[1])
            want = []
        await run.published.until(lambda c: addresses(c) == want, f"the {change} endpoint")
    assert run.restarts == []


async def test_pod_losing_its_mesh_label_is_then_called_in_plaintext(cluster: FakeCluster) -> None:
    cluster.put(*echo_with(endpoint("10.0.0.5", "echo-0")), pod("echo-0", "10.0.0.5"))
    async with discovering(cluster) as run:
        await run.published.until(
            lambda c: addresses(c) == ["10.0.0.5:15443/w100/ready"], "the meshed endpoint"
        )
        await settle(cluster)
        # The API sends a label-selected watch a DELETED event when the object stops matching.
        cluster.delete(pod("echo-0", "10.0.0.5"))
        await run.published.until(
            lambda c: addresses(c) == ["10.0.0.5:8080/w100/ready"], "the plaintext endpoint"
        )


@pytest.mark.parametrize("how", ["ERROR event on the open watch", "410 answer to the next watch"])
async def test_410_gone_relists_and_catches_up_with_changes_the_watch_never_sent(
    cluster: FakeCluster, how: str
) -> None:
    cluster.put(*echo_with(endpoint("10.0.0.5", "echo-0")), pod("echo-0", "10.0.0.5"))
    async with discovering(cluster) as run:
        await run.published.until(
            lambda c: addresses(c) == ["10.0.0.5:15443/w100/ready"], "the initial endpoint"
        )
        await settle(cluster)
        cluster.put(pod("echo-0", "10.0.0.5", weight="9"), silent=True)
        if how.startswith("ERROR"):
            cluster.expire("pods")
        else:
            cluster.compact()
            cluster.end_watches("pods")
        await run.published.until(
            lambda c: addresses(c) == ["10.0.0.5:15443/w9/ready"], "the change seen by relisting"
        )
    assert len(cluster.requests(kmock.action.LIST, "pods")) == 2
    relist = cluster.requests(kmock.action.LIST, "pods")[1]
    assert "resourceVersion" not in relist.params  # a consistent read, never older than what we had
    assert run.restarts == ["echo.default"]


async def test_bookmark_lets_the_next_watch_resume_without_relisting(cluster: FakeCluster) -> None:
    cluster.put(*echo_with(endpoint("10.0.0.5", "echo-0")), pod("echo-0", "10.0.0.5"))
    async with discovering(cluster) as run:
        await run.published.until(lambda c: ECHO in c.services, "the first catalog")
        await settle(cluster)
        cluster.put(service("other"))  # the cluster's resourceVersion moves on; no pod changes
        await run.published.until(lambda c: ServiceKey("other", "default") in c.services, "the other Service")
        bookmark_rv = str(cluster.rv)
        cluster.bookmark("pods")
        await wait_for(
            lambda: all(w.queue.empty() for w in cluster.watchers if w.plural == "pods"),
            "the bookmark sent",
            WAIT_S,
        )
        cluster.compact()  # history before the bookmark is gone: an old resourceVersion would get 410
        cluster.end_watches("pods")
        await wait_for(
            lambda: len(cluster.requests(kmock.action.WATCH, "pods")) == 2, "a second pods watch", WAIT_S
        )
        cluster.put(pod("echo-0", "10.0.0.5", weight="3"))
        await run.published.until(
            lambda c: addresses(c) == ["10.0.0.5:15443/w3/ready"], "the change after the bookmark"
        )
    assert cluster.requests(kmock.action.WATCH, "pods")[1].params["resourceVersion"] == bookmark_rv
    assert len(cluster.requests(kmock.action.LIST, "pods")) == 1
    assert run.restarts == []


async def test_watch_ended_by_the_server_resumes_from_the_last_resource_version(cluster: FakeCluster) -> None:
    cluster.put(*echo_with(endpoint("10.0.0.5", "echo-0")), pod("echo-0", "10.0.0.5"))
    async with discovering(cluster) as run:
        await run.published.until(lambda c: ECHO in c.services, "the first catalog")
        await settle(cluster)
        cluster.put(pod("echo-0", "10.0.0.5", weight="5"))
        await run.published.until(lambda c: addresses(c) == ["10.0.0.5:15443/w5/ready"], "the weight change")
        seen_rv = str(cluster.rv)
        cluster.end_watches("pods")  # as the server does after the watch's timeoutSeconds
        await wait_for(
            lambda: len(cluster.requests(kmock.action.WATCH, "pods")) == 2, "a second pods watch", WAIT_S
        )
    assert cluster.requests(kmock.action.WATCH, "pods")[1].params["resourceVersion"] == seen_rv
    assert len(cluster.requests(kmock.action.LIST, "pods")) == 1 and run.restarts == []


async def test_api_outage_keeps_the_last_catalog_backs_off_counts_restarts_and_recovers(
    cluster: FakeCluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sidecar.discovery.watch")
    cluster.put(*echo_with(endpoint("10.0.0.5", "echo-0")), pod("echo-0", "10.0.0.5"))
    async with discovering(cluster) as run:
        before = await run.published.until(lambda c: ECHO in c.services, "the first catalog")
        await settle(cluster)
        await cluster.stop()
        await wait_for(lambda: len(run.restarts) >= 9, "three failed attempts per kind", WAIT_S)
        assert run.published.catalogs == [before]  # nothing new, and nothing dropped
        pods_retries = [
            r.getMessage()
            for r in caplog.records
            if "kubernetes watch restarting kind=pods" in r.getMessage()
        ]
        attempts = [int(re.search(r"attempt=(\d+)", m).group(1)) for m in pods_retries]  # type: ignore[union-attr]
        assert len(attempts) >= 3 and attempts == list(range(attempts[0], attempts[0] + len(attempts)))
        await cluster.start()
        cluster.put(
            pod("echo-1", "10.0.0.6"), endpoint_slice("echo-b", "echo", endpoint("10.0.0.6", "echo-1"))
        )
        await run.published.until(lambda c: len(addresses(c)) == 2, "the change made after the outage")
    assert set(run.restarts) == {"echo.default"}


async def test_burst_of_events_is_coalesced_into_few_publishes(cluster: FakeCluster) -> None:
    eps = [endpoint(f"10.0.1.{i}", f"echo-{i}") for i in range(50)]
    cluster.put(*echo_with(*eps), *(pod(f"echo-{i}", f"10.0.1.{i}") for i in range(50)))
    async with discovering(cluster, coalesce=0.2) as run:
        await run.published.until(lambda c: len(addresses(c)) == 50, "the first catalog")
        await settle(cluster)
        before = len(run.published.catalogs)
        started = time.monotonic()
        for i in range(50):  # a rollout: every pod's weight changes, one event at a time
            cluster.put(pod(f"echo-{i}", f"10.0.1.{i}", weight="50"))
            await asyncio.sleep(0.001)  # paces the producer: each event reaches the proxy on its own
        spread = time.monotonic() - started
        await run.published.until(lambda c: {e.weight for e in endpoints(c)} == {50}, "every new weight")
    # At most one rebuild per coalescing period (0.2 s) of the burst, plus the trailing one.
    assert len(run.published.catalogs) - before <= 2 + spread / 0.2


async def test_bad_annotation_is_logged_once_while_it_stays(
    cluster: FakeCluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sidecar.discovery.kubernetes")
    cluster.put(service(annotations={"kuberpc.io/timeout": "soon"}), pod("echo-0", "10.0.0.5", weight="x"))
    cluster.put(endpoint_slice("echo-a", "echo", endpoint("10.0.0.5", "echo-0")))
    async with discovering(cluster) as run:
        await run.published.until(lambda c: ECHO in c.services, "the first catalog")
        await settle(cluster)
        for i in range(3):  # unrelated changes: each rebuilds and republishes the catalog
            cluster.put(service(f"other-{i}"))
            await run.published.until(
                lambda c, i=i: ServiceKey(f"other-{i}", "default") in c.services, f"other-{i}"
            )
    problems = [r.getMessage() for r in caplog.records if "kubernetes discovery problem" in r.getMessage()]
    assert len(problems) == 2
    assert any("service echo.default: kuberpc.io/timeout: 'soon'" in p for p in problems)
    assert any("pod default/echo-0: kuberpc.io/weight: 'x'" in p for p in problems)


async def test_forbidden_answer_is_logged_with_the_rbac_to_bind_and_nothing_published(
    cluster: FakeCluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sidecar.discovery.watch")
    cluster.put(*echo_with())
    cluster.forbidden.add("pods")
    async with discovering(cluster) as run:
        await wait_for(
            lambda: len(cluster.requests(kmock.action.LIST, "pods")) >= 2, "a retried pods list", WAIT_S
        )
    assert run.published.catalogs == []
    messages = [r.getMessage() for r in caplog.records]
    assert any("HTTP 403" in m and "ClusterRole kuberpc-proxy" in m and "kind=pods" in m for m in messages)


async def test_paginated_list_is_read_to_the_end(
    cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(watch, "LIST_PAGE", 2)
    cluster.put(*(service(f"svc-{i}") for i in range(5)))
    async with discovering(cluster) as run:
        catalog = await run.published.until(lambda c: len(c) == 5, "all five Services")
    assert sorted(k.name for k in catalog.services) == [f"svc-{i}" for i in range(5)]
    assert [r.params.get("continue") for r in cluster.requests(kmock.action.LIST, "services")] == [
        None,
        "2",
        "4",
    ]


async def test_namespaces_limit_what_is_watched(cluster: FakeCluster) -> None:
    cluster.put(service("a", ns="team-a"), service("b", ns="team-b"), service("c", ns="team-c"))
    async with discovering(cluster, namespaces=["team-a", "team-b"]) as run:
        catalog = await run.published.until(lambda c: len(c) == 2, "two Services")
    assert sorted(map(str, catalog.services)) == ["a.team-a", "b.team-b"]
    assert {r.namespace for r in cluster.requests(kmock.action.LIST, "services")} == {"team-a", "team-b"}


# ---- a real proxy with KUBERPC_DISCOVERY=kubernetes ------------------------------------------------------


async def test_proxy_discovers_through_the_api_and_calls_meshed_pods_by_weight_and_plain_ones_directly(
    cluster: FakeCluster, mesh_certs: MeshCerts, tmp_path: Path
) -> None:
    config = kubeconfig(tmp_path / "kubeconfig", cluster.url)
    ips = free_loopback_addresses(2)
    unused = tmp_path / "unused.yaml"
    cluster.put(
        service(
            annotations={"kuberpc.io/grpc-services": "test.Echo", "kuberpc.io/allow": "default/client"},
            selector={"app": "echo"},
        ),
        endpoint_slice("echo-a", "echo", *(endpoint(ip, f"echo-{i}") for i, ip in enumerate(ips))),
        *(pod(f"echo-{i}", ip, weight=str(w)) for i, (ip, w) in enumerate(zip(ips, (1, 3), strict=True))),
    )
    async with contextlib.AsyncExitStack() as stack:
        for i, ip in enumerate(ips):
            backend = stack.enter_context(start_backend(f"echo-{i}"))
            await stack.enter_async_context(
                run_proxy(
                    mesh_certs.server,
                    unused,
                    KUBERPC_DISCOVERY="kubernetes",
                    KUBECONFIG=str(config),
                    POD_IP=ip,
                    POD_NAME=f"echo-{i}",  # its labels, read from the API, decide which Services select it
                    KUBERPC_INBOUND_ADDR=f"{ip}:15443",
                    KUBERPC_APP_PORT=str(backend.port),
                )
            )
        plain = stack.enter_context(start_backend("plain"))
        cluster.put(
            service(
                "plain", ports=[{"name": "grpc", "port": 50051, "targetPort": plain.port, "protocol": "TCP"}]
            ),
            endpoint_slice(
                "plain-a",
                "plain",
                endpoint("127.0.0.1", "plain-0"),
                ports=[{"name": "grpc", "port": plain.port}],
            ),
            pod("plain-0", "127.0.0.1", meshed=False),
        )
        client = await stack.enter_async_context(
            run_proxy(mesh_certs.client, unused, KUBERPC_DISCOVERY="kubernetes", KUBECONFIG=str(config))
        )
        await wait_for_endpoints(client, "echo.default", 2)
        await wait_for_endpoints(client, "plain.default", 1)
        served: Counter[str] = Counter()
        async with grpc.aio.insecure_channel(client.outbound, options=GRPC_OPTIONS) as ch:
            for _ in range(40):  # the authority names no Service: routed by the gRPC service name
                call = ch.unary_unary("/test.Echo/Unary")(b"x", timeout=10)
                assert await call == b"x"
                served[dict(await call.initial_metadata())["x-served-by"]] += 1
        options = [*GRPC_OPTIONS, ("grpc.default_authority", "plain.default:50051")]
        async with grpc.aio.insecure_channel(client.outbound, options=options) as ch:
            call = ch.unary_unary("/test.Echo/Unary")(b"y", timeout=10)
            assert await call == b"y"
            assert dict(await call.initial_metadata())["x-served-by"] == "plain"
    assert served == {"echo-0": 10, "echo-1": 30}  # smooth weighted round-robin: exactly 1:3
    assert all(
        r.headers.get("Authorization") == "Bearer t0k3n" for r in cluster.requests(kmock.action.LIST, "pods")
    )


def discovery_updates(admin: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {
        s.labels["service"]: s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "kuberpc_discovery_updates_total"
    }


async def test_proxy_counts_a_discovery_update_only_for_the_services_that_changed(
    cluster: FakeCluster, mesh_certs: MeshCerts, tmp_path: Path
) -> None:
    config = kubeconfig(tmp_path / "kubeconfig", cluster.url)
    cluster.put(*echo_with(endpoint("10.0.0.5", "echo-0")), pod("echo-0", "10.0.0.5"))
    async with run_proxy(
        mesh_certs.client, tmp_path / "unused.yaml", KUBERPC_DISCOVERY="kubernetes", KUBECONFIG=str(config)
    ) as client:
        await settle(cluster)
        cluster.put(service("other"))  # the whole catalog is republished; echo did not change
        await wait_for(lambda: ServiceKey("other", "default") in client.proxy.outbound.services, "other")
        cluster.put(pod("echo-0", "10.0.0.5", weight="5"))
        await wait_for(
            lambda: [e.weight for e in client.proxy.outbound.services[ECHO].set.endpoints] == [5],
            "the new weight",
        )
        counts = await asyncio.to_thread(discovery_updates, client.admin)
    assert counts == {"echo.default": 2.0, "other.default": 1.0}


async def test_proxy_without_kubernetes_credentials_fails_to_start_naming_the_kubeconfig(
    mesh_certs: MeshCerts, tmp_path: Path
) -> None:
    w = mesh_certs.client
    cfg = config_mod.load(
        {
            "KUBERPC_OUTBOUND_ADDR": "127.0.0.1:0",
            "KUBERPC_ADMIN_ADDR": "127.0.0.1:0",
            "KUBERPC_DEBUG_ADDR": "127.0.0.1:0",
            "KUBERPC_INBOUND_ADDR": "off",
            "KUBERPC_TLS_CERT": w.cert,
            "KUBERPC_TLS_KEY": w.key,
            "KUBERPC_TRUST_ANCHORS": w.ca,
            "KUBERPC_DISCOVERY": "kubernetes",
            "KUBECONFIG": str(tmp_path / "missing"),
        }
    )
    with pytest.raises(StartupError, match=re.escape(f"kubeconfig {tmp_path / 'missing'}")):
        await serve(cfg, stop=asyncio.Event())


def test_kubeconfig_https_credentials_verify_the_server_with_the_kubeconfig_ca(
    mesh_certs: MeshCerts, tmp_path: Path
) -> None:
    path = kubeconfig(tmp_path / "kubeconfig", "https://127.0.0.1:6443")
    text = path.read_text().replace(
        'server: "https', f'certificate-authority: "{mesh_certs.client.ca}", server: "https'
    )
    path.write_text(text)
    creds = watch.load_credentials(kubeconfig=str(path))
    assert creds.host == "https://127.0.0.1:6443" and creds.authorization() == "Bearer t0k3n"
    assert creds.ssl is not None and creds.ssl.verify_mode == ssl.CERT_REQUIRED and creds.ssl.check_hostname
    assert [c["subject"] for c in creds.ssl.get_ca_certs()] == [
        c["subject"] for c in ssl.create_default_context(cafile=mesh_certs.client.ca).get_ca_certs()
    ]


# ---- the RBAC direct mode needs ----------------------------------------------------------------------


def test_proxy_cluster_role_grants_exactly_what_direct_discovery_reads() -> None:
    role = yaml.safe_load((REPO / "manifests" / "proxy-rbac.yaml").read_text())
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    read = {
        (kind.api.split("/")[2] if kind.api.startswith("/apis/") else "", kind.plural, verb)
        for kind in (objects.SERVICES, objects.ENDPOINT_SLICES, objects.PODS)
        for verb in ("get", "list", "watch")
    }
    assert (role["kind"], role["metadata"]["name"]) == ("ClusterRole", "kuberpc-proxy") and granted == read


