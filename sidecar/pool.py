"""Long-lived HTTP/2 client connections to upstream endpoints, reused across calls.

It dials (TLS for meshed peers, verifying their mesh identity), hands out connections that take new
streams, and drains connections to endpoints that left. It never chooses an endpoint.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Iterable

from sidecar.h2.connection import Connection, ConnectionHandler, Flusher, Limits
from sidecar.identity import IdentityError, require_mesh_identity
from sidecar.link import Link
from sidecar.metrics import Metrics
from sidecar.model import Endpoint
from sidecar.relay import Call, MeshConnection

log = logging.getLogger(__name__)

# Dead-peer detection. A black-holed peer (packets dropped, no RST) is otherwise noticed only by TCP's
# retransmission timeouts, minutes later. A connect (TCP and TLS) taking longer than this is given up and its
# calls placed elsewhere; in-cluster connects take milliseconds (linkerd2-proxy gives up after 1 s).
CONNECT_TIMEOUT = 1.0
# Mesh peers' connections are PINGed after this long without a byte from them and closed when the PING goes
# unanswered for as long again, so a peer that stopped (SIGSTOP, a frozen node, a black hole) fails its calls
# within a few seconds instead of holding them to their deadlines. Peers are our own proxies, which permit
# PINGs on idle connections (gRPC servers, like local apps, may not: they keep the default interval).
PEER_KEEPALIVE_S = 2.0


class Pool:
    def __init__(
        self,
        handler: ConnectionHandler[Link, Call],
        *,
        flusher: Flusher,
        limits: Limits,
        metrics: Metrics,
        ssl_context: Callable[[], ssl.SSLContext | None],
        trust_domain: str,
        per_endpoint: int = 1,
        name: str = "",
    ) -> None:
        self.handler = handler
        self.flusher = flusher
        self.limits = limits
        self.metrics = metrics
        self.ssl_context = ssl_context
        self.trust_domain = trust_domain
        self.per_endpoint = per_endpoint
        self.name = name
        self._conns: dict[tuple[str, int], list[MeshConnection]] = {}
        self._rr = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def connection(self, ep: Endpoint) -> MeshConnection:
        """A connection to `ep` that takes new streams, dialling one if needed (streams wait for it)."""
        conns = self._conns.get(ep.key)
        if conns:
            if self.per_endpoint == 1:
                c = conns[0]
                if not c.draining:
                    return c
            live = [c for c in conns if not c.draining]
            if len(live) >= self.per_endpoint:
                self._rr += 1
                return live[self._rr % len(live)]
        return self._dial(ep)

    def _dial(self, ep: Endpoint) -> MeshConnection:
        conn = Connection(
            self.handler, link=Link(endpoint=ep), client=True, flusher=self.flusher, limits=self.limits, name=str(ep)
        )
        conn.on_lost = self._discard
        conns = self._conns.setdefault(ep.key, [])
        # Drained connections stay listed until they close; new ones go first so the fast path finds them.
        conns.insert(0, conn)
        task = asyncio.get_running_loop().create_task(self._connect(conn, ep))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return conn

    async def _connect(self, conn: MeshConnection, ep: Endpoint) -> None:
        loop = asyncio.get_running_loop()
        ctx = self.ssl_context() if ep.tls else None
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await loop.create_connection(
                    lambda: conn,
                    ep.address,
                    ep.port,
                    ssl=ctx,
                    server_hostname="" if ctx is not None else None,
                )
        except asyncio.CancelledError:
            conn.link.error = "proxy shutting down"
            conn.connection_lost(None)
            raise
        except (OSError, TimeoutError, ssl.SSLError) as e:
            if isinstance(e, ssl.SSLError):
                self.metrics.tls_handshake_failure(tls_failure_reason(e))
            conn.link.error = f"connect: {type(e).__name__}: {e}" if str(e) else f"connect: {type(e).__name__}"
            log.info("upstream connect failed endpoint=%s error=%r", ep, conn.link.error)
            conn.connection_lost(e)

    def verify(self, conn: MeshConnection) -> bool:
        """Meshed peers must present a mesh identity; called when the TLS connection is up."""
        ep = conn.link.endpoint
        if conn.transport is None or ep is None or not ep.tls:
            return True
        obj = conn.transport.get_extra_info("ssl_object")
        try:
            conn.link.peer_id = require_mesh_identity(obj, trust_domain=self.trust_domain)
        except IdentityError as e:
            conn.link.error = f"peer identity: {e}"
            self.metrics.tls_handshake_failure("peer_identity")
            log.warning("upstream rejected endpoint=%s reason=%r", ep, str(e))
            return False
        return True

    def _discard(self, conn: MeshConnection) -> None:
        ep = conn.link.endpoint
        if ep is None:
            return
        conns = self._conns.get(ep.key)
        if conns and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._conns[ep.key]

    def close_endpoint(self, ep: Endpoint) -> None:
        """Close every connection to `ep` now (its calls fail as lost); the next call dials afresh."""
        for c in list(self._conns.get(ep.key, ())):
            if c.link.error is None:
                c.link.error = "closed: the endpoint stopped answering"
            c.close()
            if c.transport is not None:
                c.transport.abort()  # what is queued for a peer that reads nothing would never drain

    def retain(self, keys: Iterable[tuple[str, int]]) -> None:
        """Drain connections to endpoints that are no longer known."""
        keep = set(keys)
        for key, conns in list(self._conns.items()):
            if key not in keep:
                for c in list(conns):
                    c.drain()

    async def close(self) -> None:
        for conns in list(self._conns.values()):
            for c in list(conns):
                c.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def debug(self) -> list[dict[str, object]]:
        return [connection_debug(c) for conns in self._conns.values() for c in conns]


def connection_debug(conn: MeshConnection) -> dict[str, object]:
    """A connection for /debug, with the peer's mesh identity when it presented one (None: plaintext)."""
    peer = conn.link.peer_id
    address = conn.transport.get_extra_info("peername") if conn.transport is not None else None
    return {
        **conn.debug(),
        "peer_address": f"{address[0]}:{address[1]}" if isinstance(address, tuple) else None,
        "peer_identity": str(peer) if peer is not None else None,
    }


_TLS_FAILURE_NEEDLES = (
    ("certificate required", "no_client_certificate"),
    ("peer did not return a certificate", "no_client_certificate"),
    ("unknown ca", "unknown_ca"),
    ("certificate verify failed", "untrusted_certificate"),
    ("certificate unknown", "untrusted_certificate"),
    ("expired", "expired_certificate"),
    ("wrong version", "protocol"),
    ("unsupported protocol", "protocol"),
    ("http request", "not_tls"),
    ("no application protocol", "alpn"),
)
# Every reason tls_failure_reason and the pool's peer check report (exported at zero by Metrics).
TLS_FAILURE_REASONS = (*dict.fromkeys(r for _, r in _TLS_FAILURE_NEEDLES), "peer_identity", "other")


def tls_failure_reason(e: BaseException) -> str:
    """A bounded label for kuberpc_tls_handshake_failures_total."""
    text = f"{getattr(e, 'reason', '')} {e}".lower()
    for needle, reason in _TLS_FAILURE_NEEDLES:
        if needle in text:
            return reason
    return "other"
