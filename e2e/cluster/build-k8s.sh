#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager, kube-scheduler and kubectl from the k8s.io/kubernetes Go
# module pinned in e2e/cluster/gobuild/go.mod, into a cache outside the repo keyed by version and by the
# go.sum's hash, so a second run costs nothing. Prints the bin directory on its last line.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
mod="$here/gobuild"
version="$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" {print $3}' "$mod/go.mod")"
key="$(cat "$mod/go.mod" "$mod/go.sum" | sha256sum | cut -c1-12)"
cache="${KUBERPC_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kuberpc}"
out="$cache/k8s/$version-$key/bin"
cmds=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
missing=()
for c in "${cmds[@]}"; do [[ -x "$out/$c" ]] || missing+=("$c"); done
if ((${#missing[@]})); then
	mkdir -p "$out"
	echo "building ${missing[*]} $version into $out (about 15 minutes cold on 2 cores)" >&2
	start=$SECONDS
	cd "$mod"
	for c in "${missing[@]}"; do
		# -mod=mod: the wrapper keeps no vendor tree; go.sum pins every module's hash.
		CGO_ENABLED=0 GOFLAGS=-mod=mod nice go build -trimpath -ldflags='-s -w' \
			-o "$out/$c.tmp" "k8s.io/kubernetes/cmd/$c"
		mv "$out/$c.tmp" "$out/$c"
	done
	echo "built in $((SECONDS - start)) s" >&2
fi
echo "$out"
