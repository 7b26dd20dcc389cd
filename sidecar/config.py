"""Proxy configuration: one frozen dataclass built from the environment.

Reads every variable, collects every problem, and raises one ConfigError listing them all.
Does no I/O beyond reading the mapping it is given (file paths are checked by the parts that open them).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from sidecar.address import Address as Address
from sidecar.address import parse_address as parse_address
from sidecar.address import parse_dial_address as parse_dial_address
from sidecar.address import parse_port as parse_port
from sidecar.model import Upstream
from sidecar.policy import ACCESS_LOG_FORMATS, LOG_LEVELS, MAX_DRAIN_SECONDS, UpstreamsError, parse_upstreams

# Re-exported for the proxy's modules that take their defaults from the config; defined in sidecar/ports.py.
from sidecar.ports import ADMIN_PORT as ADMIN_PORT
from sidecar.ports import DEBUG_PORT as DEBUG_PORT
from sidecar.ports import INBOUND_PORT as INBOUND_PORT
from sidecar.ports import OUTBOUND_PORT as OUTBOUND_PORT
from sidecar.spiffe import DEFAULT_TRUST_DOMAIN, is_dns_label, is_service_account, is_trust_domain

# Every variable the proxy reads, with its meaning; `python -m sidecar run --help` prints this table.
ENV_DOC: dict[str, str] = {
    "KUBERPC_OUTBOUND_ADDR": "host:port the app calls (default 127.0.0.1:15001)",
    "KUBERPC_INBOUND_ADDR": "host:port for mTLS calls from peers (default 0.0.0.0:15443; 'off' disables)",
    "KUBERPC_ADMIN_ADDR": "host:port for /metrics /ready /live /shutdown (default 0.0.0.0:15090)",
    "KUBERPC_DEBUG_ADDR": "loopback host:port for /debug (default 127.0.0.1:15091; 'off' disables; kubectl port-forward reaches it)",
    "KUBERPC_APP_ADDR": "host of the local app (default 127.0.0.1)",
    "KUBERPC_APP_PORT": "port of the local app's gRPC server (required when inbound is on)",
    "KUBERPC_UPSTREAMS": "dedicated local ports: svc.ns:port=localport,... (kuberpc.io/upstreams)",
    "KUBERPC_DISCOVERY": "control-plane:host:port[,host:port...] (the control plane's discovery stream over mTLS; what the injector sets, e.g. control-plane:kuberpc-webhook.kuberpc-system.svc:8082; a name resolving to several IPs reaches any replica) | kubernetes (direct: this proxy watches the API itself, needs RBAC) | file:/path.yaml (default kubernetes)",
    "KUBERPC_DISCOVERY_NAMESPACES": "kubernetes discovery: comma-separated namespaces to watch (default: all)",
    "KUBERNETES_SERVICE_HOST": "kubernetes discovery: the API server's address (set in every pod)",
    "KUBERNETES_SERVICE_PORT": "kubernetes discovery: the API server's port (set in every pod)",
    "KUBECONFIG": "kubernetes discovery outside a cluster: kubeconfig file (default ~/.kube/config)",
    "KUBERPC_TLS_CERT": "PEM certificate chain of this workload (written here when KUBERPC_IDENTITY_ADDR is set)",
    "KUBERPC_TLS_KEY": "PEM private key of this workload (written here, mode 0600, with KUBERPC_IDENTITY_ADDR)",
    "KUBERPC_TRUST_ANCHORS": "PEM bundle of mesh CA certificates",
    "KUBERPC_TRUST_DOMAIN": "SPIFFE trust domain (default cluster.local)",
    "KUBERPC_IDENTITY_ADDR": "host:port of the control plane's identity service (certificates by CSR; needs KUBERPC_IDENTITY_TOKEN, POD_NAMESPACE, SERVICE_ACCOUNT)",
    "KUBERPC_IDENTITY_TOKEN": "projected ServiceAccount token file (audience kuberpc-identity), re-read at each renewal",
    "KUBERPC_DRAIN_SECONDS": "seconds in-flight calls may take after SIGTERM (default 10)",
    "KUBERPC_LOG_LEVEL": "debug | info | warning | error (default info)",
    "KUBERPC_CONNECTIONS_PER_ENDPOINT": "HTTP/2 connections kept to each peer endpoint (default 1)",
    "KUBERPC_ACCESS_LOG": "json: one JSON line per call on stdout (no metadata values, no bodies) | off (default)",
    "KUBERPC_MAX_EJECTED_PERCENT": "at most this share of a Service's endpoints is ejected at once (default 50)",
    "POD_NAMESPACE": "namespace of this pod; resolves short service names (default 'default')",
    "POD_NAME": "name of this pod (logs, /debug; with kubernetes or control-plane discovery and inbound on, required: its labels decide whose allow applies)",
    "POD_IP": "IP of this pod (logs and /debug only)",
    "KUBERPC_POD_LABELS": "file discovery: this pod's labels, key=value,... matched against Services' selector to decide whose allow policy applies inbound (kubernetes discovery reads them from the API)",
    "SERVICE_ACCOUNT": "service account of this pod (expected identity)",
}

CONTROL_PLANE_PREFIX = "control-plane:"


class ConfigError(ValueError):
    """Every problem found in the configuration, one per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))


@dataclass(frozen=True, slots=True)
class TLSFiles:
    cert: str
    key: str
    trust_anchors: str


@dataclass(frozen=True, slots=True)
class IdentityService:
    """Where the proxy gets its certificate: then TLSFiles.cert/key are where it writes what it is issued."""

    address: Address  # dialled over TLS, verified against the trust anchors by this host name
    token_file: str  # re-read for every request: the kubelet rotates it


@dataclass(frozen=True, slots=True)
class Config:
    outbound: Address = Address("127.0.0.1", OUTBOUND_PORT)
    inbound: Address | None = Address("0.0.0.0", INBOUND_PORT)
    admin: Address | None = Address("0.0.0.0", ADMIN_PORT)
    debug: Address | None = Address("127.0.0.1", DEBUG_PORT)
    app: Address | None = None
    upstreams: tuple[Upstream, ...] = ()
    discovery: str = "kubernetes"
    discovery_file: str | None = None
    discovery_addresses: tuple[Address, ...] = ()  # control-plane discovery: where its replicas answer
    discovery_namespaces: tuple[str, ...] = ()  # kubernetes discovery: () watches every namespace
    kubernetes_service_host: str = ""  # in-cluster API server; empty: use the kubeconfig
    kubernetes_service_port: str = ""
    kubeconfig: str | None = None
    tls: TLSFiles | None = None
    identity_service: IdentityService | None = None
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    drain_seconds: float = 10.0
    log_level: str = "info"
    connections_per_endpoint: int = 1
    access_log: str = "off"  # "json": one line per call (sidecar/accesslog.py)
    # At most this share of a Service's endpoints is ejected at once (balancer.FailureAccrual).
    max_ejected_share: float = 0.5
    namespace: str = "default"
    pod_name: str = ""
    pod_ip: str = ""
    pod_labels: tuple[tuple[str, str], ...] = ()
    service_account: str = ""
    extra: Mapping[str, str] = field(default_factory=dict)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load(environ: Mapping[str, str]) -> Config:
    """Build the Config from environment variables; raise ConfigError listing every bad value."""
    problems: list[str] = []
    values: dict[str, object] = {}

    def get(name: str) -> str | None:
        v = environ.get(name)
        return v.strip() if v is not None and v.strip() != "" else None

    namespace = get("POD_NAMESPACE") or "default"
    values["namespace"] = namespace
    for var, attr, optional in (
        ("KUBERPC_OUTBOUND_ADDR", "outbound", False),
        ("KUBERPC_INBOUND_ADDR", "inbound", True),
        ("KUBERPC_ADMIN_ADDR", "admin", True),
        ("KUBERPC_DEBUG_ADDR", "debug", True),
    ):
        v = get(var)
        if v is None:
            continue
        if optional and v == "off":
            values[attr] = None
            continue
        try:
            values[attr] = addr = parse_address(v)
        except ValueError as e:
            problems.append(f"{var}: {e}")
            continue
        if attr == "debug" and not _is_loopback(addr.host):
            # /debug lists the catalog and the certificate: it must not be reachable from the network.
            problems.append(f"{var}: {v!r} is not a loopback address (127.0.0.1 or ::1)")

    app_host = get("KUBERPC_APP_ADDR") or "127.0.0.1"
    app_port = get("KUBERPC_APP_PORT")
    if app_port is not None:
        try:
            values["app"] = Address(app_host, parse_port(app_port))
        except ValueError as e:
            problems.append(f"KUBERPC_APP_PORT: {e}")
    elif "inbound" not in values or values["inbound"] is not None:  # inbound is on by default
        problems.append("KUBERPC_APP_PORT: required while inbound is on (set KUBERPC_INBOUND_ADDR=off to disable)")

    if (ups := get("KUBERPC_UPSTREAMS")) is not None:
        try:
            values["upstreams"] = parse_upstreams(ups, namespace)
        except UpstreamsError as e:
            problems += [f"KUBERPC_UPSTREAMS: {p}" for p in e.problems]

    disc = get("KUBERPC_DISCOVERY") or "kubernetes"
    if disc.startswith("file:") and len(disc) > 5:
        values["discovery"], values["discovery_file"] = "file", disc[5:]
    elif disc == "kubernetes":
        values["discovery"] = "kubernetes"
    elif disc.startswith(CONTROL_PLANE_PREFIX):
        values["discovery"] = "control-plane"
        addresses: list[Address] = []
        for entry in (e.strip() for e in disc[len(CONTROL_PLANE_PREFIX) :].split(",")):
            try:
                addresses.append(parse_dial_address(entry))
            except ValueError as e:
                problems.append(f"KUBERPC_DISCOVERY: control plane address {e}")
        values["discovery_addresses"] = tuple(dict.fromkeys(addresses))
    else:
        problems.append(
            f"KUBERPC_DISCOVERY: {disc!r} is not 'control-plane:host:port[,host:port...]', 'kubernetes' or 'file:/path'"
        )
    if (nss := get("KUBERPC_DISCOVERY_NAMESPACES")) is not None:
        names = tuple(dict.fromkeys(n.strip() for n in nss.split(",") if n.strip()))
        bad = [n for n in names if not is_dns_label(n)]
        if bad:
            problems.append(f"KUBERPC_DISCOVERY_NAMESPACES: not namespace names: {', '.join(map(repr, bad))}")
        values["discovery_namespaces"] = names
    values["kubernetes_service_host"] = get("KUBERNETES_SERVICE_HOST") or ""
    values["kubernetes_service_port"] = get("KUBERNETES_SERVICE_PORT") or ""
    values["kubeconfig"] = get("KUBECONFIG")

    tls_vars = ("KUBERPC_TLS_CERT", "KUBERPC_TLS_KEY", "KUBERPC_TRUST_ANCHORS")
    tls_vals = [get(v) for v in tls_vars]
    if all(tls_vals):
        values["tls"] = TLSFiles(*tls_vals)  # type: ignore[arg-type]
    else:
        missing = [v for v, x in zip(tls_vars, tls_vals, strict=True) if not x]
        problems.append(f"{', '.join(missing)}: required (mTLS is always on between proxies)")

    if (td := get("KUBERPC_TRUST_DOMAIN")) is not None:
        if not is_trust_domain(td):
            problems.append(f"KUBERPC_TRUST_DOMAIN: {td!r} is not a SPIFFE trust domain")
        values["trust_domain"] = td

    if (ds := get("KUBERPC_DRAIN_SECONDS")) is not None:
        try:
            d = float(ds)
            if not 0 <= d <= MAX_DRAIN_SECONDS:
                raise ValueError
            values["drain_seconds"] = d
        except ValueError:
            problems.append(f"KUBERPC_DRAIN_SECONDS: {ds!r} is not a number of seconds (0-{MAX_DRAIN_SECONDS})")

    if (lvl := get("KUBERPC_LOG_LEVEL")) is not None:
        if lvl.lower() not in LOG_LEVELS:
            problems.append(f"KUBERPC_LOG_LEVEL: {lvl!r} is not one of {', '.join(LOG_LEVELS)}")
        values["log_level"] = lvl.lower()

    if (cpe := get("KUBERPC_CONNECTIONS_PER_ENDPOINT")) is not None:
        if not cpe.isdigit() or not 1 <= int(cpe) <= 16:
            problems.append(f"KUBERPC_CONNECTIONS_PER_ENDPOINT: {cpe!r} is not a number from 1 to 16")
        else:
            values["connections_per_endpoint"] = int(cpe)

    if (al := get("KUBERPC_ACCESS_LOG")) is not None:
        if al.lower() not in ACCESS_LOG_FORMATS:
            problems.append(f"KUBERPC_ACCESS_LOG: {al!r} is not one of {', '.join(ACCESS_LOG_FORMATS)}")
        values["access_log"] = al.lower()
    if (mep := get("KUBERPC_MAX_EJECTED_PERCENT")) is not None:
        if not mep.isdigit() or not 0 <= int(mep) <= 100:
            problems.append(f"KUBERPC_MAX_EJECTED_PERCENT: {mep!r} is not a percentage from 0 to 100")
        else:
            values["max_ejected_share"] = int(mep) / 100

    values["pod_name"] = get("POD_NAME") or ""
    values["pod_ip"] = get("POD_IP") or ""
    if (labels := get("KUBERPC_POD_LABELS")) is not None:
        pairs: dict[str, str] = {}
        for item in (x.strip() for x in labels.split(",")):
            k, sep, v = item.partition("=")
            if item and (not sep or not k.strip()):
                problems.append(f"KUBERPC_POD_LABELS: {item!r} is not key=value")
            elif item:
                pairs[k.strip()] = v.strip()
        values["pod_labels"] = tuple(sorted(pairs.items()))
    values["service_account"] = get("SERVICE_ACCOUNT") or ""

    if (ident := get("KUBERPC_IDENTITY_ADDR")) is not None:
        address: Address | None = None
        try:
            address = parse_dial_address(ident)
        except ValueError as e:
            problems.append(f"KUBERPC_IDENTITY_ADDR: {e}")
        # The certificate names spiffe://<trust domain>/ns/<namespace>/sa/<service account>: no defaults.
        needed = [v for v in ("KUBERPC_IDENTITY_TOKEN", "SERVICE_ACCOUNT", "POD_NAMESPACE") if get(v) is None]
        if needed:
            problems.append(f"{', '.join(needed)}: required with KUBERPC_IDENTITY_ADDR (they make the identity)")
        sa = get("SERVICE_ACCOUNT")
        if sa is not None and not is_service_account(sa):
            problems.append(f"SERVICE_ACCOUNT: {sa!r} is not a Kubernetes service account name")
        if get("POD_NAMESPACE") is not None and not is_dns_label(namespace):
            problems.append(f"POD_NAMESPACE: {namespace!r} is not a Kubernetes namespace name")
        token = get("KUBERPC_IDENTITY_TOKEN")
        if address is not None and token is not None:
            values["identity_service"] = IdentityService(address, token)

    inbound_on = "inbound" not in values or values["inbound"] is not None  # on by default
    if values.get("discovery") in ("kubernetes", "control-plane") and inbound_on:
        # Which Services' allow applies to inbound calls is decided by this pod's labels, read from the API
        # (by this proxy, or by the control plane for the pod it names).
        if not values["pod_name"]:
            problems.append(f"POD_NAME: required with {values['discovery']} discovery while inbound is on (its labels decide whose allow applies)")
        watched = values.get("discovery_namespaces", ())
        if values["discovery"] == "kubernetes" and isinstance(watched, tuple) and watched and namespace not in watched:
            problems.append(f"KUBERPC_DISCOVERY_NAMESPACES: must include this pod's namespace {namespace!r} while inbound is on")

    if problems:
        raise ConfigError(problems)
    return Config(**values)  # type: ignore[arg-type]
