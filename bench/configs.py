"""Configuration text for every process the bench starts: nginx (backend and 1-hop proxy), Envoy, kuberpc.

Pure renderers from ports and file names to config values; they must not start processes or pick ports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

SERVICE = "arith"
NAMESPACE = "default"
SERVICE_PORT = 50051
AUTHORITY = f"{SERVICE}.{NAMESPACE}:{SERVICE_PORT}"
UNARY_PATH = "/arith.Arith/Add"
STREAM_PATH = "/arith.Arith/Accumulate"
# The unary call every path carries: Add(1, 2), whose reply nginx serves from a file (see nginx_backend).
ARGS = (1, 2)
REPLY_C = 3
# The identities of the two sides of a pair; the client side checks the server's, as the mesh does.
CLIENT_SA = "bench-client"
SERVER_SA = "bench-server"
TRUST_DOMAIN = "cluster.local"


def spiffe_id(service_account: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{service_account}"


@dataclass(frozen=True, slots=True)
class Identity:
    """One workload's certificate files, as `sidecar certs issue` writes them."""

    cert: str
    key: str
    ca: str


def _nginx_common(workdir: str) -> str:
    # Every temp path under the bench's own directory, so nginx runs as an unprivileged, throwaway process.
    return (
        "daemon off;\n"
        "worker_processes 1;\n"
        f"pid {workdir}/nginx.pid;\n"
        f"error_log {workdir}/error.log warn;\n"
        "events { worker_connections 4096; }\n"
    )


def _nginx_http_common(workdir: str) -> str:
    return (
        "  access_log off;\n"
        "  server_tokens off;\n"
        f"  client_body_temp_path {workdir}/body;\n"
        f"  proxy_temp_path {workdir}/proxy;\n"
        f"  fastcgi_temp_path {workdir}/fastcgi;\n"
        f"  uwsgi_temp_path {workdir}/uwsgi;\n"
        f"  scgi_temp_path {workdir}/scgi;\n"
        "  keepalive_requests 1000000000;\n"
        "  http2_max_concurrent_streams 1024;\n"
    )


def nginx_backend(workdir: str, www_root: str, port: int, stream_port: int) -> str:
    """The unary backend: Add answered from a file holding the framed Reply, plus trailers, in C.

    Static files answer POST with 405, hence `error_page 405 =200 $uri` (serve the file anyway). They also
    answer before the request body is read, and a late RST_STREAM for the unread body makes nginx's grpc_pass
    fail the next call ("upstream sent frame for unknown stream"); `mirror` with its request body makes nginx
    read the whole body first.
    Accumulate is passed to the grpc.aio backend so one port serves both, as one app port must behind a pair.
    """
    return _nginx_common(workdir) + (
        "http {\n"
        + _nginx_http_common(workdir)
        + f"  upstream stream_backend {{ server 127.0.0.1:{stream_port}; keepalive 64; }}\n"
        "  server {\n"
        f"    listen 127.0.0.1:{port} http2 reuseport;\n"
        f"    location = {UNARY_PATH} {{\n"
        f"      root {www_root};\n"
        "      default_type application/grpc;\n"
        "      etag off;\n"
        "      max_ranges 0;\n"
        "      add_header Last-Modified \"\";\n"
        "      mirror /read-body;\n"
        "      mirror_request_body on;\n"
        "      error_page 405 =200 $uri;\n"
        "      add_trailer grpc-status 0 always;\n"
        "    }\n"
        f"    location = {STREAM_PATH} {{ grpc_pass grpc://stream_backend; }}\n"
        "    location = /read-body { internal; return 204; }\n"
        "  }\n"
        "}\n"
    )


def nginx_proxy(workdir: str, port: int, backend_port: int) -> str:
    """nginx as a 1-hop gRPC proxy (`grpc_pass`), one worker, keep-alive connections to the backend."""
    return _nginx_common(workdir) + (
        "http {\n"
        + _nginx_http_common(workdir)
        + f"  upstream backend {{ server 127.0.0.1:{backend_port}; keepalive 256; }}\n"
        "  server {\n"
        f"    listen 127.0.0.1:{port} http2;\n"
        "    location / { grpc_pass grpc://backend; grpc_read_timeout 60s; }\n"
        "  }\n"
        "}\n"
    )


def _hcm(stat_prefix: str, cluster: str) -> dict[str, Any]:
    domains = [SERVICE, f"{SERVICE}.{NAMESPACE}", AUTHORITY, f"{SERVICE}.{NAMESPACE}.svc", "*"]
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "codec_type": "HTTP2",
            "route_config": {
                "name": stat_prefix,
                "virtual_hosts": [
                    {
                        "name": SERVICE,
                        "domains": domains,
                        # timeout 0s: streams live as long as the client keeps them (the mesh sets no default).
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": "0s"}}],
                    }
                ],
            },
            "http_filters": [
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                }
            ],
        },
    }


def _tls_common(identity: Identity, peer_sa: str | None) -> dict[str, Any]:
    validation: dict[str, Any] = {"trusted_ca": {"filename": identity.ca}}
    if peer_sa is not None:
        validation["match_typed_subject_alt_names"] = [
            {"san_type": "URI", "matcher": {"exact": spiffe_id(peer_sa)}}
        ]
    return {
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"},
        "alpn_protocols": ["h2"],
        "tls_certificates": [
            {"certificate_chain": {"filename": identity.cert}, "private_key": {"filename": identity.key}}
        ],
        "validation_context": validation,
    }


def _cluster(name: str, port: int, tls: dict[str, Any] | None) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "connect_timeout": "1s",
        "type": "STATIC",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}
            ],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
    }
    if tls is not None:
        cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": tls}
    return cluster


def _listener(name: str, port: int, cluster: str, tls: dict[str, Any] | None) -> dict[str, Any]:
    chain: dict[str, Any] = {"filters": [_hcm(name, cluster)]}
    if tls is not None:
        chain["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": tls}
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [chain],
    }


def _bootstrap(admin_port: int, listener: dict[str, Any], cluster: dict[str, Any]) -> dict[str, Any]:
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": [listener], "clusters": [cluster]},
    }


def envoy_outbound(listen_port: int, admin_port: int, upstream_port: int, identity: Identity | None) -> dict[str, Any]:
    """Envoy on the client side: plaintext h2c in; out to the backend (1 hop) or, with `identity`, mTLS to the peer."""
    tls = None
    if identity is not None:
        tls = {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": _tls_common(identity, SERVER_SA),
            "sni": f"{SERVICE}.{NAMESPACE}",
        }
    return _bootstrap(admin_port, _listener("outbound", listen_port, "upstream", None), _cluster("upstream", upstream_port, tls))


def envoy_inbound(listen_port: int, admin_port: int, app_port: int, identity: Identity) -> dict[str, Any]:
    """Envoy on the server side: mTLS in (client certificate required, chain checked against the CA); h2c to the app."""
    tls = {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "require_client_certificate": True,
        "common_tls_context": _tls_common(identity, None),
    }
    return _bootstrap(admin_port, _listener("inbound", listen_port, "app", tls), _cluster("app", app_port, None))


def kuberpc_endpoints(port: int, tls: bool) -> str:
    """The discovery file of a kuberpc outbound proxy: service `arith` with one endpoint."""
    doc = {
        "services": [
            {
                "name": SERVICE,
                "namespace": NAMESPACE,
                "ports": [SERVICE_PORT],
                "annotations": {"kuberpc.io/grpc-services": "arith.Arith"},
                "selector": {"app": SERVICE},  # the server-side proxy runs with KUBERPC_POD_LABELS=app=arith
                "endpoints": [{"address": "127.0.0.1", "port": port, "weight": 100, "tls": tls}],
            }
        ]
    }
    return yaml.safe_dump(doc, sort_keys=False)


def kuberpc_env(
    *,
    outbound_port: int,
    inbound_port: int | None,
    admin_port: int,
    app_port: int | None,
    endpoints_file: str,
    identity: Identity,
    service_account: str,
) -> dict[str, str]:
    """The proxy's environment (names from sidecar.config.ENV_DOC)."""
    env = {
        "KUBERPC_OUTBOUND_ADDR": f"127.0.0.1:{outbound_port}",
        "KUBERPC_INBOUND_ADDR": f"127.0.0.1:{inbound_port}" if inbound_port is not None else "off",
        "KUBERPC_ADMIN_ADDR": f"127.0.0.1:{admin_port}",
        "KUBERPC_DEBUG_ADDR": "127.0.0.1:0",
        "KUBERPC_DISCOVERY": f"file:{endpoints_file}",
        "KUBERPC_TLS_CERT": identity.cert,
        "KUBERPC_TLS_KEY": identity.key,
        "KUBERPC_TRUST_ANCHORS": identity.ca,
        "KUBERPC_LOG_LEVEL": "warning",
        "POD_NAMESPACE": NAMESPACE,
        "SERVICE_ACCOUNT": service_account,
    }
    if app_port is not None:
        env["KUBERPC_APP_PORT"] = str(app_port)
        env["KUBERPC_POD_LABELS"] = f"app={SERVICE}"
    return env
