"""Discovery from the Kubernetes API (direct mode, an opt-in for small clusters): this proxy watches Services,
EndpointSlices and meshed Pods itself and publishes Catalogs.

Wires the shared watcher (watch.py) to the shared pure rules (objects.py); nothing here blocks the event loop
on the network or drops the last good catalog when the API is unreachable.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterable

import aiohttp

from sidecar.discovery import ProblemLog
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
    build_catalog,
)
from sidecar.discovery.watch import DEFAULT_BACKOFF, Watcher
from sidecar.discovery.watch import Backoff as Backoff
from sidecar.discovery.watch import Credentials as Credentials
from sidecar.discovery.watch import KubernetesError as KubernetesError
from sidecar.discovery.watch import load_credentials as load_credentials
from sidecar.model import Catalog

log = logging.getLogger(__name__)

RBAC_HINT = (
    "direct discovery needs get/list/watch on services, endpointslices and pods: bind the ClusterRole "
    "kuberpc-proxy (manifests/proxy-rbac.yaml) to this pod's ServiceAccount"
)


class KubernetesDiscovery:
    """Direct mode: this proxy watches Services, EndpointSlices and meshed Pods itself.

    The first Catalog is published once every kind has been listed completely, so a proxy never turns
    ready with a partial view (its first calls would fail with "unknown service"). After that, bursts of
    events are coalesced: at most one rebuild per `coalesce` seconds, published only when it differs.
    A watch that fails is restarted with backoff; meanwhile the last good catalog stays in service.
    `on_restart(service)` is called for each Service of the current catalog when a watch restarts.
    """

    def __init__(
        self,
        credentials: Credentials,
        *,
        rng: random.Random,
        clock: Callable[[], float],
        namespaces: Iterable[str] = (),
        on_restart: Callable[[str], None] = lambda service: None,
        coalesce: float = 0.1,
        backoff: Backoff = DEFAULT_BACKOFF,
        pod: Key | None = None,
    ) -> None:
        if not coalesce >= 0:
            raise ValueError(f"coalesce must not be negative, not {coalesce!r}")
        self._creds = credentials
        self._rng = rng
        self._clock = clock
        self._namespaces: tuple[str | None, ...] = tuple(dict.fromkeys(namespaces)) or (None,)
        self._on_restart = on_restart
        self._coalesce = coalesce
        self._backoff = backoff
        self._pod = pod  # (namespace, name) of this proxy's pod: its labels decide which Services select it
        self._services: tuple[str, ...] = ()  # of the last published catalog, for on_restart

    def _restarted(self) -> None:
        for service in self._services:
            self._on_restart(service)

    async def run(self, publish: Callable[[Catalog], None]) -> None:
        changed = asyncio.Event()

        def mark(*_: object) -> None:
            changed.set()

        def watcher(kind: Kind[T], ns: str | None) -> Watcher[T]:
            return Watcher(
                kind,
                self._creds,
                namespace=ns,
                on_change=mark,
                on_list=mark,
                on_restart=self._restarted,
                backoff=self._backoff,
                rng=self._rng,
                clock=self._clock,
                forbidden_hint=RBAC_HINT,
            )

        services = [watcher(SERVICES, ns) for ns in self._namespaces]
        slices = [watcher(ENDPOINT_SLICES, ns) for ns in self._namespaces]
        pods = [watcher(PODS, ns) for ns in self._namespaces]
        everyone: list[Watcher[ServiceRecord] | Watcher[SliceRecord] | Watcher[PodRecord]] = [
            *services,
            *slices,
            *pods,
        ]
        problems = ProblemLog(log, "kubernetes discovery problem problem=%r")
        log.info(
            "kubernetes discovery starting api=%s namespaces=%s",
            self._creds.host,
            ",".join(n or "*" for n in self._namespaces),
        )
        # limit=0: one connection per watch (HTTP/1.1 streams cannot share one), plus the occasional list.
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session, asyncio.TaskGroup() as tg:
            for r in everyone:
                tg.create_task(r.run(session))
            published: Catalog | None = None
            while True:
                await changed.wait()
                # Let the rest of a burst land (a rollout sends hundreds of events within seconds).
                await asyncio.sleep(self._coalesce)
                changed.clear()
                if not all(r.synced for r in everyone):
                    continue
                all_pods: dict[Key, PodRecord] = {}
                for r in pods:
                    all_pods.update(r.records)
                catalog, found = build_catalog(
                    [s for r in services for s in r.records.values()],
                    [s for r in slices for s in r.records.values()],
                    all_pods,
                    self._pod,
                )
                problems.report(found)
                if catalog == published:
                    continue
                published = catalog
                self._services = tuple(str(k) for k in catalog.services)
                log.info(
                    "kubernetes catalog built services=%d endpoints=%d problems=%d",
                    len(catalog),
                    sum(len(es.endpoints) for es in catalog.services.values()),
                    len(found),
                )
                publish(catalog)
