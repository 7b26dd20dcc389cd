"""App -> mesh: route each call to a Service, pick an endpoint with its balancer, forward it.

Routing and balancing are the pure modules' decisions; this module only keeps their state per catalog.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from functools import partial

from sidecar.balancer import FailureAccrual, make_balancer
from sidecar.h2.connection import Headers
from sidecar.metrics import Metrics
from sidecar.model import Catalog, Endpoint, EndpointSet, ServiceKey
from sidecar.pool import Pool
from sidecar.relay import NO_RESPONSE, UNAVAILABLE, MeshConnection, MeshStream, Reject, Request, Target
from sidecar.retry import RetryPolicy
from sidecar.routing import RouteMiss, Router

log = logging.getLogger(__name__)


class ServiceState:
    """One Service as the outbound side uses it: endpoints, balancer (with failure accrual), default deadline."""

    __slots__ = ("balancer", "clock", "key", "label", "metrics", "reported", "retries", "retry_key", "set", "timeout")

    def __init__(
        self, es: EndpointSet, balancer: FailureAccrual, metrics: Metrics, clock: Callable[[], float]
    ) -> None:
        self.key = es.service
        self.label = str(es.service)
        self.balancer = balancer
        self.metrics = metrics
        self.clock = clock
        self.reported = 0  # ejections already counted in kuberpc_ejections_total
        self.retries: RetryPolicy | None = None
        self.retry_key: tuple[frozenset[str], float] | None = None
        self.set = es
        self.timeout = es.policy.timeout
        self.apply(es)

    def apply(self, es: EndpointSet) -> None:
        """Take a new EndpointSet's policy; the retry budget carries over while its ratio stays."""
        p = es.policy
        self.set = es
        self.timeout = p.timeout
        if (p.retry_on, p.retry_budget) != self.retry_key:
            self.retry_key = (p.retry_on, p.retry_budget)
            self.retries = RetryPolicy.of(p.retry_on, p.retry_budget, clock=self.clock)

    def report(self) -> None:
        """Publish the balancer's ejections and endpoint states (only called when they changed)."""
        b = self.balancer
        for _ in range(b.ejections - self.reported):
            self.metrics.ejection(self.label)
        self.reported = b.ejections
        self.metrics.set_endpoints(self.label, ready=b.listed - b.ejected, ejected=b.ejected)


class Placement:
    """One call placed on one endpoint (Target of relay.py)."""

    __slots__ = ("endpoint", "plaintext", "pool", "retries", "service", "state", "timeout", "tried")

    def __init__(self, state: ServiceState, pool: Pool) -> None:
        self.state = state
        self.pool = pool
        self.service = state.label
        self.timeout = state.timeout
        self.retries = state.retries
        self.endpoint: Endpoint | None = None  # where the current attempt is placed
        self.tried: Endpoint | None = None  # where the previous attempt failed
        self.plaintext = False

    def open(self, up: MeshStream, headers: Headers, end: bool) -> Reject | None:
        balancer = self.state.balancer
        previous = self.endpoint
        if previous is not None:
            # Placed again: the stream never left this proxy. A connection that failed counts against its
            # endpoint; a GOAWAY (the peer draining) does not.
            conn = up.conn
            self._report(previous, 0.0, f"connect: {conn.link.error or 'connection lost'}" if conn.closed else "")
        else:
            previous = self.tried  # a retry after an answer: done() reported that attempt
        ep = balancer.pick()
        if ep is not None and previous is not None and ep.key == previous.key:
            balancer.release(ep)
            ep = balancer.pick()  # prefer another endpoint when there is one
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

    def done(self, latency_s: float, failure: str) -> None:
        ep = self.endpoint
        if ep is not None:
            self.endpoint = None
            self.tried = ep
            if self.state.balancer.done(ep, latency_s, failure):
                self._changed(ep, failure)

    def _report(self, ep: Endpoint, latency_s: float, failure: str) -> None:
        if self.state.balancer.done(ep, latency_s, failure):
            self._changed(ep, failure)

    def _changed(self, ep: Endpoint, failure: str) -> None:
        """`ep` was ejected or came back: log it, publish the metrics, drop a silent peer's connections."""
        st = self.state
        state = next((r for r in st.balancer.state() if (r["address"], r["port"]) == ep.key), {})
        log.info(
            "endpoint %s service=%s endpoint=%s why=%r",
            state.get("state", "removed"), st.label, ep, state.get("why", failure or "answered"),
        )
        st.report()
        if failure == NO_RESPONSE and st.balancer.is_ejected(ep):
            # A peer that stopped answering holds every call on its connections until their deadlines:
            # closing them fails those calls now, as UNAVAILABLE, which the retry policy may place elsewhere.
            self.pool.close_endpoint(ep)


class Outbound:
    """The Router of the outbound Relay."""

    direction = "outbound"
    callers_replace = False  # callers are apps: this side places a refused call elsewhere itself

    def __init__(
        self,
        *,
        namespace: str,
        metrics: Metrics,
        rng: random.Random,
        max_ejected_share: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.namespace = namespace
        self.max_ejected_share = max_ejected_share
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
                st.apply(es)
            else:
                inner = make_balancer(es.policy.lb, usable, rng=self.rng, clock=self.clock)
                accrual = FailureAccrual(
                    inner, usable, rng=self.rng, clock=self.clock, max_ejected_share=self.max_ejected_share
                )
                st = ServiceState(es, accrual, self.metrics, self.clock)
            new[key] = st
            st.report()
        for key in old.keys() - new.keys():
            self.metrics.forget_service(str(key))
        self.services = new
        self.catalog = catalog
        self.router = Router(catalog, namespace=self.namespace)
        if self.pool is not None:
            self.pool.retain(ep.key for es in catalog.services.values() for ep in es.endpoints)

    def route(self, conn: MeshConnection, request: Request) -> Target | Reject:
        assert self.pool is not None
        found = self.router.resolve(request.authority, request.path, conn.link.upstream)
        if isinstance(found, RouteMiss):
            return Reject(UNAVAILABLE, f"kuberpc: {found.looked_up}")
        st = self.services.get(found)
        if st is None or not st.set.usable():
            return Reject(UNAVAILABLE, f"kuberpc: service {found} has no ready endpoints", str(found))
        return Placement(st, self.pool)

    def debug(self) -> dict[str, Callable[[], dict[str, object]]]:
        """One section per Service, each built only when /debug's encoder reaches it (sidecar/admin.render_json),
        so a large catalog is described in slices between which the proxy keeps relaying."""
        return {str(k): partial(self._service_debug, k) for k in list(self.services)}

    def _service_debug(self, key: ServiceKey) -> dict[str, object]:
        st = self.services.get(key)
        if st is None:
            return {"removed": True}
        return {
            "policy": st.set.policy.lb,
            "timeout": st.timeout,
            "retry_on": sorted(st.set.policy.retry_on),
            "endpoints": _with_tls(st),
        }


def _with_tls(st: ServiceState) -> list[dict[str, object]]:
    """The balancer's view of each endpoint, saying whether calls to it use mTLS (tls: false: plaintext)."""
    tls: dict[tuple[object, object], bool] = {(ep.address, ep.port): ep.tls for ep in st.set.endpoints}
    return [{**d, "tls": tls.get((d.get("address"), d.get("port")), True)} for d in st.balancer.state()]
