"""Mesh -> app: calls arriving over mTLS are authorized against the policies of the Services that select
this pod, and forwarded to the local app. It never dials anything but the local app.

Closed until it knows which Services select this pod and holds a valid certificate: before that every call
is refused, whatever its identity.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sidecar.h2.connection import Headers
from sidecar.identity import SpiffeId
from sidecar.link import Verdict
from sidecar.metrics import Metrics
from sidecar.model import Catalog, Endpoint, ServiceKey
from sidecar.pool import Pool
from sidecar.relay import PERMISSION_DENIED, UNAVAILABLE, MeshConnection, MeshStream, Reject, Request, Target
from sidecar.routing import Router

VERDICT_MEMO_LIMIT = 1024  # per connection


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


def authorize(
    catalog: Catalog,
    named: ServiceKey | None,
    peer: SpiffeId | None,
    *,
    namespace: str,
    trust_domain: str,
) -> Verdict:
    """Whether `peer` may call this pod, given the Service the call names (by :authority or path), if any.

    The one identity check of inbound: the peer must hold a workload ID of the mesh's trust domain. Then
    only Services that select this pod (`catalog.selecting`) have a say: the named one if it is among them,
    otherwise every one of them must allow the peer. Naming another Service never weakens the policy, and a
    pod no Service selects refuses everyone. The caller checks `catalog.selecting is not None` first.
    """
    selecting = catalog.selecting or frozenset()
    if named is not None and named in selecting:
        keys = [named]
    else:
        keys = sorted(selecting)
    service = str(keys[0]) if len(keys) == 1 else "unknown"
    if peer is None:
        return Verdict(service, "a caller without a mesh identity is not allowed")
    if peer.trust_domain != trust_domain:
        return Verdict(service, f"{peer} is not in the mesh trust domain {trust_domain!r}")
    if not keys:
        return Verdict(service, f"no Service in namespace {namespace} selects this pod: {peer} is not allowed")
    for key in keys:
        es = catalog.get(key)
        if es is None or not allowed(es.policy.allow, peer):
            return Verdict(service, f"{peer} is not allowed to call {key}")
    return Verdict(service)


class AppTarget:
    __slots__ = ("app", "plaintext", "pool", "service", "timeout")
    # The caller's proxy retries, within its budget: a second layer of retries would multiply attempts.
    retries = None

    def __init__(self, service: str, app: Endpoint, pool: Pool) -> None:
        self.service = service
        self.app = app
        self.pool = pool
        self.timeout: float | None = None  # the caller's proxy already applied the Service default
        self.plaintext = False  # inbound calls arrive over mTLS; the hop to the local app is on loopback

    def open(self, up: MeshStream, headers: Headers, end: bool) -> Reject | None:
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
    callers_replace = True  # callers are kuberpc proxies: a call the app never got is refused, to go elsewhere

    def __init__(
        self,
        *,
        app: Endpoint,
        namespace: str,
        trust_domain: str,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.app = app
        self.namespace = namespace
        self.trust_domain = trust_domain
        self.metrics = metrics
        self.clock = clock  # wall clock: compared with the certificate's notAfter
        self.pool: Pool | None = None
        self.catalog = Catalog()
        self.router = Router(self.catalog, namespace=namespace)
        self.cert_not_after: float | None = None  # set when the workload certificate arrives or renews
        self._targets: dict[str, AppTarget] = {}

    def update(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.router = Router(catalog, namespace=self.namespace)

    def certified(self, not_after: float) -> None:
        """The workload certificate in use now expires at `not_after` (unix seconds)."""
        self.cert_not_after = not_after

    def closed_because(self) -> str | None:
        """Why inbound refuses every call now, or None when it is open."""
        if self.catalog.selecting is None:
            return "discovery has not yet said which Services select this pod"
        if self.cert_not_after is None or self.clock() >= self.cert_not_after:
            return "this proxy has no valid certificate"
        return None

    def route(self, conn: MeshConnection, request: Request) -> Target | Reject:
        assert self.pool is not None
        if (closed := self.closed_because()) is not None:
            return Reject(UNAVAILABLE, f"kuberpc: inbound is closed: {closed}")
        # The peer is the connection's, so verdicts are kept per connection, by the call's (authority, path)
        # strings (cheap to hash) and for the catalog they were decided on; bounded, as both come from the peer.
        link = conn.link
        memo = link.verdicts
        if memo is None or memo[0] is not self.catalog or len(memo[1]) >= VERDICT_MEMO_LIMIT:
            memo = link.verdicts = (self.catalog, {})
        call = (request.authority, request.path)
        verdict = memo[1].get(call)
        if verdict is None:
            found = self.router.resolve(request.authority, request.path)
            peer = link.peer_id
            named = found if isinstance(found, ServiceKey) else None
            verdict = memo[1][call] = authorize(
                self.catalog, named, peer, namespace=self.namespace, trust_domain=self.trust_domain
            )
        service = verdict.service
        if verdict.refusal is not None:
            self.metrics.authz_denied(service)
            return Reject(PERMISSION_DENIED, f"kuberpc: {verdict.refusal}", service)
        target = self._targets.get(service)
        if target is None:
            if len(self._targets) > 1000:
                self._targets.clear()
            target = self._targets[service] = AppTarget(service, self.app, self.pool)
        return target
