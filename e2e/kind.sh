#!/usr/bin/env bash
# kuberpc end to end on a local kind cluster.
#
# Builds the three images (proxy, webhook, Arith example) from this checkout, loads them into a kind
# cluster (created if missing), installs the control plane, deploys manifests/examples/arith and
# checks that
#   - every example pod got the proxy (a second container, or a native sidecar initContainer),
#   - calls from the client reach the servers through both proxies (client output, and the servers'
#     inbound proxies count OK calls in kuberpc_requests_total),
#   - every proxy holds a 24 h certificate from the control plane's identity service,
#   - a meshed Job completes (the proxy does not keep it running).
#
# Needs: docker, kind, kubectl, and a Python 3.11 with the project's dependencies for
# `python -m webhook install` (the repo's .venv is used when present).
#
# Usage: e2e/kind.sh
# Environment:
#   CLUSTER=kuberpc        kind cluster name (an existing cluster of that name is reused)
#   KIND_NODE_IMAGE=...    node image for a new cluster (default: kind's own; >= 1.29 gives native sidecars)
#   KEEP_CLUSTER=1         keep a cluster this script created (default: delete it at the end)
#   PYTHON=...             interpreter for `python -m webhook install`
#   TIMEOUT=180s           how long each rollout/wait may take
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

CLUSTER="${CLUSTER:-kuberpc}"
KEEP_CLUSTER="${KEEP_CLUSTER:-0}"
TIMEOUT="${TIMEOUT:-180s}"
VERSION="0.1.0"
PROXY_IMAGE="ghcr.io/kuberpc/proxy:${VERSION}"
WEBHOOK_IMAGE="ghcr.io/kuberpc/webhook:${VERSION}"
EXAMPLE_IMAGE="ghcr.io/kuberpc/arith-example:${VERSION}"
# The same pinned base as Dockerfile.sidecar, read from it so the two never drift.
BASE_IMAGE="$(sed -n 's/^ARG PYTHON_IMAGE=//p' Dockerfile.sidecar)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
CREATED_CLUSTER=0

log() { printf '\n==> %s\n' "$*"; }
fail() { printf '\nFAIL: %s\n' "$*" >&2; exit 1; }

need() {
  command -v "$1" >/dev/null 2>&1 || fail "$1 is required (see the top of $0)"
}

# On any failure, show what the cluster looks like before (maybe) deleting it.
diagnose() {
  local status=$?
  if [[ $status -ne 0 ]]; then
    printf '\n--- diagnostics (exit %s) ---\n' "$status" >&2
    kubectl get pods -A -o wide >&2 || true
    kubectl -n kuberpc-system logs deploy/kuberpc-webhook --tail=50 >&2 || true
    kubectl logs deploy/arith -c kuberpc-proxy --tail=30 >&2 || true
    kubectl logs deploy/arith-client -c kuberpc-proxy --tail=30 >&2 || true
    kubectl get events -n default --sort-by=.lastTimestamp >&2 || true
  fi
  if [[ $CREATED_CLUSTER -eq 1 && $KEEP_CLUSTER != 1 ]]; then
    kind delete cluster --name "$CLUSTER" || true
  fi
  exit "$status"
}
trap diagnose EXIT

for tool in docker kind kubectl; do need "$tool"; done
"$PYTHON" -c 'import webhook' 2>/dev/null \
  || fail "$PYTHON cannot import webhook: run from the repo with its dependencies installed (make venv)"

log "building images"
docker build -f Dockerfile.sidecar -t "$PROXY_IMAGE" .
docker build -f Dockerfile.webhook -t "$WEBHOOK_IMAGE" .
# The example needs grpcio and its tools (stubs are generated in memory at import); nothing else of
# the repo but e2e/ and proto/. Same non-root user and base as the mesh's own images.
docker build -t "$EXAMPLE_IMAGE" -f - . <<EOF
FROM ${BASE_IMAGE}
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=/app
RUN pip install --only-binary=:all: grpcio==1.85.1 grpcio-tools==1.85.1 protobuf==7.36.2
COPY e2e/ /app/e2e/
COPY proto/ /app/proto/
WORKDIR /app
USER 65532:65532
ENTRYPOINT ["python", "-m", "e2e.arith.server"]
EOF

log "kind cluster ${CLUSTER}"
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  echo "reusing existing cluster ${CLUSTER}"
else
  kind create cluster --name "$CLUSTER" ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"} --wait 120s
  CREATED_CLUSTER=1
fi
kubectl config use-context "kind-${CLUSTER}"
kubectl version

log "loading images into the cluster"
for image in "$PROXY_IMAGE" "$WEBHOOK_IMAGE" "$EXAMPLE_IMAGE"; do
  kind load docker-image "$image" --name "$CLUSTER"
done

log "installing the control plane"
"$PYTHON" -m webhook install --namespaces default | kubectl apply -f -
kubectl -n kuberpc-system rollout status deploy/kuberpc-webhook --timeout="$TIMEOUT"

# failurePolicy is Ignore: until the API server reaches the webhook, pods would be created without a
# proxy. A server-side dry run returns the mutated pod: wait until it carries the proxy.
log "waiting until the API server gets pods injected"
deadline=$((SECONDS + 120))
# (Output captured, not piped into grep -q: with pipefail, grep exiting early would fail the pipe.)
until probe="$(kubectl run kuberpc-injection-probe --image="$EXAMPLE_IMAGE" --restart=Never \
    --annotations=kuberpc.io/inject=enabled --dry-run=server -o yaml 2>/dev/null)" \
    && grep -q 'name: kuberpc-proxy' <<<"$probe"; do
  (( SECONDS < deadline )) || fail "pods are still admitted without a proxy after 120 s"
  sleep 2
done
echo "injection works"

log "deploying the Arith example"
kubectl apply -k manifests/examples/arith
kubectl rollout status deploy/arith --timeout="$TIMEOUT"
kubectl rollout status deploy/arith-client --timeout="$TIMEOUT"

log "checking every example pod carries the proxy"
for app in arith arith-client; do
  pods="$(kubectl get pods -l "app.kubernetes.io/name=${app}" --field-selector=status.phase=Running \
    -o jsonpath='{range .items[*]}{.metadata.name}{" init="}{.spec.initContainers[*].name}{" main="}{.spec.containers[*].name}{"\n"}{end}')"
  [[ -n "$pods" ]] || fail "no running ${app} pod"
  echo "$pods"
  while read -r line; do
    [[ "$line" == *kuberpc-proxy* ]] || fail "pod without the proxy: ${line}"
    # Two containers: the app plus the proxy, either as a second container or as a native sidecar.
    main="${line##*main=}"
    read -r -a mains <<<"$main"
    if [[ "$line" == *"init=kuberpc-proxy"* ]]; then
      [[ ${#mains[@]} -eq 1 ]] || fail "expected the app alone beside a native sidecar: ${line}"
    else
      [[ ${#mains[@]} -eq 2 ]] || fail "expected the app and the proxy: ${line}"
    fi
  done <<<"$pods"
done

log "checking calls go through the proxies"
deadline=$((SECONDS + 120))
until out="$(kubectl logs deploy/arith-client -c client --tail=100 2>/dev/null)" \
    && grep -q 'Add x20: ok' <<<"$out"; do
  (( SECONDS < deadline )) || { kubectl logs deploy/arith-client --all-containers --tail=50 || true; fail "the client's calls did not succeed"; }
  sleep 3
done
kubectl logs deploy/arith-client -c client --tail=6

# The server listens on 127.0.0.1 only, so every OK call it answered came through its inbound proxy.
inbound_ok=0
for pod in $(kubectl get pods -l app.kubernetes.io/name=arith -o jsonpath='{.items[*].metadata.name}'); do
  n="$(kubectl get --raw "/api/v1/namespaces/default/pods/${pod}:15090/proxy/metrics" \
    | awk '/^kuberpc_requests_total\{/ && /direction="inbound"/ && /grpc_code="0"/ {s += $NF} END {printf "%d", s}')"
  echo "${pod}: ${n} OK inbound calls"
  inbound_ok=$((inbound_ok + n))
done
(( inbound_ok > 0 )) || fail "no inbound proxy counted an OK call"

# Each proxy's certificate came from the identity service (a CSR plus its ServiceAccount token):
# it expires within the next 24 h, not a year out like a hand-made one.
log "checking the proxies hold certificates from the identity service"
now="$(date +%s)"
for pod in $(kubectl get pods -l 'app.kubernetes.io/name in (arith,arith-client)' -o jsonpath='{.items[*].metadata.name}'); do
  expiry="$(kubectl get --raw "/api/v1/namespaces/default/pods/${pod}:15090/proxy/metrics" \
    | awk '/^kuberpc_cert_expiry_timestamp_seconds / {printf "%d", $NF}')"
  [[ -n "$expiry" ]] || fail "${pod}: no kuberpc_cert_expiry_timestamp_seconds"
  (( expiry > now && expiry <= now + 86400 + 120 )) || fail "${pod}: certificate expiry ${expiry} is not within 24 h"
  echo "${pod}: certificate valid for $(( (expiry - now) / 60 )) more minutes"
done

log "checking a meshed Job completes"
kubectl wait --for=condition=complete job/arith-client-once --timeout="$TIMEOUT"
kubectl logs job/arith-client-once -c client | grep 'Add x20: ok'

log "PASS: injected, called through the proxies, Job completed"
