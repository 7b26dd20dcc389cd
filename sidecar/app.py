"""Wires the proxy together and owns every long-running part: listeners, discovery, admin, drain.

The one place that builds real clocks, randomness, SSL contexts and the metrics registry; nothing below it
reads the environment or installs signal handlers (that is __main__'s job).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import ssl
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from prometheus_client import CollectorRegistry

from sidecar import identity
from sidecar.accesslog import AccessLog
from sidecar.admin import AdminServer
from sidecar.config import Address, Config
from sidecar.discovery import Discovery
from sidecar.discovery.file import FileDiscovery
from sidecar.h2.connection import Flusher, Limits
from sidecar.inbound import Inbound
from sidecar.link import Link
from sidecar.metrics import Metrics
from sidecar.model import Catalog, Endpoint, ServiceKey
from sidecar.outbound import Outbound
from sidecar.pool import PEER_KEEPALIVE_S, TLS_FAILURE_REASONS, Pool, connection_debug, tls_failure_reason
from sidecar.relay import RETRY_REASONS, MeshConnection, Relay
from sidecar.tap import Tap
from sidecar.workload_cert import (
    FileIdentity,
    GrpcCertifier,
    IssuedIdentity,
    WorkloadIdentity,
    certificate_problem,
)

log = logging.getLogger(__name__)

TLS_HANDSHAKE_TIMEOUT = 10.0


class StartupError(Exception):
    """The proxy cannot start: a port is taken, a file is unreadable, a source is unsupported."""


@dataclass
class Proxy:
    """A running proxy: what tests and the admin server look at."""

    config: Config
    metrics: Metrics
    registry: CollectorRegistry
    outbound: Outbound
    out_relay: Relay
    inbound: Inbound | None
    in_relay: Relay | None
    stop: asyncio.Event
    ready: bool = False
    catalog_seen: asyncio.Event = field(default_factory=asyncio.Event)
    servers: list[asyncio.AbstractServer] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)
    admin: AdminServer | None = None
    started_at: float = field(default_factory=time.monotonic)
    workload: WorkloadIdentity | None = None
    discovered: set[ServiceKey] = field(default_factory=set)  # Services ever seen with a usable endpoint
    wall_clock: Callable[[], float] = time.time
    discovery_debug: Callable[[], dict[str, object]] | None = None  # the source's own state, if it tells
    discovery_waiting: Callable[[], list[str]] | None = None  # what the first catalog still waits for

    def not_ready_because(self) -> list[str]:
        """Why /ready says no (empty: ready): starting or draining, no valid certificate, an upstream unknown."""
        why: list[str] = []
        if not self.ready:
            why.append("starting or draining")
            if self.discovery_waiting is not None:
                why.extend(self.discovery_waiting())
        if self.workload is not None and (problem := certificate_problem(self.workload.current, self.wall_clock())):
            why.append(problem)
        for up in self.config.upstreams:
            if up.service not in self.discovered:
                why.append(f"upstream {up.service} (kuberpc.io/upstreams) has never been discovered with an endpoint")
        return why

    def bound_port(self, what: str) -> int:
        """The port a listener bound (tests bind port 0): 'outbound', 'inbound', 'admin' or 'debug'."""
        if what == "admin":
            assert self.admin is not None
            return self.admin.port
        if what == "debug":
            assert self.admin is not None
            return self.admin.debug_port
        return self.ports[what]

    def debug(self) -> dict[str, object]:
        """/debug's document. Its sections are callables, each built only when the encoder reaches it
        (admin.render_json), so no one piece holds the event loop for long."""
        cfg = self.config
        why = self.not_ready_because()
        return {
            "pod": {"name": cfg.pod_name, "namespace": cfg.namespace, "ip": cfg.pod_ip},
            "ready": not why,
            "not_ready_because": why,
            "listeners": dict(self.ports),
            "routes": lambda: {
                "upstreams": {str(u.local_port): f"{u.service}:{u.port}" for u in cfg.upstreams},
                "services": self.outbound.debug(),
            },
            "outbound": self.out_relay.debug,
            "inbound": self._inbound_debug,
            "upstream_connections": self.outbound.pool.debug if self.outbound.pool else [],
            "identity": self.workload.debug if self.workload is not None else None,
            "discovery": self.discovery_debug if self.discovery_debug is not None else {"source": cfg.discovery},
        }

    def _inbound_debug(self) -> dict[str, object] | None:
        if self.in_relay is None:
            return None
        return {
            **self.in_relay.debug(),
            "connections": [partial(connection_debug, c) for c in list(self.in_relay.downstream)],
        }


def count_handshake_failures(ctx: ssl.SSLContext, on_failure: Callable[[str], None]) -> None:
    """Report every failed server-side TLS handshake on `ctx` by reason.

    asyncio and uvloop only log handshake failures in debug mode, and taking TLS over with start_tls after
    accepting can lose the client's first bytes under uvloop; instead the event loop does TLS as usual and
    the SSLObjects it creates from `ctx` tell us why a handshake failed.
    """

    class CountingSSLObject(ssl.SSLObject):
        def do_handshake(self) -> None:
            try:
                super().do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise
            except ssl.SSLError as e:
                on_failure(tls_failure_reason(e))
                raise

    ctx.sslobject_class = CountingSSLObject


def _load_identity(
    cfg: Config,
    *,
    metrics: Metrics,
    rng: random.Random,
    inbound: Inbound | None = None,
    also: tuple[ssl.SSLContext, ...] = (),
) -> tuple[ssl.SSLContext, ssl.SSLContext, WorkloadIdentity]:
    """Client and server mTLS contexts, and what keeps their certificate (and that of the contexts in `also`)
    current; once, before serving.

    With an identity service the contexts start with no certificate (nothing is served until the workload's
    obtain() has one); otherwise the files are loaded now and must exist.
    """
    if cfg.tls is None:
        raise StartupError("mTLS files are required (KUBERPC_TLS_CERT, KUBERPC_TLS_KEY, KUBERPC_TRUST_ANCHORS)")
    tls = cfg.tls

    def on_certificate(cert: identity.WorkloadCertificate) -> None:
        metrics.set_cert_expiry(cert.not_after)
        if inbound is not None:
            inbound.certified(cert.not_after)  # inbound stays closed without a valid certificate

    try:
        client_ctx = identity.client_context(None, None, tls.trust_anchors)
        server_ctx = identity.server_context(None, None, tls.trust_anchors)
        workload: WorkloadIdentity
        if (svc := cfg.identity_service) is not None:
            workload = IssuedIdentity(
                identity=identity.SpiffeId(cfg.trust_domain, cfg.namespace, cfg.service_account),
                files=tls,
                token_file=svc.token_file,
                certify=GrpcCertifier(svc.address, tls.trust_anchors),
                contexts=(client_ctx, server_ctx, *also),
                on_certificate=on_certificate,
                clock=time.time,
                rng=rng,
            )
        else:
            from_files = FileIdentity(files=tls, contexts=(client_ctx, server_ctx, *also), on_certificate=on_certificate)
            from_files.load()
            workload = from_files
    except (OSError, ssl.SSLError, ValueError, identity.IdentityError) as e:
        raise StartupError(f"cannot load the workload identity: {e}") from e
    return client_ctx, server_ctx, workload


def _control_plane_context(trust_anchors_file: str) -> ssl.SSLContext:
    """The discovery stream's client context: like every mesh connection (TLS 1.3, ALPN h2, our workload
    certificate, the mesh anchors), and the server's name checked against the host dialled: a workload
    certificate carries only a SPIFFE URI, so no meshed pod can pose as the control plane."""
    ctx = identity.client_context(None, None, trust_anchors_file)
    ctx.check_hostname = True
    return ctx


async def serve(
    cfg: Config,
    *,
    stop: asyncio.Event,
    started: asyncio.Future[Proxy] | None = None,
    freeze_gc: bool = False,
) -> None:
    """Run the proxy until `stop` is set, then drain and return."""
    loop = asyncio.get_running_loop()
    registry = CollectorRegistry()
    metrics = Metrics(registry, retry_reasons=RETRY_REASONS, tls_reasons=TLS_FAILURE_REASONS)
    flusher = Flusher(loop)
    limits = Limits()
    rng = random.Random()

    inbound: Inbound | None = None
    in_relay: Relay | None = None
    in_pool: Pool | None = None
    if cfg.inbound is not None:
        if cfg.app is None:
            raise StartupError("inbound is on but no app port is configured (KUBERPC_APP_PORT)")
        app_ep = Endpoint(cfg.app.host, cfg.app.port, tls=False)
        inbound = Inbound(app=app_ep, namespace=cfg.namespace, trust_domain=cfg.trust_domain, metrics=metrics)
    control_plane_ctx: ssl.SSLContext | None = None
    if cfg.discovery == "control-plane" and cfg.tls is not None:
        try:
            control_plane_ctx = _control_plane_context(cfg.tls.trust_anchors)
        except identity.IdentityError as e:
            raise StartupError(str(e)) from e
    also = (control_plane_ctx,) if control_plane_ctx is not None else ()
    client_ctx, server_ctx, workload = _load_identity(cfg, metrics=metrics, rng=rng, inbound=inbound, also=also)

    outbound = Outbound(namespace=cfg.namespace, metrics=metrics, rng=rng, max_ejected_share=cfg.max_ejected_share)
    def make_pool(
        relay: Relay, tls: ssl.SSLContext | None, name: str, per_endpoint: int = 1, pool_limits: Limits = limits
    ) -> Pool:
        return Pool(
            relay,
            flusher=flusher,
            limits=pool_limits,
            metrics=metrics,
            ssl_context=lambda: tls,
            trust_domain=cfg.trust_domain,
            per_endpoint=per_endpoint,
            name=name,
        )

    def on_out_connection(conn: MeshConnection) -> None:
        # Meshed peers must present a mesh identity before a call goes their way.
        if conn.client and outbound.pool is not None and not outbound.pool.verify(conn):
            conn.close()

    # Off unless the pod asked for it (kuberpc.io/access-log): then the relay writes one line per call.
    access_log = AccessLog(sys.stdout) if cfg.access_log == "json" else None
    out_relay = Relay(
        outbound, metrics=metrics, flusher=flusher, limits=limits, on_connection=on_out_connection, access_log=access_log
    )
    out_pool = outbound.pool = make_pool(
        out_relay, client_ctx, "outbound", cfg.connections_per_endpoint, replace(limits, keepalive_interval=PEER_KEEPALIVE_S)
    )

    def on_in_connection(conn: MeshConnection) -> None:
        if not conn.client and conn.transport is not None:
            # The handshake verified the chain; who the caller is comes from its URI SAN.
            conn.link.peer_id = identity.peer_identity(conn.transport.get_extra_info("ssl_object"))

    count_handshake_failures(server_ctx, metrics.tls_handshake_failure)
    if inbound is not None:
        in_relay = Relay(
            inbound, metrics=metrics, flusher=flusher, limits=limits, on_connection=on_in_connection, access_log=access_log
        )
        in_pool = inbound.pool = make_pool(in_relay, None, "app")

    proxy = Proxy(cfg, metrics, registry, outbound, out_relay, inbound, in_relay, stop)
    proxy.workload = workload

    published: list[Catalog] = [Catalog()]

    def publish(catalog: Catalog) -> None:
        outbound.update(catalog)
        if inbound is not None:
            inbound.update(catalog)
        # Per Service, only when its set changed: a cluster-wide source republishes on any change anywhere.
        for key, es in catalog.services.items():
            if published[0].get(key) != es:
                metrics.discovery_update(str(key))
        published[0] = catalog
        proxy.discovered.update(key for key, es in catalog.services.items() if es.usable())
        proxy.catalog_seen.set()
        log.info("catalog updated services=%d", len(catalog))

    source: Discovery
    if cfg.discovery == "file":
        assert cfg.discovery_file is not None
        source = FileDiscovery(cfg.discovery_file, namespace=cfg.namespace, labels=dict(cfg.pod_labels))
    elif cfg.discovery == "kubernetes":
        # Imported here: file mode does not pay for aiohttp and the Kubernetes client.
        from sidecar.discovery import kubernetes as kube

        try:
            credentials = kube.load_credentials(
                service_host=cfg.kubernetes_service_host,
                service_port=cfg.kubernetes_service_port,
                kubeconfig=cfg.kubeconfig,
            )
        except kube.KubernetesError as e:
            raise StartupError(str(e)) from e
        # Readiness needs no extra hook: the source publishes its first catalog only after a complete
        # list of every kind, and the proxy turns ready on the first catalog (catalog_seen below).
        source = kube.KubernetesDiscovery(
            credentials,
            rng=rng,
            clock=time.monotonic,
            namespaces=cfg.discovery_namespaces,
            on_restart=metrics.watch_restart,
            pod=(cfg.namespace, cfg.pod_name) if cfg.pod_name else None,
        )
    elif cfg.discovery == "control-plane":
        from sidecar.discovery.controlplane import ControlPlaneDiscovery
        from sidecar.ondemand import OnDemandRouter

        assert control_plane_ctx is not None
        # Readiness: the first catalog comes once every declared upstream (and, inbound on, the Services
        # selecting this pod) has been answered; calls naming other Services subscribe on demand.
        plane = ControlPlaneDiscovery(
            cfg.discovery_addresses,
            ssl_context=control_plane_ctx,
            upstreams=[u.service for u in cfg.upstreams],
            pod=(cfg.namespace, cfg.pod_name) if cfg.inbound is not None and cfg.pod_name else None,
            rng=rng,
            clock=time.monotonic,
            on_restart=metrics.watch_restart,
        )
        out_relay.router = OnDemandRouter(
            outbound, plane, namespace=cfg.namespace, fail=out_relay.fail, placed=out_relay.placed_late
        )
        metrics.discovery_age(plane.last_update_age)
        proxy.discovery_debug = plane.debug
        proxy.discovery_waiting = plane.waiting_for
        source = plane
    else:
        raise StartupError(f"discovery source {cfg.discovery!r} is not available in this build")

    async def bind(
        addr: Address, factory: Callable[[], asyncio.BaseProtocol], what: str, tls: ssl.SSLContext | None = None
    ) -> None:
        try:
            server = await loop.create_server(
                factory,
                addr.host,
                addr.port,
                reuse_address=True,
                backlog=1024,
                ssl=tls,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if tls is not None else None,
            )
        except OSError as e:
            raise StartupError(f"cannot listen on {addr} ({what}): {e.strerror or e}") from e
        proxy.servers.append(server)
        proxy.ports[what] = int(server.sockets[0].getsockname()[1])
        log.info("listening what=%s addr=%s", what, addr)

    def outbound_factory(upstream: ServiceKey | None = None, label: str = "outbound") -> Callable[[], MeshConnection]:
        def make() -> MeshConnection:
            return out_relay.server_connection(label, Link(upstream=upstream))

        return make

    admin: AdminServer | None = None
    try:
        # The admin server first: probes and scrapes get answers (/ready: 503) while the certificate is awaited.
        if cfg.admin is not None:
            def set_tap(tap: Tap | None) -> None:
                for relay in (out_relay, in_relay):
                    if relay is not None:
                        relay.tap = tap

            admin = AdminServer(
                registry=registry,
                ready=lambda: not proxy.not_ready_because(),
                debug=proxy.debug,
                shutdown=stop.set,
                tap=Tap(set_tap).subscribe,
            )
            try:
                await admin.start(cfg.admin.host, cfg.admin.port)
            except OSError as e:
                raise StartupError(f"cannot listen on {cfg.admin} (admin): {e.strerror or e}") from e
            proxy.admin = admin
            if cfg.debug is not None:
                try:
                    await admin.start_debug(cfg.debug.host, cfg.debug.port)
                except OSError as e:
                    raise StartupError(f"cannot listen on {cfg.debug} (debug): {e.strerror or e}") from e
        # Callers are refused (no listener) until the proxy has a certificate to call or be called with.
        if not await workload.obtain(stop):
            return
        await bind(cfg.outbound, outbound_factory(), "outbound")
        for up in cfg.upstreams:
            await bind(Address("127.0.0.1", up.local_port), outbound_factory(up.service, f"upstream:{up.local_port}"), f"upstream {up.service}")
        if cfg.inbound is not None:
            assert in_relay is not None
            # Bound before discovery has spoken: Inbound refuses every call until it has (and has a certificate).
            await bind(cfg.inbound, lambda: in_relay.server_connection("inbound"), "inbound", server_ctx)

        async with asyncio.TaskGroup() as tg:
            disc = tg.create_task(source.run(publish))
            renewal = tg.create_task(workload.run())
            # Ready once identity is loaded (above), listeners are bound and the first catalog is in.
            waiter = tg.create_task(proxy.catalog_seen.wait())
            stopper = tg.create_task(stop.wait())
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if not stop.is_set():
                # Everything alive now (modules, tables, contexts) lives as long as the process: move it out
                # of the cyclic collector's sight so its sweeps only scan per-call garbage.
                if freeze_gc:
                    gc.collect()
                    gc.freeze()
                proxy.ready = True
                log.info("ready after_ms=%.0f", (time.monotonic() - proxy.started_at) * 1000)
            waiter.cancel()
            if started is not None and not started.done():
                started.set_result(proxy)
            await stopper
            await _drain(proxy, cfg.drain_seconds)
            disc.cancel()
            renewal.cancel()
    finally:
        proxy.ready = False
        for server in proxy.servers:
            server.close()
        await out_pool.close()
        if in_pool is not None:
            await in_pool.close()
        for conn in list(out_relay.downstream) + (list(in_relay.downstream) if in_relay else []):
            conn.close()
        if admin is not None:
            await admin.close()


async def _drain(proxy: Proxy, seconds: float) -> None:
    """Readiness false, GOAWAY to callers, in-flight calls finish within `seconds`."""
    proxy.ready = False
    log.info("draining seconds=%s", seconds)
    for server in proxy.servers:
        server.close()
    relays = [r for r in (proxy.out_relay, proxy.in_relay) if r is not None]
    for r in relays:
        r.drain()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            for r in relays:
                await r.idle.wait()
    left = sum(len(r.downstream) for r in relays)
    log.info("drained connections_left=%d", left)


def run(cfg: Config, *, install_signals: Callable[[asyncio.Event], None] | None = None) -> int:
    """Run the proxy on the best available event loop; returns the process exit code."""
    runner: Callable[[Coroutine[Any, Any, int]], int]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run

    async def main() -> int:
        stop = asyncio.Event()
        if install_signals is not None:
            install_signals(stop)
        try:
            await serve(cfg, stop=stop, freeze_gc=True)  # a process of its own: see serve()
        except StartupError as e:
            log.error("startup failed: %s", e)
            return 1
        return 0

    with contextlib.suppress(KeyboardInterrupt):
        return int(runner(main()))
    return 130
