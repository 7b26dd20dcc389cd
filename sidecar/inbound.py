"""Mesh -> app: calls arriving over mTLS are authorized against the target Service's `allow` policy and
forwarded to the local app. It never dials anything but the local app.
"""

from __future__ import annotations

from sidecar.h2.connection import Connection, Headers, Stream
from sidecar.identity import SpiffeId
from sidecar.metrics import Metrics
from sidecar.model import Catalog, Endpoint, EndpointSet, ServiceKey
from sidecar.pool import Pool
from sidecar.relay import PERMISSION_DENIED, UNAVAILABLE, Reject, Request, Target
from sidecar.routing import Router


def allowed(policy_allow: tuple[str, ...] | None, peer: SpiffeId | None) -> bool:
    """`kuberpc.io/allow`: `ns/sa` or `ns/*` entries; absent: any meshed identity."""
    if peer is None:
        return False
    if policy_allow is None:
        return True
    for entry in policy_allow:
        ns, _, sa = entry.partition("/")
        if ns == peer.namespace and (sa == "*" or sa == peer.service_account):
            return True
    return False


class AppTarget:
    __slots__ = ("app", "pool", "service", "timeout")
    # The caller's proxy retries, within its budget: a second layer of retries would multiply attempts.
    retries = None

    def __init__(self, service: str, app: Endpoint, pool: Pool) -> None:
        self.service = service
        self.app = app
        self.pool = pool
        self.timeout: float | None = None  # the caller's proxy already applied the Service default

    def open(self, up: Stream, headers: Headers, end: bool) -> Reject | None:
        for _ in range(2):
            conn = self.pool.connection(self.app)
            up.conn = conn
            if conn.open_stream(up, headers, end):
                return None
        return Reject(UNAVAILABLE, f"kuberpc: local app at {self.app} takes no new streams", self.service)

    def done(self, latency_s: float, failure: str) -> None:
        return None


class Inbound:
    """The Router of the inbound Relay."""

    direction = "inbound"

    def __init__(self, *, app: Endpoint, namespace: str, metrics: Metrics) -> None:
        self.app = app
        self.namespace = namespace
        self.metrics = metrics
        self.pool: Pool | None = None
        self.catalog = Catalog()
        self.router = Router(self.catalog, namespace=namespace)
        self._targets: dict[str, AppTarget] = {}
        # Where peers reach this pod (its IP or listener host, and the inbound port): set once bound.
        self.addresses: frozenset[str] = frozenset()
        self.port = 0
        self.own: dict[ServiceKey, EndpointSet] = {}

    def set_listener(self, addresses: frozenset[str], port: int) -> None:
        self.addresses = addresses
        self.port = port
        self.update(self.catalog)

    def update(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.router = Router(catalog, namespace=self.namespace)
        # The Services this pod backs: the ones listing it as an endpoint. Their policies are what callers
        # must satisfy, whatever Service the caller names.
        self.own = {
            key: es
            for key, es in catalog.services.items()
            if any(ep.port == self.port and ep.address in self.addresses for ep in es.endpoints)
        }

    def route(self, conn: Connection, request: Request) -> Target | Reject:
        assert self.pool is not None
        found = self.router.resolve(request.authority, request.path)
        own = self.own
        policies: list[tuple[str, ...] | None]
        if isinstance(found, ServiceKey) and (not own or found in own):
            es = self.catalog.get(found)
            service = str(found)
            policies = [es.policy.allow if es is not None else None]
        elif own:
            # The caller named no Service of this pod (a dedicated upstream port passes the app's own
            # authority, or a peer names something else): every policy of this pod's Services applies.
            service = str(next(iter(own))) if len(own) == 1 else "unknown"
            policies = [es.policy.allow for es in own.values()]
        else:
            service = "unknown"
            policies = [None]
        peer: SpiffeId | None = conn.extra.get("peer_id")
        if not all(allowed(p, peer) for p in policies):
            self.metrics.authz_denied(service)
            who = str(peer) if peer is not None else "a caller without a mesh identity"
            return Reject(PERMISSION_DENIED, f"kuberpc: {who} is not allowed to call {service}", service)
        target = self._targets.get(service)
        if target is None:
            if len(self._targets) > 1000:
                self._targets.clear()
            target = self._targets[service] = AppTarget(service, self.app, self.pool)
        return target
