"""Outbound routing that asks discovery about Services it has not heard of: a call that names one (by
`:authority` or gRPC service name) waits, for a bounded time, for the control plane's answer, then is routed
like any other; without an answer in time it fails UNAVAILABLE naming what was asked.

Wraps the outbound router: it never balances, never dials and never holds a call past its bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from sidecar.h2.connection import Headers
from sidecar.model import ServiceKey
from sidecar.relay import UNAVAILABLE, MeshConnection, MeshStream, Reject, Request, Target
from sidecar.retry import RetryPolicy
from sidecar.routing import grpc_service_of, service_named

# The first call to a Service waits this long for its snapshot (the control plane answers in milliseconds).
DEFAULT_WAIT = 5.0
MEMO_LIMIT = 4096


class Interest(Protocol):
    """What discovery offers routing (sidecar.discovery.controlplane.ControlPlaneDiscovery)."""

    def want_service(self, key: ServiceKey) -> asyncio.Future[None] | None: ...
    def want_grpc_service(self, name: str) -> asyncio.Future[None] | None: ...


class Routes(Protocol):
    direction: str
    callers_replace: bool

    def route(self, conn: MeshConnection, request: Request) -> Target | Reject: ...


class OnDemandRouter:
    """The outbound Relay's Router when discovery is subscription-based: `inner` first, and on a miss about a
    Service or gRPC name discovery has not answered yet, a PendingCall that routes again once it has."""

    def __init__(
        self,
        inner: Routes,
        interest: Interest,
        *,
        namespace: str,
        fail: Callable[[MeshStream, int, str], None],
        placed: Callable[[MeshStream, Headers, Target], bool],
        wait: float = DEFAULT_WAIT,
    ) -> None:
        self.inner = inner
        self.direction = inner.direction
        self.callers_replace = inner.callers_replace
        self.interest = interest
        self.namespace = namespace
        self.fail = fail
        self.placed = placed
        self.wait = wait
        self._memo: dict[str, ServiceKey | None] = {}

    def _named(self, authority: str) -> ServiceKey | None:
        """The Service `authority` names (memoized: it runs per call; bounded, as authorities come from the app)."""
        memo = self._memo
        if authority in memo:
            return memo[authority]
        found = service_named(authority, self.namespace)
        key = found if isinstance(found, ServiceKey) else None
        if len(memo) >= MEMO_LIMIT:
            del memo[next(iter(memo))]
        memo[authority] = key
        return key

    def route(self, conn: MeshConnection, request: Request) -> Target | Reject:
        upstream: ServiceKey | None = conn.link.upstream
        authority = request.authority
        if upstream is None and authority:
            # The `:authority` comes first (DESIGN §1): a Service it names that discovery has not answered about
            # yet is awaited before anything else, or the gRPC name in the path would route the call elsewhere.
            named = self._named(authority)
            if named is not None and (w := self.interest.want_service(named)) is not None:
                return PendingCall(self, conn, request, [w], service=str(named), asked=f"service {str(named)!r}")
        found = self.inner.route(conn, request)
        if not isinstance(found, Reject):
            return found
        waits: list[asyncio.Future[None]] = []
        asked: list[str] = []
        key: ServiceKey | str | None = upstream
        if key is None and authority:
            key = self._named(authority)
        if isinstance(key, ServiceKey) and (w := self.interest.want_service(key)) is not None:
            waits.append(w)
            asked.append(f"service {str(key)!r}")
        name = grpc_service_of(request.path) if upstream is None else ""
        if name and (w := self.interest.want_grpc_service(name)) is not None:
            waits.append(w)
            asked.append(f"gRPC service {name!r}")
        if not waits:
            return found
        label = str(key) if isinstance(key, ServiceKey) else found.service
        return PendingCall(self, conn, request, waits, service=label, asked=" and ".join(asked))


class PendingCall:
    """A Target for a call accepted before discovery could say where it goes: `open` parks the stream (its
    request DATA queues on it, flow-controlled), and once every wait is over the call is routed again and
    placed, or failed. Later, it stands for the Target it was placed with."""

    __slots__ = ("_asked", "_conn", "_end", "_headers", "_left", "_placed", "_request", "_router", "_timer", "_up", "_waits", "service")

    # The Service's default deadline and retry policy are not known when the relay asks, at arrival: once the
    # call is routed, the relay's `placed` callback (Relay.placed_late) applies them.
    timeout: float | None = None

    def __init__(
        self,
        router: OnDemandRouter,
        conn: MeshConnection,
        request: Request,
        waits: list[asyncio.Future[None]],
        *,
        service: str,
        asked: str,
    ) -> None:
        self._router = router
        self._conn = conn
        self._request = request
        self._waits = waits
        self._asked = asked
        self.service = service
        self._placed: Target | None = None
        self._up: MeshStream | None = None
        self._headers: Headers = []
        self._end = False
        self._left = 0
        self._timer: asyncio.TimerHandle | None = None

    @property
    def plaintext(self) -> bool:
        return self._placed.plaintext if self._placed is not None else False

    @plaintext.setter
    def plaintext(self, value: bool) -> None:
        if self._placed is not None:
            self._placed.plaintext = value

    @property
    def retries(self) -> RetryPolicy | None:
        # None when the relay reads it at arrival; the placed Target's once routed, when a retry asks.
        return self._placed.retries if self._placed is not None else None

    def open(self, up: MeshStream, headers: Headers, end: bool) -> Reject | None:
        if self._placed is not None:
            return self._placed.open(up, headers, end)  # placed again by the relay (a refused connection)
        self._up, self._headers, self._end = up, headers, end
        pending = [w for w in self._waits if not w.done()]
        if not pending:
            asyncio.get_running_loop().call_soon(self._settle, False)
            return None
        self._left = len(pending)
        for w in pending:
            w.add_done_callback(self._one_done)
        self._timer = asyncio.get_running_loop().call_later(self._router.wait, self._settle, True)
        return None

    def _one_done(self, _: asyncio.Future[None]) -> None:
        self._left -= 1
        if self._left == 0:
            self._settle(False)

    def _settle(self, timed_out: bool) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        up, self._up = self._up, None
        if up is None or up.reset or up.call is None:
            return  # already settled, or the caller gave up meanwhile
        router = self._router
        if timed_out:
            router.fail(
                up,
                UNAVAILABLE,
                f"kuberpc: no answer from the control plane about {self._asked} within {router.wait:g} s",
            )
            return
        target = router.inner.route(self._conn, self._request)
        if isinstance(target, Reject):
            router.fail(up, target.status, target.message)
            return
        if not router.placed(up, self._headers, target):
            return
        self._placed = target
        refused = target.open(up, self._headers, self._end)
        if refused is not None:
            router.fail(up, refused.status, refused.message)

    def done(self, latency_s: float, failure: str) -> None:
        if self._placed is not None:
            self._placed.done(latency_s, failure)
