"""Every annotation, label, port, path, name and default the injector writes or reads, in one place.

Only constants: no parsing and no decisions (those live in patch.py and config.py). What the proxy reads too is
defined once in the data plane's contract modules and named here (sidecar/policy.py, ports.py, spiffe.py, model.py).
"""

from __future__ import annotations

from typing import Final

from sidecar import model, policy, ports, spiffe

PREFIX: Final = policy.PREFIX

# --- pod annotations read by the injector (DESIGN.md §2) ---
INJECT: Final = PREFIX + "inject"
APP_PORT: Final = PREFIX + "app-port"
UPSTREAMS: Final = policy.UPSTREAMS
WEIGHT: Final = policy.WEIGHT
PROXY_CPU: Final = PREFIX + "proxy-cpu"
PROXY_MEMORY: Final = PREFIX + "proxy-memory"
PROXY_LOG_LEVEL: Final = PREFIX + "proxy-log-level"
PROXY_IMAGE: Final = PREFIX + "proxy-image"
NATIVE_SIDECAR: Final = PREFIX + "native-sidecar"
DRAIN_SECONDS: Final = PREFIX + "drain-seconds"
# Where the proxy learns endpoints: "control-plane" (the default: one mTLS stream to the control plane's
# discovery service; the pod gets no Kubernetes API token and needs no RBAC) or "direct" (the proxy watches the
# API itself with the pod's ServiceAccount, which must be bound to the kuberpc-proxy ClusterRole).
DISCOVERY: Final = PREFIX + "discovery"
DISCOVERY_CONTROL_PLANE: Final = "control-plane"
DISCOVERY_DIRECT: Final = "direct"
DISCOVERY_MODES: Final = (DISCOVERY_CONTROL_PLANE, DISCOVERY_DIRECT)
DEFAULT_DISCOVERY: Final = DISCOVERY_CONTROL_PLANE
# Direct discovery's reach: "cluster" (watch every namespace; needs a ClusterRoleBinding) or "namespace"
# (watch the pod's own namespace only; a RoleBinding there is enough, so an example applies to any namespace).
DISCOVERY_SCOPE: Final = PREFIX + "discovery-scope"
DISCOVERY_SCOPES: Final = ("cluster", "namespace")
DEFAULT_DISCOVERY_SCOPE: Final = "cluster"

# Service annotations (read by the proxies from the Service): on a pod they do nothing, and the injector says so.
SERVICE_ANNOTATIONS: Final = frozenset(policy.SERVICE_KEYS)

ACCESS_LOG: Final = PREFIX + "access-log"

INJECT_ENABLED: Final = "enabled"
INJECT_DISABLED: Final = "disabled"

# --- written by the injector ---
INJECTED: Final = policy.INJECTED  # annotation: the injector's version; label: "true"
INJECTED_LABEL_VALUE: Final = "true"
DEFAULT_CONTAINER: Final = "kubectl.kubernetes.io/default-container"
PROMETHEUS_SCRAPE: Final = "prometheus.io/scrape"
PROMETHEUS_PORT: Final = "prometheus.io/port"
PROMETHEUS_PATH: Final = "prometheus.io/path"

# Every kuberpc.io/ pod annotation: any other is a typo the injector warns about (naming it and its value).
POD_ANNOTATIONS: Final = frozenset(
    {INJECT, APP_PORT, UPSTREAMS, WEIGHT, PROXY_CPU, PROXY_MEMORY, PROXY_LOG_LEVEL, PROXY_IMAGE}
    | {NATIVE_SIDECAR, DRAIN_SECONDS, DISCOVERY, DISCOVERY_SCOPE, ACCESS_LOG, INJECTED}
)

# --- namespace label ---
NAMESPACE_INJECT_LABEL: Final = INJECT

# --- weight (read by discovery from the Pod; the injector only corrects it) ---
DEFAULT_WEIGHT: Final = model.DEFAULT_WEIGHT
MAX_WEIGHT: Final = model.MAX_WEIGHT

# --- the proxy's fixed ports (DESIGN.md §1) ---
OUTBOUND_PORT: Final = ports.OUTBOUND_PORT
INBOUND_PORT: Final = ports.INBOUND_PORT
ADMIN_PORT: Final = ports.ADMIN_PORT
DEBUG_PORT: Final = ports.DEBUG_PORT
PROXY_PORTS: Final = ports.PROXY_PORTS
IDENTITY_PORT: Final = ports.IDENTITY_PORT
DISCOVERY_PORT: Final = ports.DISCOVERY_PORT
PORT_NAMES: Final = {OUTBOUND_PORT: "proxy-outbound", INBOUND_PORT: "proxy-inbound", ADMIN_PORT: "proxy-admin"}
READY_PATH: Final = ports.READY_PATH
LIVE_PATH: Final = ports.LIVE_PATH
METRICS_PATH: Final = ports.METRICS_PATH

# --- the injected container ---
PROXY_CONTAINER: Final = "kuberpc-proxy"
PROXY_IMAGE_REPO: Final = "ghcr.io/kuberpc/proxy"
PROXY_ARGS: Final = ("run",)
PROXY_UID: Final = 65532
# The proxy image has Python but no shell, so the startup hold is a Python subcommand.
WAIT_READY_COMMAND: Final = ("python", "-m", "sidecar", "wait-ready", "--timeout", "120")
LOG_LEVELS: Final = policy.LOG_LEVELS
# kuberpc.io/access-log values, passed to the proxy as KUBERPC_ACCESS_LOG (absent: off).
ACCESS_LOG_FORMATS: Final = policy.ACCESS_LOG_FORMATS
DEFAULT_LOG_LEVEL: Final = "info"
DEFAULT_CPU_REQUEST: Final = "50m"
DEFAULT_MEMORY_REQUEST: Final = "64Mi"
DEFAULT_CPU_LIMIT: Final = "1"
DEFAULT_MEMORY_LIMIT: Final = "256Mi"
DEFAULT_GRACE_SECONDS: Final = 30
DRAIN_MARGIN_SECONDS: Final = 5  # leave the kubelet this much of the grace period after the drain
MIN_DRAIN_SECONDS: Final = 1
MAX_DRAIN_SECONDS: Final = policy.MAX_DRAIN_SECONDS  # the proxy rejects more

# --- volumes and the paths the proxy reads (sidecar/config.py ENV_DOC) ---
IDENTITY_VOLUME: Final = "kuberpc-identity"
IDENTITY_DIR: Final = "/var/run/kuberpc/identity"
IDENTITY_VOLUME_SIZE: Final = "1Mi"
TRUST_ANCHORS_VOLUME: Final = "kuberpc-trust-anchors"
TRUST_ANCHORS_CONFIGMAP: Final = "kuberpc-trust-anchors"
TRUST_ANCHORS_KEY: Final = "ca.pem"
TRUST_ANCHORS_DIR: Final = "/var/run/kuberpc/trust-anchors"
TOKEN_VOLUME: Final = "kuberpc-identity-token"
TOKEN_DIR: Final = "/var/run/secrets/kuberpc.io/tokens"
TOKEN_AUDIENCE: Final = "kuberpc-identity"
TOKEN_FILE: Final = "kuberpc-identity"
TOKEN_EXPIRATION_SECONDS: Final = 3600
# Direct discovery only: the proxy's own credentials for the Kubernetes API, where in-cluster clients look for them. The
# ServiceAccount admission plugin mounts the same at this path into the pod's containers, but it ran before
# this webhook and mounts nothing when automountServiceAccountToken is false: the proxy gets its own copy,
# made like the plugin's (a bound token the kubelet rotates, the cluster's CA, the namespace).
API_ACCESS_VOLUME: Final = "kuberpc-api-access"
API_ACCESS_DIR: Final = "/var/run/secrets/kubernetes.io/serviceaccount"
API_TOKEN_EXPIRATION_SECONDS: Final = 3607  # the plugin's value: the kubelet refreshes it at 80 % of its life
API_CA_CONFIGMAP: Final = "kube-root-ca.crt"  # published in every namespace since Kubernetes 1.21
TLS_CERT_PATH: Final = IDENTITY_DIR + "/cert.pem"
TLS_KEY_PATH: Final = IDENTITY_DIR + "/key.pem"
TRUST_ANCHORS_PATH: Final = TRUST_ANCHORS_DIR + "/" + TRUST_ANCHORS_KEY
TOKEN_PATH: Final = TOKEN_DIR + "/" + TOKEN_FILE

# --- injector config defaults (config.yaml) ---
DEFAULT_TRUST_DOMAIN: Final = spiffe.DEFAULT_TRUST_DOMAIN
DEFAULT_IDENTITY_ADDR: Final = f"kuberpc-webhook.kuberpc-system.svc:{IDENTITY_PORT}"
# The control plane's discovery service (proto/discovery.proto), same Service, its own port.
DEFAULT_DISCOVERY_ADDR: Final = f"kuberpc-webhook.kuberpc-system.svc:{DISCOVERY_PORT}"
DEFAULT_CONTROL_PLANE_NAMESPACE: Final = "kuberpc-system"
DEFAULT_IMAGE_PULL_POLICY: Final = "IfNotPresent"
NATIVE_SIDECAR_MIN_VERSION: Final = (1, 29)

# --- control plane objects (shared with manifests/ and the install CLI) ---
WEBHOOK_NAME: Final = "kuberpc-webhook"
WEBHOOK_CONFIGURATION: Final = "kuberpc-injector"
WEBHOOK_TLS_SECRET: Final = "kuberpc-webhook-tls"
IDENTITY_CA_SECRET: Final = "kuberpc-identity-ca"
