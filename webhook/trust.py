"""Keeps the `kuberpc-trust-anchors` ConfigMap (the identity CA bundle) in every namespace pods may be meshed in.

Lists then watches Namespaces (relisting on 410 Gone, backing off on errors) and writes only that ConfigMap.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping
from typing import Literal

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

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


class TrustAnchorSync:
    """One controller per webhook process; `run(stop)` returns when `stop` is set (after the current watch window)."""

    def __init__(
        self,
        api: client.ApiClient,
        *,
        bundle: str,
        control_plane: str = a.DEFAULT_CONTROL_PLANE_NAMESPACE,
        window_seconds: int = 20,
        max_backoff: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        self._core = client.CoreV1Api(api)
        self._bundle = bundle
        self._control_plane = control_plane
        self._window = window_seconds
        self._max_backoff = max_backoff
        self._rng = rng or random.Random()

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

    def _handle(self, ns: client.V1Namespace) -> None:
        meta = ns.metadata
        if meta is None or not meta.name:
            return
        if not wants_trust_anchors(meta.labels, control_plane=self._control_plane, name=meta.name):
            return
        if ns.status is not None and ns.status.phase == "Terminating":
            return  # creating objects in a terminating namespace is refused
        self.ensure(meta.name)

    def sync_all(self) -> str:
        """Ensure every namespace that wants the bundle; returns the list's resourceVersion to watch from."""
        listing = self._core.list_namespace(_request_timeout=30)
        for ns in listing.items:
            self._handle(ns)
        return str(listing.metadata.resource_version if listing.metadata else "")

    def watch_window(self, resource_version: str) -> str:
        """Apply namespace events for one bounded window; returns the resourceVersion to resume from."""
        w = watch.Watch()  # type: ignore[no-untyped-call]
        for event in w.stream(  # type: ignore[no-untyped-call]
            self._core.list_namespace,
            resource_version=resource_version,
            timeout_seconds=self._window,
            allow_watch_bookmarks=True,
            _request_timeout=self._window + 10,
        ):
            obj = event["object"]
            if isinstance(obj, dict):
                # The client leaves BOOKMARK (and ERROR) objects undeserialized: a bookmark only moves the
                # resourceVersion on; an ERROR carries the API's Status (410 Gone when ours is too old).
                if event["type"] == "ERROR":
                    raise ApiException(status=int(obj.get("code") or 500), reason=str(obj.get("message", "")))
                rv = (obj.get("metadata") or {}).get("resourceVersion")
                if rv:
                    resource_version = str(rv)
                continue
            if obj.metadata is not None and obj.metadata.resource_version:
                resource_version = obj.metadata.resource_version
            if event["type"] in ("ADDED", "MODIFIED"):
                self._handle(obj)
        return resource_version

    async def run(self, stop: asyncio.Event) -> None:
        backoff = 1.0
        resource_version: str | None = None
        while not stop.is_set():
            try:
                if resource_version is None:
                    resource_version = await asyncio.to_thread(self.sync_all)
                    log.info("event=trust_anchors_synced")
                resource_version = await asyncio.to_thread(self.watch_window, resource_version)
                backoff = 1.0
            except ApiException as e:
                if e.status == 410:  # our resourceVersion is too old: list again
                    resource_version = None
                    continue
                log.warning("event=trust_anchors_error status=%s", e.status)
                resource_version = None
                backoff = await self._pause(stop, backoff)
            except Exception as e:  # network errors from urllib3: keep going with backoff
                log.warning("event=trust_anchors_error error=%s", type(e).__name__)
                resource_version = None
                backoff = await self._pause(stop, backoff)

    async def _pause(self, stop: asyncio.Event, backoff: float) -> float:
        delay = backoff * (0.5 + self._rng.random())  # jitter: replicas do not retry in step
        try:
            async with asyncio.timeout(delay):
                await stop.wait()
        except TimeoutError:
            pass
        return min(self._max_backoff, backoff * 2)
