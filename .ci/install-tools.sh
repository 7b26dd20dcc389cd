#!/usr/bin/env bash
# Installs the system tools tests and benchmarks drive, from Debian's packages, when missing.
# As root (CI, fresh machines) it installs them; otherwise it says what is missing and the tests that
# need them skip (outside CI) with that reason.
set -euo pipefail
declare -A want=(
  [h2load]=nghttp2-client
  [nginx]=nginx
  [promtool]=prometheus
  [ip]=iproute2
  [taskset]=util-linux
  [shellcheck]=shellcheck
  [etcd]=etcd-server
  [valgrind]=valgrind
)
missing=()
for tool in "${!want[@]}"; do
  if ! command -v "$tool" >/dev/null 2>&1 && ! [ -x "/usr/sbin/$tool" ]; then
    missing+=("${want[$tool]}")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "missing system packages (install them to run every test): ${missing[*]}" >&2
  exit 0
fi
echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian starts the services it installs; the tests run their own instances.
for svc in nginx prometheus etcd; do
  if command -v systemctl >/dev/null 2>&1; then systemctl stop "$svc" >/dev/null 2>&1 || true; fi
  if command -v service >/dev/null 2>&1; then service "$svc" stop >/dev/null 2>&1 || true; fi
done
pkill -x nginx >/dev/null 2>&1 || true
pkill -x prometheus >/dev/null 2>&1 || true
pkill -x etcd >/dev/null 2>&1 || true
