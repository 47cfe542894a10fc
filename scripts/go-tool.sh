#!/usr/bin/env bash
# Builds one pinned Go program from its module into the cache (outside the repo)
# and prints the binary's path. Reuses the binary when it is already there.
#   scripts/go-tool.sh fortio      -> $CACHE/go/bin/fortio-<version>
# Pinned versions live here, in one table.
set -euo pipefail
CACHE=${MESHPROXY_CACHE:-$HOME/.cache/meshproxy}
declare -A PKG=(
  [fortio]="fortio.org/fortio@v1.66.5"
  [jaeger]="github.com/jaegertracing/jaeger/cmd/jaeger@v1.76.0"
  [prometheus]="github.com/prometheus/prometheus/cmd/prometheus@v0.316.0"  # e2e: scrapes the sidecars
  [coredns]="github.com/coredns/coredns@v1.14.7"  # e2e: cluster DNS
  [traefik]="github.com/traefik/traefik/v3/cmd/traefik@v3.7.13"  # make bench-peers; built by bench/traefik/build.sh
)
# Tools whose go.mod has replace directives (go install refuses them): built by a script instead.
declare -A BUILDER=(
  [traefik]="bench/traefik/build.sh"
)
name=${1:?usage: go-tool.sh NAME}
spec=${PKG[$name]:?unknown tool $name}
version=${spec##*@}
out="$CACHE/go/bin/$name-$version"
if [ ! -x "$out" ]; then
  mkdir -p "$CACHE/go/bin" "$CACHE/go/mod" "$CACHE/go/build"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "go-tool: building $spec (cached in $out)" >&2
  if [ -n "${BUILDER[$name]:-}" ]; then
    MESHPROXY_CACHE="$CACHE" "$(dirname "$0")/../${BUILDER[$name]}" "$spec" "$tmp/$(basename "${spec%@*}")" >&2
  else
    GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build" GOBIN="$tmp" GOFLAGS=-mod=mod CGO_ENABLED=0 \
      go install "$spec" >&2
  fi
  mv "$tmp/$(basename "${spec%@*}")" "$out"
fi
echo "$out"
