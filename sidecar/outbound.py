"""App -> mesh: route each call to a Service, pick an endpoint with its balancer, forward it.

Routing and balancing are the pure modules' decisions; this module only keeps their state per catalog.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

from sidecar.balancer import Balancer, make_balancer
from sidecar.h2.connection import Connection, Headers, Stream
from sidecar.metrics import Metrics
from sidecar.model import Catalog, Endpoint, EndpointSet, ServiceKey
from sidecar.pool import Pool
from sidecar.relay import UNAVAILABLE, Reject, Request, Target
from sidecar.routing import RouteMiss, Router

log = logging.getLogger(__name__)


class ServiceState:
    """One Service as the outbound side uses it: endpoints, balancer, default deadline."""

    __slots__ = ("balancer", "key", "label", "set", "timeout")

    def __init__(self, es: EndpointSet, balancer: Balancer) -> None:
        self.key = es.service
        self.label = str(es.service)
        self.set = es
        self.balancer = balancer
        self.timeout = es.policy.timeout


class Placement:
    """One call placed on one endpoint (Target of relay.py)."""

    __slots__ = ("endpoint", "plaintext", "pool", "service", "state", "timeout")

    def __init__(self, state: ServiceState, pool: Pool) -> None:
        self.state = state
        self.pool = pool
        self.service = state.label
        self.timeout = state.timeout
        self.endpoint: Endpoint | None = None
        self.plaintext = False

    def open(self, up: Stream, headers: Headers, end: bool) -> Reject | None:
        if self.endpoint is not None:
            self.state.balancer.done(self.endpoint, 0.0)  # re-placed after a refusal: release the first pick
        ep = self.state.balancer.pick()
        if ep is None:
            return Reject(UNAVAILABLE, f"service {self.service} has no endpoint with weight > 0", self.service)
        self.endpoint = ep
        self.plaintext = not ep.tls
        for _ in range(2):
            conn = self.pool.connection(ep)
            up.conn = conn
            if conn.open_stream(up, headers, end):
                return None
        return Reject(UNAVAILABLE, f"no usable connection to {ep} for {self.service}", self.service)

    def done(self, latency_s: float, ok: bool) -> None:
        if self.endpoint is not None:
            self.state.balancer.done(self.endpoint, latency_s)


class Outbound:
    """The Router of the outbound Relay."""

    direction = "outbound"

    def __init__(
        self,
        *,
        namespace: str,
        metrics: Metrics,
        rng: random.Random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.namespace = namespace
        self.metrics = metrics
        self.rng = rng
        self.clock = clock
        self.pool: Pool | None = None  # set by app.py once the relay exists (the pool needs the relay)
        self.catalog = Catalog()
        self.router = Router(self.catalog, namespace=namespace)
        self.services: dict[ServiceKey, ServiceState] = {}

    def update(self, catalog: Catalog) -> None:
        old = self.services
        new: dict[ServiceKey, ServiceState] = {}
        for key, es in catalog.services.items():
            usable = es.usable()
            st = old.get(key)
            if st is not None and st.set.policy.lb == es.policy.lb:
                st.balancer.update(usable)
                st.set = es
                st.timeout = es.policy.timeout
            else:
                st = ServiceState(es, make_balancer(es.policy.lb, usable, rng=self.rng, clock=self.clock))
            new[key] = st
            self.metrics.set_endpoints(str(key), ready=len(usable), ejected=0)
        for key in old.keys() - new.keys():
            self.metrics.forget_service(str(key))
        self.services = new
        self.catalog = catalog
        self.router = Router(catalog, namespace=self.namespace)
        if self.pool is not None:
            self.pool.retain(ep.key for es in catalog.services.values() for ep in es.endpoints)

    def route(self, conn: Connection, request: Request) -> Target | Reject:
        assert self.pool is not None
        found = self.router.resolve(request.authority, request.path, conn.extra.get("upstream"))
        if isinstance(found, RouteMiss):
            return Reject(UNAVAILABLE, f"kuberpc: {found.looked_up}")
        st = self.services.get(found)
        if st is None or not st.set.usable():
            return Reject(UNAVAILABLE, f"kuberpc: service {found} has no ready endpoints", str(found))
        return Placement(st, self.pool)

    def debug(self) -> dict[str, object]:
        return {
            str(k): {
                "policy": st.set.policy.lb,
                "timeout": st.timeout,
                "endpoints": _with_tls(st),
            }
            for k, st in self.services.items()
        }


def _with_tls(st: ServiceState) -> list[dict[str, object]]:
    """The balancer's view of each endpoint, saying whether calls to it use mTLS (tls: false: plaintext)."""
    tls: dict[tuple[object, object], bool] = {(ep.address, ep.port): ep.tls for ep in st.set.endpoints}
    return [{**d, "tls": tls.get((d.get("address"), d.get("port")), True)} for d in st.balancer.state()]
