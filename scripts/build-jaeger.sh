#!/usr/bin/env bash
# Builds Jaeger v2 (the all-in-one `jaeger` binary) from its Go module at a pinned version into
# the cache outside the repo, and prints the binary's path. Reuses the binary when it is there.
# Used by the real-Jaeger trace tests (tests/integration/test_telemetry_jaeger.py; `make test`
# builds it first) and by make e2e's Jaeger (scripts/e2e/addons.sh).
#
# Jaeger's go.mod has a replace directive, so `go install module/cmd@version` refuses it; a
# throw-away wrapper module requires Jaeger at the pinned version, repeats its replace, and
# builds cmd/jaeger. The build is large (the OpenTelemetry Collector and its components): it
# runs at the lowest CPU priority with one compile job at a time, so it never starves the
# other work on the machine.
set -euo pipefail
VERSION=v1.76.0  # Jaeger v2.13 (the Go module is tagged v1.x; cmd/jaeger is the v2 binary)
CACHE=${MESHPROXY_CACHE:-$HOME/.cache/meshproxy}
out="$CACHE/go/bin/jaeger-$VERSION"
if [ ! -x "$out" ]; then
  mkdir -p "$CACHE/go/bin" "$CACHE/go/mod" "$CACHE/go/build"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "build-jaeger: building github.com/jaegertracing/jaeger/cmd/jaeger@$VERSION (cached in $out)" >&2
  export GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build" GOFLAGS=-mod=mod CGO_ENABLED=0
  export GOMAXPROCS=${GOMAXPROCS:-1}
  cd "$tmp"
  cat > go.mod <<MOD
module meshproxy.local/jaegerbuild

go 1.24.6

replace github.com/Shopify/sarama => github.com/Shopify/sarama v1.33.0
MOD
  nice -n 19 go get "github.com/jaegertracing/jaeger/cmd/jaeger@$VERSION" >&2
  nice -n 19 go build -trimpath -o "$tmp/jaeger" github.com/jaegertracing/jaeger/cmd/jaeger >&2
  mv "$tmp/jaeger" "$out"
fi
echo "$out"
