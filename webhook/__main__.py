"""Entry point: `python -m webhook serve ...` runs the injector and identity service, `install` prints manifests.

The only reader of argv, os.environ and signals; builds the registry, API client and tasks and wires them.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import logging
import os
import random
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import replace
from functools import partial
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from prometheus_client import CollectorRegistry

from sidecar.ports import DISCOVERY_PORT
from sidecar.spiffe import is_dns_label
from webhook import __version__
from webhook import annotations as a
from webhook.config import ConfigError, InjectorConfig, load_config
from webhook.identity import CAError, CertificateAuthority
from webhook.install import InstallError, default_manifests_dir, render, write_yaml

log = logging.getLogger("webhook")

JOB_NOTE = """\
Injected pods:
  Kubernetes >= 1.29: the proxy is a native sidecar (an initContainer with restartPolicy: Always);
  it starts before the app and stops after it, so Jobs complete by themselves.
  Older clusters or kuberpc.io/native-sidecar: "false": the proxy is the first regular container and
  the app starts only once it is ready (postStart hook). A Job's last step then ends the proxy with
    curl -X POST http://localhost:15090/shutdown   (accepted from localhost only)
  On SIGTERM the proxy turns unready and keeps serving in-flight calls for kuberpc.io/drain-seconds
  (default: terminationGracePeriodSeconds - 5), so no preStop hook is needed.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m webhook",
        description=f"kuberpc control plane {__version__}: proxy-injection webhook, identity service and installer.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=JOB_NOTE,
    )
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the mutating admission webhook (HTTPS) and the identity service (gRPC)")
    s.add_argument("--config", required=True, help="injector config.yaml")
    s.add_argument("--tls-cert", required=True, help="serving certificate (PEM); reloaded when it changes")
    s.add_argument("--tls-key", required=True, help="serving key (PEM); reloaded when it changes")
    s.add_argument("--host", default="0.0.0.0", help="listen address (default 0.0.0.0)")
    s.add_argument("--port", type=int, default=8443, help="listen port (default 8443)")
    s.add_argument(
        "--trust-anchors",
        default="/etc/kuberpc/identity-ca/ca.pem",
        help="identity CA bundle kept in the kuberpc-trust-anchors ConfigMap of every namespace but Kubernetes' own "
        "(skipped when the file is absent)",
    )
    s.add_argument(
        "--identity-port", type=int, default=a.IDENTITY_PORT,
        help=f"identity service (gRPC over TLS) listen port (default {a.IDENTITY_PORT})"
    )
    s.add_argument(
        "--identity-ca-key",
        default="/etc/kuberpc/identity-ca/ca-key.pem",
        help="mesh CA key that signs the proxies' certificates; without this file the identity service is off",
    )
    s.add_argument(
        "--identity-ca-cert",
        default="/etc/kuberpc/identity-ca/ca.pem",
        help="mesh CA certificate of --identity-ca-key (default /etc/kuberpc/identity-ca/ca.pem)",
    )
    s.add_argument(
        "--discovery-port",
        type=int,
        default=DISCOVERY_PORT,
        help=f"discovery service (gRPC over mTLS, proxies present their mesh certificate) listen port (default {DISCOVERY_PORT}); "
        "off without the identity CA key or Kubernetes credentials",
    )
    s.add_argument(
        "--catalog-ready-grace",
        type=float,
        default=60.0,
        help="seconds /readyz waits for the discovery catalog's first list before answering ready anyway, so "
        "that injection and certificates keep working while the API server cannot be listed (default 60)",
    )
    s.add_argument(
        "--shutdown-delay",
        type=float,
        default=3.0,
        help="seconds to keep answering after SIGTERM while the Service stops routing here (default 3)",
    )
    i = sub.add_parser(
        "install",
        help="print manifests/ with fresh certificates, for `kubectl apply -f -`",
        description="Generate the webhook serving CA and certificate and the mesh identity CA, and print "
        "manifests/ filled in with them plus their Secrets and trust-anchor ConfigMaps.",
    )
    i.add_argument("--namespaces", default="", help="comma-separated namespaces that also get the trust-anchor ConfigMap")
    i.add_argument("--manifests", type=Path, default=None, help="directory with kustomization.yaml (default: manifests/)")
    i.add_argument("--trust-domain", default=a.DEFAULT_TRUST_DOMAIN, help="SPIFFE trust domain (default cluster.local)")
    return p


def _load_config(path: str, environ: Mapping[str, str]) -> InjectorConfig:
    # The pod's own namespace is the default control-plane namespace; the config file may still name another.
    base = InjectorConfig(control_plane_namespace=environ.get("POD_NAMESPACE") or a.DEFAULT_CONTROL_PLANE_NAMESPACE)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError([f"{path}: {e.strerror}"]) from e
    return load_config(text, base=base)


def _read_bundle(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        log.info("event=trust_anchor_sync_off reason=no_bundle path=%s", path)
        return None


def _load_identity_ca(args: argparse.Namespace, cfg: InjectorConfig) -> CertificateAuthority | None:
    """The mesh CA, or None when its key is not mounted (the identity service is then off); CAError if unusable."""
    key = Path(args.identity_ca_key)
    if not key.exists():
        log.info("event=identity_service_off reason=no_ca_key path=%s", key)
        return None
    return CertificateAuthority.load(Path(args.identity_ca_cert), key, trust_domain=cfg.trust_domain)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def _serve(
    args: argparse.Namespace, cfg: InjectorConfig, bundle: str | None, ca: CertificateAuthority | None
) -> None:
    # Imported here so `--help` and `install` work without loading uvicorn, grpc and the kubernetes client.
    from sidecar.discovery.watch import credentials_from
    from webhook.catalog import MeshCatalog
    from webhook.discovery_service import DiscoveryMetrics, DiscoveryService
    from webhook.discovery_service import serving as serving_discovery
    from webhook.fanout import Hub
    from webhook.identity_service import (
        IdentityMetrics,
        IdentityService,
        ServingCertificate,
        identity_dns_names,
        serving,
    )
    from webhook.kube import NamespaceLabels, fetch_version, load_api_client, review_token
    from webhook.metrics import WebhookMetrics
    from webhook.server import CertReloader, create_app
    from webhook.server import serving as serving_https
    from webhook.trust import TrustAnchorSync

    api = load_api_client()
    if cfg.native_sidecar == "auto" and cfg.kubernetes_version is None:
        if api is None:
            log.warning("event=kubernetes_version_unknown fallback=regular_container")
        else:
            try:
                cfg = replace(cfg, kubernetes_version=await fetch_version(api))
            except Exception as e:  # any failure here only costs the native-sidecar default
                log.warning("event=kubernetes_version_unknown fallback=regular_container error=%s", type(e).__name__)
    log.info(
        "event=config image=%s native_sidecar=%s kubernetes_version=%s",
        cfg.image,
        cfg.native_by_default,
        ".".join(map(str, cfg.kubernetes_version or ())) or "unknown",
    )
    reloader = CertReloader(args.tls_cert, args.tls_key)
    registry = CollectorRegistry()  # one /metrics for the webhook and the identity service
    identity: AbstractAsyncContextManager[int] | None = None
    if ca is not None:
        if api is None:
            log.warning("event=identity_service_degraded reason=no_kubernetes_credentials answer=UNAVAILABLE")
        service = IdentityService(
            ca,
            review=partial(review_token, api, audience=a.TOKEN_AUDIENCE),
            metrics=IdentityMetrics(registry),
            clock=_utcnow,
        )
        cert = ServingCertificate(ca, identity_dns_names(cfg.control_plane_namespace, cfg.identity_addr), clock=_utcnow)
        identity = serving(service, cert, host=args.host, port=args.identity_port)
    discovery: AbstractAsyncContextManager[int] | None = None
    catalog: MeshCatalog | None = None
    if ca is not None and api is not None:
        # One watch per kind for every proxy this replica serves; the proxies authenticate with their mesh
        # certificates, verified against the trust anchors (the bundle, else the CA itself).
        catalog = MeshCatalog()
        service_d = DiscoveryService(catalog, Hub(catalog), metrics=DiscoveryMetrics(registry))
        roots = bundle.encode() if bundle is not None else ca.cert.public_bytes(serialization.Encoding.PEM)
        names = identity_dns_names(cfg.control_plane_namespace, cfg.discovery_addr)  # the host proxies dial
        cert_d = ServingCertificate(ca, names, clock=_utcnow, client_roots=roots)
        discovery = serving_discovery(
            service_d, cert_d, trust_domain=cfg.trust_domain, host=args.host, port=args.discovery_port
        )
    elif ca is not None:
        log.warning("event=discovery_service_off reason=no_kubernetes_credentials")

    # Readiness waits for the catalog's first list (a replica would answer proxies with nothing), but only for a
    # grace period: the webhook and the identity service share the Service and need no catalog, and a control
    # plane that cannot list (RBAC drift, an API server down at start) must still inject pods and issue
    # certificates. Discovery streams wait for the list themselves (DiscoveryService.Watch).
    ready_by = time.monotonic() + args.catalog_ready_grace
    warned = False

    def not_ready() -> list[str]:
        nonlocal warned
        if catalog is None or catalog.synced.is_set():
            return []
        if time.monotonic() < ready_by:
            return ["the discovery catalog has not listed Services, EndpointSlices and Pods yet"]
        if not warned:
            warned = True
            log.warning(
                "event=ready_without_catalog grace_s=%g reason=the discovery catalog has not been listed; "
                "injection and identity serve, discovery streams wait",
                args.catalog_ready_grace,
            )
        return []

    app = create_app(
        cfg=cfg, metrics=WebhookMetrics(registry), namespace_labels=NamespaceLabels(api), not_ready=not_ready
    )
    trust = None
    if bundle is not None and api is not None:
        trust = TrustAnchorSync(api, bundle=bundle, control_plane=cfg.control_plane_namespace)
    # Everything allocated so far (modules, the kubernetes client, config) lives as long as the process: move it
    # out of the collector's sight, so a full collection during a burst of reviews walks only their objects
    # (otherwise one takes tens of milliseconds, straight into the latency tail).
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with (
        AsyncExitStack() as stack,
        asyncio.TaskGroup() as tg,
        serving_https(app, host=args.host, port=args.port, ssl_context=reloader.context),
    ):
        if identity is not None:
            await stack.enter_async_context(identity)
        watching = None
        if discovery is not None and catalog is not None and api is not None:
            await stack.enter_async_context(discovery)
            watching = tg.create_task(
                catalog.run(credentials_from(api.configuration), rng=random.Random(), clock=time.monotonic),
                name="discovery-catalog",
            )
        if trust is not None:
            tg.create_task(trust.run(stop), name="trust-anchors")
        await stop.wait()
        log.info("event=stopping delay=%s", args.shutdown_delay)
        # Endpoints lag behind SIGTERM: keep answering the API server and the proxies until they stop sending here.
        await asyncio.sleep(max(0.0, args.shutdown_delay))
        if watching is not None:
            watching.cancel()  # the streams keep the last state until the server closes them


def _install(args: argparse.Namespace) -> int:
    namespaces = [n.strip() for n in args.namespaces.split(",") if n.strip()]
    bad = [n for n in namespaces if not is_dns_label(n)]
    if bad:
        print(f"install: not namespace names: {', '.join(bad)}", file=sys.stderr)
        return 2
    try:
        docs = render(
            args.manifests or default_manifests_dir(),
            namespaces=namespaces,
            now=dt.datetime.now(dt.UTC),
            trust_domain=args.trust_domain,
        )
    except InstallError as e:
        print(f"install: {e}", file=sys.stderr)
        return 1
    write_yaml(docs, sys.stdout)
    return 0


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = _parser().parse_args(argv)
    env = os.environ if environ is None else environ
    if args.command == "install":
        return _install(args)
    try:
        cfg = _load_config(args.config, env)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    logging.basicConfig(
        level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr
    )
    bundle = _read_bundle(args.trust_anchors)
    try:
        ca = _load_identity_ca(args, cfg)
    except CAError as e:
        print(f"serve: {e}", file=sys.stderr)
        return 2
    try:
        import uvloop
    except ImportError:  # uvloop is optional (not built for every platform)
        asyncio.run(_serve(args, cfg, bundle, ca))
    else:
        uvloop.run(_serve(args, cfg, bundle, ca))
    return 0


if __name__ == "__main__":
    sys.exit(main())
