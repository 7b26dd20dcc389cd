"""Fan-out of the catalog to the discovery streams: each subscriber's interest, what it was last sent, and its
next response built from what changed since, coalesced (the latest state per Service, never a queue).

No gRPC and no I/O: the service (discovery_service.py) feeds requests to `Subscriber.apply` and writes what
`Subscriber.next_response` builds; the Hub, the catalog's listener, only marks subscribers dirty.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TypeVar

from proto import discovery_pb2 as pb
from sidecar.discovery.objects import Key
from sidecar.model import Endpoint, EndpointSet, ServiceKey, ServicePolicy
from sidecar.policy import is_dns_label, is_grpc_service_name
from webhook.catalog import MeshCatalog
from webhook.identity import WorkloadIdentity

# Bounds on one stream's interest: a proxy calls tens of Services; these only stop a runaway client.
MAX_SUBSCRIPTIONS = 10_000
MAX_GRPC_SERVICES = 1_000

K = TypeVar("K")


class StreamError(Exception):
    """A request the stream cannot go on with; discovery_service.py maps each kind to one gRPC status."""


class InvalidArgument(StreamError):
    """A malformed name, or more interest than the bounds allow."""


class PermissionDenied(StreamError):
    """The `pod` is not the client certificate's identity's."""


class Unauthenticated(StreamError):
    """No mesh identity in the client certificate."""


# ---- wire values (pure) ----------------------------------------------------------------------------------


def _ref(key: ServiceKey) -> pb.ServiceRef:
    return pb.ServiceRef(namespace=key.namespace, name=key.name)


def endpoint_message(ep: Endpoint, namespace: str) -> pb.Endpoint:
    return pb.Endpoint(
        address=ep.address,
        port=ep.port,
        weight=ep.weight,
        tls=ep.tls,
        ready=ep.ready,
        serving=ep.serving,
        terminating=ep.terminating,
        zone=ep.zone,
        pod=f"{namespace}/{ep.pod}" if ep.pod else "",
    )


def policy_message(policy: ServicePolicy) -> pb.Policy:
    return pb.Policy(
        lb=policy.lb,
        grpc_services=policy.grpc_services,
        allow=policy.allow or (),
        allow_any=policy.allow is None,
        timeout_seconds=policy.timeout or 0.0,
        # The annotation's kebab-case names, as gRPC spells the codes (UNAVAILABLE, RESOURCE_EXHAUSTED).
        retry_on=sorted(code.upper().replace("-", "_") for code in policy.retry_on),
        retry_budget=policy.retry_budget,
        export_grpc_services=policy.export_grpc_services,
    )


def full_update(key: ServiceKey, es: EndpointSet | None) -> pb.ServiceUpdate:
    """The whole state of a Service (replaces what the proxy had); `exists` false when there is none."""
    if es is None:
        return pb.ServiceUpdate(service=_ref(key), exists=False, full=True)
    return pb.ServiceUpdate(
        service=_ref(key),
        exists=True,
        full=True,
        endpoints=[endpoint_message(e, key.namespace) for e in sorted(es.endpoints, key=lambda e: e.key)],
        policy=policy_message(es.policy),
        ports=es.ports,
        ports_changed=True,
        selector=dict(es.selector),
        selector_changed=True,
    )


def delta_update(key: ServiceKey, old: EndpointSet | None, new: EndpointSet | None) -> pb.ServiceUpdate | None:
    """What turns `old` (what the proxy has) into `new`; None when nothing does. A Service that appears or
    disappears is sent whole."""
    if old is None or new is None:
        return None if old is new else full_update(key, new)
    before = {e.key: e for e in old.endpoints}
    after = {e.key: e for e in new.endpoints}
    changed = [e for k, e in sorted(after.items()) if before.get(k) != e]
    removed = sorted(k for k in before if k not in after)
    update = pb.ServiceUpdate(service=_ref(key), exists=True, full=False)
    update.endpoints.extend(endpoint_message(e, key.namespace) for e in changed)
    update.removed.extend(pb.EndpointKey(address=a, port=p) for a, p in removed)
    touched = bool(changed or removed)
    if old.policy != new.policy:
        update.policy.CopyFrom(policy_message(new.policy))
        touched = True
    if old.ports != new.ports:
        update.ports.extend(new.ports)
        update.ports_changed = touched = True
    if old.selector != new.selector:
        update.selector.update(dict(new.selector))
        update.selector_changed = touched = True
    return update if touched else None


def _service_key(ref: pb.ServiceRef) -> ServiceKey:
    if not (is_dns_label(ref.namespace) and is_dns_label(ref.name)):
        raise InvalidArgument(f"{ref.namespace[:100]!r}/{ref.name[:100]!r} is not a Service (namespace/name)")
    return ServiceKey(ref.name, ref.namespace)


# ---- subscribers and the hub -----------------------------------------------------------------------------


class Subscriber:
    """One stream's interest and what it was sent. Dirty marks accumulate while a write is in flight, so a slow
    stream's next response carries the latest state of each changed Service, whatever happened in between."""

    def __init__(self, identity: WorkloadIdentity, catalog: MeshCatalog, hub: Hub) -> None:
        self.identity = identity
        self.wake = asyncio.Event()
        self._catalog = catalog
        self._hub = hub
        self._explicit: set[ServiceKey] = set()
        self._names: set[str] = set()
        self._claims_sent: dict[str, tuple[ServiceKey, ...]] = {}
        self.pod: Key | None = None
        self._selecting_sent: frozenset[ServiceKey] | None = None
        self.effective: frozenset[ServiceKey] = frozenset()
        self._sent: dict[ServiceKey, EndpointSet | None] = {}  # what the proxy holds (None: "does not exist")
        self._dirty: set[ServiceKey] = set()
        self._dirty_names: set[str] = set()
        self._dirty_pod = False
        self.responses = 0  # written so far (counted by the service once each write completes)

    # -- what the hub calls

    def service_dirty(self, key: ServiceKey) -> None:
        self._dirty.add(key)
        self.wake.set()

    def name_dirty(self, name: str) -> None:
        self._dirty_names.add(name)
        self.wake.set()

    def pod_dirty(self) -> None:
        self._dirty_pod = True
        self.wake.set()

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._names)

    @property
    def pending(self) -> int:
        """Changes marked and not yet sent (bounded by the interest: one per Service, name, and the pod)."""
        return len(self._dirty) + len(self._dirty_names) + int(self._dirty_pod)

    # -- requests

    def apply(self, request: pb.WatchRequest) -> None:
        """Take a request's changes of interest; raises InvalidArgument or PermissionDenied."""
        subscribe = [_service_key(r) for r in request.subscribe]
        unsubscribe = [_service_key(r) for r in request.unsubscribe]
        for name in request.grpc_services:
            if not is_grpc_service_name(name):
                raise InvalidArgument(f"{name[:100]!r} is not a gRPC service name (like pkg.Service)")
        if request.HasField("pod"):
            ref = request.pod
            if not (is_dns_label(ref.namespace) and ref.name and len(ref.name) <= 253):
                raise InvalidArgument(f"{ref.namespace[:100]!r}/{ref.name[:100]!r} is not a pod (namespace/name)")
            if ref.namespace != self.identity.namespace:
                raise PermissionDenied(
                    f"pod {ref.namespace}/{ref.name} is not in namespace {self.identity.namespace} "
                    f"of the client's identity {self.identity.uri}"
                )
            pod = (ref.namespace, ref.name)
            if self.pod is not None and pod != self.pod:
                raise InvalidArgument(f"the stream's pod is {self.pod[0]}/{self.pod[1]}: it cannot change")
            if self.pod is None:
                self.pod = pod
                self._hub.pod_set(self)
                self._dirty_pod = True
        self._explicit.difference_update(unsubscribe)
        self._explicit.update(subscribe)
        fresh = [n for n in request.grpc_services if n not in self._names]
        self._names.update(fresh)
        self._dirty_names.update(fresh)
        self._hub.names_added(self, fresh)
        if len(self._explicit) > MAX_SUBSCRIPTIONS or len(self._names) > MAX_GRPC_SERVICES:
            raise InvalidArgument(
                f"at most {MAX_SUBSCRIPTIONS} Services and {MAX_GRPC_SERVICES} gRPC service names per stream"
            )
        self._refresh()
        self.wake.set()

    def _refresh(self) -> None:
        """Recompute the Services streamed (asked for, claiming an asked name, selecting the pod); the newly
        streamed ones get a snapshot, the dropped ones are forgotten."""
        effective = set(self._explicit)
        for claims in self._claims_sent.values():
            effective.update(claims)
        effective.update(self._selecting_sent or ())
        now = frozenset(effective)
        if now == self.effective:
            return
        added, removed = now - self.effective, self.effective - now
        self.effective = now
        for key in removed:
            self._sent.pop(key, None)
            self._dirty.discard(key)
        for key in added:
            self._sent.pop(key, None)
            self._dirty.add(key)
        self._hub.reindex(self, added, removed)

    # -- responses

    def next_response(self) -> pb.WatchResponse | None:
        """Everything that changed since the last response, as one response; None when nothing did.

        Raises PermissionDenied once the pod is known to run as another service account."""
        response = pb.WatchResponse()
        names, self._dirty_names = sorted(self._dirty_names), set()
        for name in names:
            claims = self._catalog.claiming(name)
            if self._claims_sent.get(name) != claims:
                self._claims_sent[name] = claims
                response.claims.append(pb.GrpcServiceClaims(grpc_service=name, services=[_ref(k) for k in claims]))
        if self._dirty_pod and self.pod is not None:
            self._dirty_pod = False
            record = self._catalog.pod(self.pod)
            # An unknown pod is waited for (a new pod may reach this replica's watch after its proxy asks).
            if record is not None:
                if record.service_account != self.identity.service_account:
                    raise PermissionDenied(
                        f"pod {self.pod[0]}/{self.pod[1]} runs as service account {record.service_account}, "
                        f"not {self.identity.service_account} of the client's identity {self.identity.uri}"
                    )
                selecting = self._catalog.selecting(self.pod) or frozenset()
                if selecting != self._selecting_sent:
                    self._selecting_sent = selecting
                    ordered = sorted(selecting, key=lambda k: (k.namespace, k.name))
                    response.selecting.CopyFrom(pb.Selecting(services=[_ref(k) for k in ordered]))
        self._refresh()
        dirty, self._dirty = sorted(self._dirty & self.effective), set()
        for key in dirty:
            current = self._catalog.get(key)
            if key in self._sent:
                update = delta_update(key, self._sent[key], current)
            else:
                update = full_update(key, current)
            self._sent[key] = current
            if update is not None:
                response.services.append(update)
        if response.services or response.claims or response.HasField("selecting"):
            return response
        return None


class Hub:
    """The catalog's listener: marks the subscribers a change concerns, through indexes by Service, gRPC
    service name, pod and pod namespace (work per change: the subscribers concerned, not all of them)."""

    def __init__(self, catalog: MeshCatalog) -> None:
        self._catalog = catalog
        catalog.listener = self
        self.subscribers: set[Subscriber] = set()
        self._by_service: dict[ServiceKey, set[Subscriber]] = {}
        self._by_name: dict[str, set[Subscriber]] = {}
        self._by_pod: dict[Key, set[Subscriber]] = {}
        self._by_pod_namespace: dict[str, set[Subscriber]] = {}

    def subscriber(self, identity: WorkloadIdentity) -> Subscriber:
        sub = Subscriber(identity, self._catalog, self)
        self.subscribers.add(sub)
        return sub

    def remove(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)
        self.reindex(sub, (), sub.effective)
        for name in sub.names:
            _discard(self._by_name, name, sub)
        if sub.pod is not None:
            _discard(self._by_pod, sub.pod, sub)
            _discard(self._by_pod_namespace, sub.pod[0], sub)

    def reindex(self, sub: Subscriber, added: Iterable[ServiceKey], removed: Iterable[ServiceKey]) -> None:
        for key in removed:
            _discard(self._by_service, key, sub)
        for key in added:
            self._by_service.setdefault(key, set()).add(sub)

    def names_added(self, sub: Subscriber, names: Iterable[str]) -> None:
        for name in names:
            self._by_name.setdefault(name, set()).add(sub)

    def pod_set(self, sub: Subscriber) -> None:
        assert sub.pod is not None
        self._by_pod.setdefault(sub.pod, set()).add(sub)
        self._by_pod_namespace.setdefault(sub.pod[0], set()).add(sub)

    # -- Listener

    def services_changed(self, keys: Iterable[ServiceKey]) -> None:
        for key in keys:
            for sub in self._by_service.get(key, ()):
                sub.service_dirty(key)

    def claims_changed(self, names: Iterable[str]) -> None:
        for name in names:
            for sub in self._by_name.get(name, ()):
                sub.name_dirty(name)

    def selectors_changed(self, namespace: str) -> None:
        for sub in self._by_pod_namespace.get(namespace, ()):
            sub.pod_dirty()

    def pod_changed(self, key: Key) -> None:
        for sub in self._by_pod.get(key, ()):
            sub.pod_dirty()


def _discard(index: dict[K, set[Subscriber]], key: K, sub: Subscriber) -> None:
    subs = index.get(key)
    if subs is not None:
        subs.discard(sub)
        if not subs:
            del index[key]
