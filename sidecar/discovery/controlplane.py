"""Discovery from the control plane (the default in Kubernetes): one `Watch` stream over mTLS, subscribed to the
Services this proxy calls or serves, applied as snapshots and deltas into a Catalog of those Services only.

Turning responses into Services is pure (ServiceView); ControlPlaneDiscovery owns the stream, its reconnection
to any replica and the interest it re-sends. Never talks to the Kubernetes API; never drops the last known
endpoints because the control plane is unreachable.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from proto import discovery_pb2 as pb
from sidecar import grpc_client
from sidecar.config import Address
from sidecar.discovery import ProblemLog
from sidecar.model import (
    DEFAULT_LB,
    LB_POLICIES,
    MAX_WEIGHT,
    Catalog,
    Endpoint,
    EndpointSet,
    ServiceKey,
    ServicePolicy,
)
from sidecar.policy import GRPC_CODES, INJECTED

log = logging.getLogger(__name__)

WATCH_PATH = "/kuberpc.discovery.v1.Discovery/Watch"
CONNECT_TIMEOUT = 5.0
# Reconnection: the first retry within RETRY_BASE, then doubling to RETRY_CAP, half fixed and half random so that
# the proxies cut off by one replica's death do not all land on the next one in the same instant.
RETRY_BASE = 0.25
RETRY_CAP = 10.0
# Services subscribed because a call named them (not declared): bounded, since `:authority` comes from the app.
# Past the bound, the oldest that turned out not to exist is unsubscribed to make room.
MAX_ON_DEMAND = 1000
# Still unready this long after start: say once, in the log, what the first answer lacks (readiness says it too).
WAITING_WARN_S = 15.0



def retry_delay(failures: int, rng: random.Random, *, base: float = RETRY_BASE, cap: float = RETRY_CAP) -> float:
    """Seconds before reconnect attempt `failures` (>= 1): exponential, capped, "equal jitter"."""
    ceiling = min(cap, base * 2.0 ** min(max(failures, 1) - 1, 32))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


# ---- the pure part: responses -> Services ----------------------------------------------------------------


def _key(ref: pb.ServiceRef) -> ServiceKey:
    return ServiceKey(ref.name, ref.namespace)


def _ref(key: ServiceKey) -> pb.ServiceRef:
    return pb.ServiceRef(namespace=key.namespace, name=key.name)


def endpoint_of(ep: pb.Endpoint) -> Endpoint:
    return Endpoint(
        ep.address,
        ep.port,
        min(ep.weight, MAX_WEIGHT),
        tls=ep.tls,
        ready=ep.ready,
        serving=ep.serving,
        terminating=ep.terminating,
        pod=ep.pod,
        zone=ep.zone,
    )


def policy_of(p: pb.Policy) -> tuple[ServicePolicy, list[str]]:
    """The ServicePolicy the control plane parsed, and what in it this proxy cannot use (then the default)."""
    problems: list[str] = []
    lb = p.lb or DEFAULT_LB
    if lb not in LB_POLICIES:
        problems.append(f"lb {lb!r} is not one of {', '.join(LB_POLICIES)}")
        lb = DEFAULT_LB
    retry_on: set[str] = set()
    for name in p.retry_on:
        kebab = name.lower().replace("_", "-")
        if kebab in GRPC_CODES:
            retry_on.add(kebab)
        else:
            problems.append(f"retry_on {name!r} is not a gRPC status name")
    budget = p.retry_budget if 0.0 <= p.retry_budget <= 1.0 else ServicePolicy().retry_budget
    policy = ServicePolicy(
        lb=lb,
        grpc_services=tuple(dict.fromkeys(p.grpc_services)),
        allow=None if p.allow_any else tuple(dict.fromkeys(p.allow)),
        timeout=p.timeout_seconds if p.timeout_seconds > 0 else None,
        retry_on=frozenset(retry_on),
        retry_budget=budget,
        export_grpc_services=p.export_grpc_services,
    )
    return policy, problems


@dataclass
class _Service:
    endpoints: dict[tuple[str, int], Endpoint] = field(default_factory=dict)
    policy: ServicePolicy = field(default_factory=ServicePolicy)
    ports: tuple[int, ...] = ()
    selector: tuple[tuple[str, str], ...] = ()


class ServiceView:
    """What the control plane said so far: the Services subscribed (existing or not), the claims of gRPC service
    names, and the Services selecting this pod. Applies responses; builds Catalogs. No I/O."""

    def __init__(self) -> None:
        self.services: dict[ServiceKey, _Service] = {}
        self.answered: set[ServiceKey] = set()  # snapshot received (the Service exists or not)
        self.claims: dict[str, tuple[ServiceKey, ...]] = {}
        self.selecting: frozenset[ServiceKey] | None = None
        self.problems: dict[ServiceKey, list[str]] = {}

    def apply(self, response: pb.WatchResponse) -> set[ServiceKey]:
        """Apply one response; the Services whose data changed (new answers included)."""
        changed: set[ServiceKey] = set()
        for up in response.services:
            key = _key(up.service)
            self.answered.add(key)
            changed.add(key)
            if not up.exists:
                self.services.pop(key, None)
                self.problems.pop(key, None)
                continue
            svc = self.services.get(key)
            if svc is None or up.full:
                svc = self.services[key] = _Service()
            if up.full:
                svc.endpoints = {}
            else:
                for gone in up.removed:
                    svc.endpoints.pop((gone.address, gone.port), None)
            for raw in up.endpoints:
                ep = endpoint_of(raw)
                svc.endpoints[ep.key] = ep
            if up.full or up.HasField("policy"):
                svc.policy, problems = policy_of(up.policy)
                self.problems[key] = problems
            if up.full or up.ports_changed:
                svc.ports = tuple(dict.fromkeys(up.ports))
            if up.full or up.selector_changed:
                svc.selector = tuple(sorted(up.selector.items()))
        for claim in response.claims:
            self.claims[claim.grpc_service] = tuple(_key(ref) for ref in claim.services)
        if response.HasField("selecting"):
            self.selecting = frozenset(_key(ref) for ref in response.selecting.services)
        return changed

    def forget(self, key: ServiceKey) -> None:
        """`key` was unsubscribed: nothing more will be said about it."""
        self.services.pop(key, None)
        self.answered.discard(key)
        self.problems.pop(key, None)

    def catalog(self) -> Catalog:
        return Catalog(
            (
                EndpointSet(key, tuple(svc.endpoints.values()), svc.policy, svc.ports, svc.selector)
                for key, svc in self.services.items()
            ),
            selecting=self.selecting,
        )

    def claims_answered(self, grpc_service: str) -> bool:
        """The claims of `grpc_service` are known and so is every claiming Service."""
        claimed = self.claims.get(grpc_service)
        return claimed is not None and all(k in self.answered for k in claimed)


# ---- the stream ------------------------------------------------------------------------------------------


async def resolve(host: str, port: int) -> list[str]:
    """Every IP `host` resolves to (a headless Service: one per replica; a ClusterIP Service: one)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _where(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class ControlPlaneDiscovery:
    """The discovery stream: subscribes to `upstreams` and, once, `pod`; then to whatever `want_service` and
    `want_grpc_service` are asked (routing asks on a miss). Publishes the first Catalog once every declared
    upstream has been answered (and, with `pod`, the Services selecting it), then on every change.

    Reconnects with jittered backoff to any address of any entry of `addresses` and re-sends the whole
    interest; the last known Services stay in the Catalog meanwhile. `on_restart(service)` is called for each
    Service of the current catalog when the stream breaks.
    """

    def __init__(
        self,
        addresses: Iterable[Address],
        *,
        ssl_context: ssl.SSLContext,
        upstreams: Iterable[ServiceKey] = (),
        pod: tuple[str, str] | None = None,  # (namespace, name)
        rng: random.Random,
        clock: Callable[[], float],
        on_restart: Callable[[str], None] = lambda service: None,
        resolve: Callable[[str, int], Awaitable[list[str]]] = resolve,
        connect_timeout: float = CONNECT_TIMEOUT,
        retry_base: float = RETRY_BASE,
        retry_cap: float = RETRY_CAP,
        max_on_demand: int = MAX_ON_DEMAND,
    ) -> None:
        self._addresses = tuple(addresses)
        if not self._addresses:
            raise ValueError("the control plane needs at least one address")
        self._ssl = ssl_context
        self._declared = tuple(dict.fromkeys(upstreams))
        self._pod = pod
        self._rng = rng
        self._clock = clock
        self._on_restart = on_restart
        self._resolve = resolve
        self._connect_timeout = connect_timeout
        self._retry_base = retry_base
        self._retry_cap = retry_cap
        self._max_on_demand = max_on_demand
        self.view = ServiceView()
        self._subscribed: dict[ServiceKey, None] = dict.fromkeys(self._declared)  # ordered: oldest first
        self._on_demand: dict[ServiceKey, None] = {}
        self._grpc_services: dict[str, None] = {}
        self._service_waits: dict[ServiceKey, asyncio.Future[None]] = {}
        self._grpc_waits: dict[str, asyncio.Future[None]] = {}
        self._call: grpc_client.BidiCall | None = None
        self._publish: Callable[[Catalog], None] | None = None
        self._published = False
        self._problems = ProblemLog(log, "control plane policy problem problem=%r")
        # State for /debug and the staleness gauge.
        self.connected_to: str | None = None
        self.current_since: float | None = None  # the view is current (a stream is up) since then
        self.stale_since: float = clock()  # not current since then (None while current)
        self.failures = 0
        self.reconnects = 0
        self.last_error: str | None = None
        self._last_dialled: str | None = None
        self._full_logged = False

    # ---- what routing asks ----

    def want_service(self, key: ServiceKey) -> asyncio.Future[None] | None:
        """None when the control plane already answered for `key` (or it cannot be asked: too many names);
        else a Future done once it has (subscribing to `key` now if needed)."""
        if key in self.view.answered:
            return None
        if key not in self._subscribed:
            if not self._make_room():
                return None
            self._subscribed[key] = None
            self._on_demand[key] = None
            self._send(pb.WatchRequest(subscribe=[_ref(key)]))
            log.info("control plane subscribe service=%s on_demand=true", key)
        wait = self._service_waits.get(key)
        if wait is None:
            wait = self._service_waits[key] = asyncio.get_running_loop().create_future()
        return wait

    def want_grpc_service(self, name: str) -> asyncio.Future[None] | None:
        """Like want_service, for the Services claiming a gRPC service name."""
        if self.view.claims_answered(name):
            return None
        if name not in self._grpc_services:
            if len(self._grpc_services) >= self._max_on_demand:
                return None
            self._grpc_services[name] = None
            self._send(pb.WatchRequest(grpc_services=[name]))
            log.info("control plane resolve grpc_service=%s", name)
        wait = self._grpc_waits.get(name)
        if wait is None:
            wait = self._grpc_waits[name] = asyncio.get_running_loop().create_future()
        return wait

    def _make_room(self) -> bool:
        if len(self._on_demand) < self._max_on_demand:
            self._full_logged = False
            return True
        for key in self._on_demand:
            if key in self.view.answered and key not in self.view.services:
                del self._on_demand[key]
                del self._subscribed[key]
                self.view.forget(key)
                self._send(pb.WatchRequest(unsubscribe=[_ref(key)]))
                self._full_logged = False
                return True
        if not self._full_logged:  # once per time it fills up, not once per call
            log.warning("control plane on-demand subscriptions full limit=%d", self._max_on_demand)
            self._full_logged = True
        return False

    def _send(self, request: pb.WatchRequest) -> None:
        # Not connected: nothing is lost, the whole interest is sent on the next stream.
        if self._call is not None:
            try:
                self._call.send(request.SerializeToString())
            except grpc_client.CallError:
                pass  # the stream is ending: the receive loop sees why and reconnects

    def _interest(self) -> pb.WatchRequest:
        request = pb.WatchRequest(
            subscribe=[_ref(k) for k in self._subscribed], grpc_services=list(self._grpc_services)
        )
        if self._pod is not None:
            request.pod.namespace, request.pod.name = self._pod
        return request

    # ---- state ----

    @property
    def current(self) -> bool:
        return self.current_since is not None

    def last_update_age(self) -> float:
        """Seconds since the view was last known current: 0 while a stream is up (every change is pushed)."""
        return 0.0 if self.current_since is not None else max(0.0, self._clock() - self.stale_since)

    def _initial_answered(self) -> bool:
        return all(k in self.view.answered for k in self._declared) and (
            self._pod is None or self.view.selecting is not None
        )

    def waiting_for(self) -> list[str]:
        """What the first catalog (and so readiness) still waits for; empty once it has been published."""
        if self._published:
            return []
        why = [
            f"no answer yet from the control plane about upstream {k}"
            for k in self._declared
            if k not in self.view.answered
        ]
        if self._pod is not None and self.view.selecting is None:
            why.append(
                f"no answer yet from the control plane about the Services selecting pod {'/'.join(self._pod)} "
                f"(it knows only pods labelled {INJECTED}=true)"
            )
        if why and not self.current and self.last_error:
            why.append(f"the control plane stream is down: {self.last_error}")
        return why

    def _warn_if_waiting(self) -> None:
        if why := self.waiting_for():
            log.warning("control plane discovery still not ready after_s=%g waiting_for=%r", WAITING_WARN_S, why)

    def debug(self) -> dict[str, object]:
        view = self.view
        return {
            "source": "control-plane",
            "addresses": [str(a) for a in self._addresses],
            "connected_to": self.connected_to,
            "current": self.current,
            "last_update_age_seconds": round(self.last_update_age(), 3),
            "reconnects": self.reconnects,
            "consecutive_failures": self.failures,
            "last_error": self.last_error,
            "subscribed": sorted(str(k) for k in self._subscribed),
            "missing": sorted(str(k) for k in self._subscribed if k in view.answered and k not in view.services),
            "waiting": sorted(str(k) for k in self._subscribed if k not in view.answered),
            "grpc_services": {
                name: [str(k) for k in view.claims[name]] if name in view.claims else None
                for name in self._grpc_services
            },
            "selecting": sorted(str(k) for k in view.selecting) if view.selecting is not None else None,
        }

    # ---- the stream ----

    async def run(self, publish: Callable[[Catalog], None]) -> None:
        self._publish = publish
        log.info(
            "control plane discovery starting addresses=%s upstreams=%s pod=%s",
            ",".join(str(a) for a in self._addresses),
            ",".join(str(k) for k in self._declared) or "-",
            "/".join(self._pod) if self._pod else "-",
        )
        warn: asyncio.TimerHandle | None = None
        if self._initial_answered():
            # Nothing to wait for (no declared upstream, no inbound): ready at once, Services come on demand.
            self._published = True
            publish(self.view.catalog())
        else:
            warn = asyncio.get_running_loop().call_later(WAITING_WARN_S, self._warn_if_waiting)
        try:
            await self._stream_forever()
        finally:
            if warn is not None:
                warn.cancel()

    async def _stream_forever(self) -> None:
        last: str | None = None  # ip:port of the replica the last stream went to
        while True:
            try:
                await self._session(last)
                error = "the control plane ended the stream"
            except grpc_client.CallError as e:
                error = f"{e.code}: {e.message}"
            except OSError as e:  # resolving the address (socket.gaierror) included
                error = f"{type(e).__name__}: {e.strerror or e}"
            except DecodeError as e:
                error = f"undecodable WatchResponse: {e}"
            last = self._last_dialled  # _session raises: the replica it tried is the one to avoid next
            self._ended(error)
            self.failures += 1
            delay = retry_delay(self.failures, self._rng, base=self._retry_base, cap=self._retry_cap)
            log.warning(
                "control plane stream down error=%r attempt=%d retry_in_s=%.2f keeping_services=%d",
                error, self.failures, delay, len(self.view.services),
            )  # fmt: skip
            await asyncio.sleep(delay)

    async def _pick(self, avoid: str | None) -> tuple[Address, str]:
        """An address of the control plane and the IP to dial, at random, avoiding the replica (ip:port) that
        just failed when there is another."""
        choices: list[tuple[Address, str]] = []
        problems: list[str] = []
        for address in self._addresses:
            try:
                found = await self._resolve(address.host, address.port)
            except OSError as e:
                problems.append(f"{address.host}: {e.strerror or e}")
                continue
            choices.extend((address, ip) for ip in found)
        if not choices:
            raise OSError(f"cannot resolve the control plane ({'; '.join(problems) or 'no address'})")
        others = [c for c in choices if _where(c[1], c[0].port) != avoid]
        return self._rng.choice(others or choices)

    async def _session(self, avoid: str | None) -> None:
        """One stream, from connect to its end (which raises); the replica dialled is `_last_dialled`."""
        address, ip = await self._pick(avoid)
        where = self._last_dialled = _where(ip, address.port)
        call = await grpc_client.open_bidi(
            address, WATCH_PATH, ssl_context=self._ssl, connect_timeout=self._connect_timeout, dial=ip
        )
        self._call = call
        try:
            call.send(self._interest().SerializeToString())
            first = True
            while True:
                try:
                    message = await call.receive()
                except grpc_client.CallError as e:
                    # The server's own status, or the connection's end, says which replica ended it.
                    raise grpc_client.CallError(e.code, f"{e.message} (replica {where})") from None
                response = pb.WatchResponse.FromString(message)
                if first:
                    first = False
                    self.failures = 0  # a healthy answer: the next failure starts the backoff over
                    self.connected_to = where
                    self.current_since = self._clock()
                    self.reconnects += 0 if self.last_error is None else 1
                    log.info(
                        "control plane stream up replica=%s subscribed=%d stale_for_s=%.2f",
                        where, len(self._subscribed), self._clock() - self.stale_since,
                    )  # fmt: skip
                self._received(response)
        finally:
            self._call = None
            call.close()

    def _ended(self, error: str) -> None:
        if self.current_since is not None:
            self.stale_since = self._clock()
        self.current_since = None
        self.connected_to = None
        self.last_error = error
        for key in self.view.services:
            self._on_restart(str(key))

    def _received(self, response: pb.WatchResponse) -> None:
        changed = self.view.apply(response)
        for key in changed:
            if key in self.view.services:
                self._problems.report(self._all_problems())
                break
        if not self._published and not self._initial_answered():
            return
        if changed or response.claims or response.HasField("selecting") or not self._published:
            assert self._publish is not None
            self._published = True
            self._publish(self.view.catalog())
        self._wake()

    def _all_problems(self) -> list[str]:
        return [f"{key}: {p}" for key, problems in self.view.problems.items() for p in problems]

    def _wake(self) -> None:
        """Resolve the waits of routing that the view can now answer (after the Catalog is published)."""
        for key in [k for k in self._service_waits if k in self.view.answered]:
            wait = self._service_waits.pop(key)
            if not wait.done():
                wait.set_result(None)
        for name in [n for n in self._grpc_waits if self.view.claims_answered(n)]:
            wait = self._grpc_waits.pop(name)
            if not wait.done():
                wait.set_result(None)

