"""The control plane's catalog: Services, EndpointSlices and meshed Pods (one watch per kind, whatever the number
of proxies) turned into one EndpointSet per Service, rebuilt only for the Services a change touches.

Bookkeeping on the event loop: indexes, the data plane's own rules (sidecar/discovery/objects.py) and a
listener told what changed. Never talks gRPC and never writes to the API; `run` only owns the three watchers.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Protocol

import aiohttp

from sidecar.discovery.objects import (
    ENDPOINT_SLICES,
    PODS,
    SERVICES,
    Key,
    Kind,
    PodRecord,
    ServiceRecord,
    SliceRecord,
    T,
    endpoint_set,
)
from sidecar.discovery.watch import DEFAULT_BACKOFF, Backoff, Credentials, Watcher
from sidecar.model import EndpointSet, ServiceKey

log = logging.getLogger(__name__)

FORBIDDEN_HINT = (
    "the control plane needs list/watch on services, endpointslices and pods: "
    "its ClusterRole kuberpc-webhook (manifests/rbac.yaml) grants them"
)


class Listener(Protocol):
    """What the catalog tells about each change, synchronously, on the event loop (must not block)."""

    def services_changed(self, keys: Iterable[ServiceKey]) -> None:
        """These Services' EndpointSets changed (or appeared, or were deleted)."""

    def claims_changed(self, names: Iterable[str]) -> None:
        """The Services claiming these gRPC service names changed."""

    def selectors_changed(self, namespace: str) -> None:
        """A Service of this namespace changed its selector (or appeared, or was deleted)."""

    def pod_changed(self, key: Key) -> None:
        """This meshed pod changed (labels, service account), appeared or went away."""


class _Nobody:
    def services_changed(self, keys: Iterable[ServiceKey]) -> None:
        pass

    def claims_changed(self, names: Iterable[str]) -> None:
        pass

    def selectors_changed(self, namespace: str) -> None:
        pass

    def pod_changed(self, key: Key) -> None:
        pass


class MeshCatalog:
    """The current EndpointSet of every Service, kept by `service_changed`, `slice_changed`, `pod_changed`
    (the watchers' on_change callbacks) and read by the discovery streams.

    Work per change is proportional to what changed: a slice rebuilds its Service, a pod the Services whose
    slices name it, a Service itself; every lookup the streams make is a dict access or, for the Services
    selecting a pod, a walk over the Services of that pod's namespace that have a selector.
    """

    def __init__(self, listener: Listener | None = None) -> None:
        self.listener: Listener = listener or _Nobody()
        self.synced = asyncio.Event()  # set once every kind has been listed: until then nothing is answered
        self.rebuilds = 0  # EndpointSets computed (for the benchmark's work-per-change figure)
        self.rebuilds_of: Counter[ServiceKey] = Counter()  # the same, per Service
        self._services: dict[ServiceKey, ServiceRecord] = {}
        self._slices_of: dict[ServiceKey, dict[str, SliceRecord]] = {}
        self._pods: dict[Key, PodRecord] = {}
        self._services_of_pod: dict[Key, Counter[ServiceKey]] = {}  # pod -> Services whose slices name it
        self._sets: dict[ServiceKey, EndpointSet] = {}
        self._claims: dict[str, set[ServiceKey]] = {}
        self._selecting: dict[str, set[ServiceKey]] = {}  # namespace -> its Services with a selector
        self._problems: dict[ServiceKey, frozenset[str]] = {}
        self._problem_counts: Counter[str] = Counter()  # a pod's bad weight shows in each Service it serves

    # ---- reading ----------------------------------------------------------------------------------------

    def get(self, key: ServiceKey) -> EndpointSet | None:
        """The Service's EndpointSet; None when it does not exist."""
        return self._sets.get(key)

    def __len__(self) -> int:
        return len(self._sets)

    def claiming(self, grpc_service: str) -> tuple[ServiceKey, ...]:
        """Every Service whose `kuberpc.io/grpc-services` lists `grpc_service`, sorted by namespace then name."""
        return tuple(sorted(self._claims.get(grpc_service, ()), key=lambda k: (k.namespace, k.name)))

    def pod(self, key: Key) -> PodRecord | None:
        return self._pods.get(key)

    def selecting(self, key: Key) -> frozenset[ServiceKey] | None:
        """The Services selecting this meshed pod (Kubernetes' rule, from selectors and the pod's labels);
        None while the pod is not known."""
        pod = self._pods.get(key)
        if pod is None:
            return None
        labels = dict(pod.labels)
        chosen = (self._sets[k] for k in self._selecting.get(pod.namespace, ()))
        return frozenset(es.service for es in chosen if es.selects(pod.namespace, labels))

    # ---- feeding ----------------------------------------------------------------------------------------

    def service_changed(self, key: Key, old: ServiceRecord | None, new: ServiceRecord | None) -> None:
        skey = ServiceKey(key[1], key[0])
        if new is None:
            self._services.pop(skey, None)
        else:
            self._services[skey] = new
        self._rebuild(skey)

    def slice_changed(self, key: Key, old: SliceRecord | None, new: SliceRecord | None) -> None:
        touched: set[ServiceKey] = set()
        if old is not None:
            skey = ServiceKey(old.service, old.namespace)
            touched.add(skey)
            slices = self._slices_of.get(skey, {})
            slices.pop(old.name, None)
            if not slices:
                self._slices_of.pop(skey, None)
            self._index_pods(old, skey, -1)
        if new is not None:
            skey = ServiceKey(new.service, new.namespace)
            touched.add(skey)
            self._slices_of.setdefault(skey, {})[new.name] = new
            self._index_pods(new, skey, +1)
        for skey in sorted(touched):
            self._rebuild(skey)

    def pod_changed(self, key: Key, old: PodRecord | None, new: PodRecord | None) -> None:
        if new is None:
            self._pods.pop(key, None)
        else:
            self._pods[key] = new
        if old is None or new is None or (old.ip, old.weight, old.weight_problem) != (new.ip, new.weight, new.weight_problem):
            for skey in sorted(self._services_of_pod.get(key, ())):
                self._rebuild(skey)
        self.listener.pod_changed(key)

    def _index_pods(self, sl: SliceRecord, skey: ServiceKey, delta: int) -> None:
        for se in sl.endpoints:
            if not se.pod:
                continue
            pkey = (sl.namespace, se.pod)
            counts = self._services_of_pod.setdefault(pkey, Counter())
            counts[skey] += delta
            if counts[skey] <= 0:
                del counts[skey]
            if not counts:
                del self._services_of_pod[pkey]

    def _rebuild(self, skey: ServiceKey) -> None:
        """Recompute one Service's EndpointSet; tell the listener when it differs."""
        svc = self._services.get(skey)
        old = self._sets.get(skey)
        new: EndpointSet | None = None
        problems: frozenset[str] = frozenset()
        if svc is not None:
            self.rebuilds += 1
            self.rebuilds_of[skey] += 1
            new, found = endpoint_set(svc, self._slices_of.get(skey, {}).values(), self._pods)
            problems = frozenset(found)
        self._report(skey, problems)
        if new == old:
            return
        if new is None:
            del self._sets[skey]
        else:
            self._sets[skey] = new
        old_claims = set(old.policy.grpc_services) if old is not None else set()
        new_claims = set(new.policy.grpc_services) if new is not None else set()
        for name in old_claims - new_claims:
            claimants = self._claims[name]
            claimants.discard(skey)
            if not claimants:
                del self._claims[name]
        for name in new_claims - old_claims:
            self._claims.setdefault(name, set()).add(skey)
        old_selector = old.selector if old is not None else ()
        new_selector = new.selector if new is not None else ()
        if old_selector != new_selector:
            ns = self._selecting.setdefault(skey.namespace, set())
            if new_selector:
                ns.add(skey)
            else:
                ns.discard(skey)
                if not ns:
                    del self._selecting[skey.namespace]
        self.listener.services_changed((skey,))
        if old_claims != new_claims:
            self.listener.claims_changed(sorted(old_claims ^ new_claims))
        if old_selector != new_selector:
            self.listener.selectors_changed(skey.namespace)

    def _report(self, skey: ServiceKey, problems: frozenset[str]) -> None:
        """Log each bad value once while it stays (and again if it goes away and comes back)."""
        old = self._problems.get(skey, frozenset())
        if old == problems:
            return
        for p in old - problems:
            self._problem_counts[p] -= 1
            if self._problem_counts[p] <= 0:
                del self._problem_counts[p]
        for p in sorted(problems - old):
            if self._problem_counts[p] == 0:
                log.warning("discovery problem problem=%r (the default is used)", p)
            self._problem_counts[p] += 1
        if problems:
            self._problems[skey] = problems
        else:
            self._problems.pop(skey, None)

    # ---- watching ---------------------------------------------------------------------------------------

    async def run(
        self,
        credentials: Credentials,
        *,
        rng: random.Random,
        clock: Callable[[], float],
        backoff: Backoff = DEFAULT_BACKOFF,
    ) -> None:
        """Watch the three kinds (cluster-wide, one watch each) until cancelled."""
        watchers: list[Watcher[ServiceRecord] | Watcher[SliceRecord] | Watcher[PodRecord]] = []

        def listed() -> None:
            if all(w.synced for w in watchers) and not self.synced.is_set():
                log.info(
                    "discovery catalog synced services=%d endpoints=%d",
                    len(self._sets), sum(len(es.endpoints) for es in self._sets.values()),
                )  # fmt: skip
                self.synced.set()

        def watcher(kind: Kind[T], on_change: Callable[[Key, T | None, T | None], None]) -> Watcher[T]:
            return Watcher(
                kind,
                credentials,
                on_change=on_change,
                on_list=listed,
                rng=rng,
                clock=clock,
                backoff=backoff,
                forbidden_hint=FORBIDDEN_HINT,
            )

        watchers.extend(
            [
                watcher(PODS, self.pod_changed),
                watcher(SERVICES, self.service_changed),
                watcher(ENDPOINT_SLICES, self.slice_changed),
            ]
        )
        # limit=0: one connection per watch (HTTP/1.1 streams cannot share one), plus the occasional list.
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session, asyncio.TaskGroup() as tg:
            for w in watchers:
                tg.create_task(w.run(session), name=f"watch-{w.kind.plural}")
