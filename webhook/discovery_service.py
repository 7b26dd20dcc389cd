"""The discovery service on gRPC (kuberpc.discovery.v1.Discovery/Watch) over mTLS: each proxy's one stream,
authenticated by its mesh certificate, fed from the catalog through the fan-out.

Maps stream errors to gRPC status codes in exactly one place (`status_of`); holds no state of its own beyond
the streams it serves (several replicas serve the same data); never logs a certificate or a key.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import grpc
from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Gauge

from proto import discovery_pb2 as pb
from proto import discovery_pb2_grpc
from sidecar.ports import DISCOVERY_PORT
from sidecar.spiffe import SpiffeId
from webhook.catalog import MeshCatalog
from webhook.fanout import Hub, InvalidArgument, PermissionDenied, StreamError, Subscriber, Unauthenticated
from webhook.identity import InvalidRequest, parse_identity
from webhook.identity_service import ServingCertificate, grpc_serving

log = logging.getLogger(__name__)

DEFAULT_PORT = DISCOVERY_PORT
# A WatchRequest names Services by namespace and name: 10,000 of them fit well below this.
MAX_MESSAGE_BYTES = 1 << 20
# Proxies keep their stream for their whole life: pings find the ones that vanished (a node gone, no RST).
# The server pings every 30 s and accepts the proxies' own pings every 10 s at most.
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
)

_STATUS: tuple[tuple[type[StreamError], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
)


def status_of(error: StreamError) -> grpc.StatusCode:
    """The gRPC status (proto/discovery.proto) a stream ends with for `error`."""
    for cls, code in _STATUS:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def identity_of(auth_context: Mapping[str, Sequence[bytes]], *, trust_domain: str) -> SpiffeId:
    """The workload identity in the client certificate grpc verified (its one spiffe:// URI SAN)."""
    pems = auth_context.get("x509_pem_cert") or []
    if not pems:
        raise Unauthenticated("no client certificate: the discovery service needs the proxy's mesh certificate")
    try:
        cert = x509.load_pem_x509_certificate(pems[0])
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound) as e:
        raise Unauthenticated(f"the client certificate names no workload identity ({type(e).__name__})") from e
    uris = [u for u in sans.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("spiffe://")]
    if len(uris) != 1:
        raise Unauthenticated(f"the client certificate has {len(uris)} SPIFFE identities (one is needed)")
    try:
        return parse_identity(uris[0], trust_domain=trust_domain)
    except InvalidRequest as e:
        raise Unauthenticated(str(e)) from e


class DiscoveryMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.streams = Gauge("kuberpc_discovery_streams", "Discovery streams open on this replica", registry=registry)
        self.responses = Counter(
            "kuberpc_discovery_responses", "WatchResponses sent to proxies", registry=registry
        )
        self.ended = Counter(
            "kuberpc_discovery_streams_ended", "Discovery streams ended, by gRPC status", ["code"], registry=registry
        )


class DiscoveryService:
    """Runs one stream: reads interest changes, writes what changed, until the proxy goes or breaks a rule."""

    def __init__(self, catalog: MeshCatalog, hub: Hub, *, metrics: DiscoveryMetrics) -> None:
        self._catalog = catalog
        self._hub = hub
        self.metrics = metrics

    async def stream(
        self,
        identity: SpiffeId,
        read: Callable[[], Awaitable[pb.WatchRequest | None]],
        write: Callable[[pb.WatchResponse], Awaitable[None]],
    ) -> None:
        """Serve one stream until the client half-closes (returns) or a StreamError (raised, unwrapped)."""
        sub = self._hub.subscriber(identity)
        self.metrics.streams.inc()
        closed = asyncio.Event()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._read(read, sub, closed))
                await self._write(write, sub, closed)
        except* StreamError as group:
            raise group.exceptions[0] from None
        finally:
            self._hub.remove(sub)
            self.metrics.streams.dec()

    async def _read(
        self, read: Callable[[], Awaitable[pb.WatchRequest | None]], sub: Subscriber, closed: asyncio.Event
    ) -> None:
        while (request := await read()) is not None:
            sub.apply(request)
        closed.set()
        sub.wake.set()

    async def _write(
        self, write: Callable[[pb.WatchResponse], Awaitable[None]], sub: Subscriber, closed: asyncio.Event
    ) -> None:
        # Nothing is answered from a partial view: "no such Service" would make a proxy fail its calls.
        await self._catalog.synced.wait()
        while True:
            await sub.wake.wait()
            sub.wake.clear()
            if closed.is_set():
                return
            response = sub.next_response()
            if response is not None:
                # Waits for the client's flow-control window: meanwhile changes only mark the subscriber dirty,
                # and the next response carries the latest state of each.
                await write(response)
                sub.responses += 1
                self.metrics.responses.inc()


@asynccontextmanager
async def serving(
    service: DiscoveryService,
    certificate: ServingCertificate,
    *,
    trust_domain: str,
    host: str,
    port: int,
    grace: float = 1.0,
) -> AsyncIterator[int]:
    """Serve Watch on host:port until the block exits; yields the bound port. `certificate` must require client
    certificates (ServingCertificate with client_roots): grpc refuses a client that has none chaining to them."""

    metrics = service.metrics

    class Servicer(discovery_pb2_grpc.DiscoveryServicer):
        async def Watch(self, request_iterator: Any, context: Any) -> None:
            code = grpc.StatusCode.OK
            message = ""
            identity = None
            try:
                identity = identity_of(context.auth_context(), trust_domain=trust_domain)
                log.info("event=discovery_stream_opened identity=%s", str(identity))

                async def read() -> pb.WatchRequest | None:
                    request = await context.read()
                    return None if request is grpc.aio.EOF else request

                await service.stream(identity, read, context.write)
            except StreamError as e:
                code, message = status_of(e), str(e)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED  # the proxy went away, or the server is stopping
                raise
            finally:
                metrics.ended.labels(code=code.name).inc()
                log.info(
                    "event=discovery_stream_ended identity=%s code=%s reason=%s",
                    str(identity) if identity is not None else "-", code.name, json.dumps(message),
                )  # fmt: skip
            if code is not grpc.StatusCode.OK:
                await context.abort(code, message)

    register = partial(discovery_pb2_grpc.add_DiscoveryServicer_to_server, Servicer())
    async with grpc_serving(register, certificate, host=host, port=port, options=SERVER_OPTIONS, grace=grace) as bound:
        log.info("event=discovery_listening address=%s", json.dumps([host, bound]))
        yield bound
