"""Keeps the `kuberpc-trust-anchors` ConfigMap (the identity CA bundle) in every namespace pods may be meshed in.

Watches Namespaces with the mesh's one watcher (sidecar/discovery/watch.py) and writes only that ConfigMap.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import aiohttp
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from sidecar.discovery.objects import Key, Kind, json_map, json_str, object_key
from sidecar.discovery.watch import WATCH_SECONDS, Backoff, Credentials, Watcher, credentials_from
from webhook import annotations as a

log = logging.getLogger(__name__)

Change = Literal["created", "updated", "unchanged"]
# Kubernetes' own namespaces: the webhook never injects there (its namespaceSelector excludes them).
SYSTEM_NAMESPACES = frozenset({"kube-system", "kube-public", "kube-node-lease"})


def wants_trust_anchors(labels: Mapping[str, str] | None, *, control_plane: str, name: str) -> bool:
    """Any namespace may hold a pod opted in by annotation, whatever its labels, and the proxy's trust-anchor
    volume must exist there (as Istio keeps its root certificate in every namespace); Kubernetes' own
    namespaces are never meshed, and the control plane's gets the bundle from `install`."""
    return name != control_plane and name not in SYSTEM_NAMESPACES


@dataclass(frozen=True, slots=True)
class NamespaceRecord:
    name: str
    labels: tuple[tuple[str, str], ...] = ()
    terminating: bool = False


def parse_namespace(obj: Mapping[str, object]) -> NamespaceRecord | None:
    key = object_key(obj)
    if key is None:
        return None
    labels = json_map(json_map(obj.get("metadata")).get("labels"))
    phase = json_str(json_map(obj.get("status")).get("phase"))
    return NamespaceRecord(
        key[1], tuple(sorted((k, v) for k, v in labels.items() if isinstance(v, str))), phase == "Terminating"
    )


NAMESPACES = Kind("namespaces", "/api/v1", "", parse_namespace)
# ConfigMap writes retried from 1 s to 30 s while they fail (the API server may be restarting).
WRITE_BACKOFF = Backoff(base=1.0, cap=30.0)


class TrustAnchorSync:
    """One controller per webhook process; `run(stop)` returns as soon as `stop` is set.

    Every namespace is ensured after each complete list (so a relist also corrects drift) and whenever a
    watch event changes it; ConfigMap writes go through the official client in a thread, one at a time,
    retried with backoff while they fail.
    """

    def __init__(
        self,
        api: client.ApiClient,
        *,
        bundle: str,
        control_plane: str = a.DEFAULT_CONTROL_PLANE_NAMESPACE,
        window_seconds: int | None = None,
        backoff: Backoff = WRITE_BACKOFF,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        credentials: Credentials | None = None,
    ) -> None:
        self._core = client.CoreV1Api(api)
        self._creds = credentials or credentials_from(api.configuration)
        self._bundle = bundle
        self._control_plane = control_plane
        self._window = window_seconds
        self._backoff = backoff
        self._rng = rng or random.Random()
        self._clock = clock

    def ensure(self, namespace: str) -> Change:
        """Create or correct the ConfigMap in `namespace`; other ConfigMaps are never touched."""
        meta = client.V1ObjectMeta(
            name=a.TRUST_ANCHORS_CONFIGMAP,
            labels={"app.kubernetes.io/part-of": "kuberpc", "app.kubernetes.io/managed-by": a.WEBHOOK_NAME},
        )
        body = client.V1ConfigMap(metadata=meta, data={a.TRUST_ANCHORS_KEY: self._bundle})
        try:
            current = self._core.read_namespaced_config_map(a.TRUST_ANCHORS_CONFIGMAP, namespace, _request_timeout=10)
        except ApiException as e:
            if e.status != 404:
                raise
            try:
                self._core.create_namespaced_config_map(namespace, body, _request_timeout=10)
            except ApiException as e:
                if e.status != 409:
                    raise
                # Another replica created it between our read and our create: check what it wrote.
                return self.ensure(namespace)
            log.info("event=trust_anchors_created namespace=%s", namespace)
            return "created"
        if (current.data or {}).get(a.TRUST_ANCHORS_KEY) == self._bundle:
            return "unchanged"
        if current.metadata is not None:  # optimistic concurrency: a concurrent writer makes this a 409
            meta.resource_version = current.metadata.resource_version
        self._core.replace_namespaced_config_map(a.TRUST_ANCHORS_CONFIGMAP, namespace, body, _request_timeout=10)
        log.info("event=trust_anchors_updated namespace=%s", namespace)
        return "updated"

    def _wants(self, ns: NamespaceRecord | None) -> bool:
        if ns is None or ns.terminating:  # creating objects in a terminating namespace is refused
            return False
        return wants_trust_anchors(dict(ns.labels), control_plane=self._control_plane, name=ns.name)

    async def run(self, stop: asyncio.Event) -> None:
        pending: dict[str, None] = {}  # namespaces to ensure, in order, each once
        wake = asyncio.Event()

        def changed(key: Key, old: NamespaceRecord | None, new: NamespaceRecord | None) -> None:
            if self._wants(new):
                pending[key[1]] = None
                wake.set()

        def listed() -> None:
            log.info("event=trust_anchors_synced")
            for key, ns in watcher.records.items():
                if self._wants(ns):
                    pending[key[1]] = None
            wake.set()

        window = WATCH_SECONDS if self._window is None else (self._window, self._window)
        watcher = Watcher(
            NAMESPACES,
            self._creds,
            on_change=changed,
            on_list=listed,
            backoff=self._backoff,
            rng=self._rng,
            clock=self._clock,
            forbidden_hint="the control plane's ClusterRole kuberpc-webhook grants list/watch on namespaces",
            window=window,
        )
        async with aiohttp.ClientSession() as session, asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(watcher.run(session), name="trust-anchors-watch"),
                tg.create_task(self._write(watcher, pending, wake), name="trust-anchors-write"),
            ]
            await stop.wait()
            for task in tasks:
                task.cancel()

    async def _write(self, watcher: Watcher[NamespaceRecord], pending: dict[str, None], wake: asyncio.Event) -> None:
        failures = 0
        while True:
            await wake.wait()
            wake.clear()
            while pending:
                name = next(iter(pending))
                del pending[name]
                if not self._wants(watcher.records.get(("", name))):
                    continue  # deleted or terminating since
                try:
                    await asyncio.to_thread(self.ensure, name)
                    failures = 0
                except Exception as e:  # ApiException, urllib3 and socket errors: keep going with backoff
                    failures += 1
                    status = e.status if isinstance(e, ApiException) else type(e).__name__
                    delay = self._backoff.delay(failures, self._rng)
                    log.warning("event=trust_anchors_error namespace=%s status=%s retry_in=%.2fs", name, status, delay)
                    pending[name] = None
                    await asyncio.sleep(delay)
