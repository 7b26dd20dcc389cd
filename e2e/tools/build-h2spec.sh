#!/usr/bin/env bash
# Builds the pinned h2spec (e2e/tools/h2spec/go.mod) into the kuberpc tool cache, once per version.
# Prints the binary's path. Needs Go and the Go module proxy; the tests call it when CI=true.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/h2spec" && pwd)"
version="$(awk '$1 == "require" && $2 == "github.com/summerwind/h2spec" {print $3}' "$here/go.mod")"
out="${KUBERPC_CACHE:-$HOME/.cache/kuberpc}/h2spec/${version}"
if [[ ! -x "$out/h2spec" ]]; then
	mkdir -p "$out"
	(cd "$here" && CGO_ENABLED=0 go build -trimpath -o "$out/h2spec.tmp" github.com/summerwind/h2spec/cmd/h2spec)
	mv "$out/h2spec.tmp" "$out/h2spec"
fi
echo "$out/h2spec"
