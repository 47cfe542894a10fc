#!/usr/bin/env bash
# Builds Traefik (the benchmark's peer proxy) from its Go module and writes the binary to $2.
#   bench/traefik/build.sh github.com/traefik/traefik/v3/cmd/traefik@v3.7.13 OUT
# Called by scripts/go-tool.sh (which caches the result). Why not plain `go install`:
#  - Traefik's go.mod has replace directives, so it is built from a wrapper module (go.mod.in);
#  - Traefik uses a fork of github.com/abbot/go-http-auth that the proxy does not serve: a copy of
#    the release v0.4.0 (./goauth) gets the two functions the fork adds (goauth/traefik_compat.go);
#  - a few ACME DNS providers of lego depend on SDK modules the module proxy does not serve;
#    a copy of lego (replace => ./lego; the module cache is read-only and untouched) has them
#    dropped from its provider table. ACME is not used by the benchmark (file provider, plain HTTP/TCP).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${MESHPROXY_CACHE:-$HOME/.cache/meshproxy}
spec=${1:?usage: build.sh PKG@VERSION OUT}
out=${2:?usage: build.sh PKG@VERSION OUT}
pkg=${spec%@*}
version=${spec##*@}
UNSERVED="alidns aliesa azion dnsimple edgedns edgeone huaweicloud oraclecloud regfish sakuracloud tencentcloud ucloud yandexcloud"
work="$CACHE/go/traefik-wrap-$version"
mkdir -p "$work/ext"
sed "s/@VERSION@/$version/" "$HERE/go.mod.in" > "$work/go.mod"
cp "$HERE/ext/go.mod" "$HERE/ext/ext.go" "$work/ext/"
printf '//go:build tools\n\npackage tools\n\nimport _ "%s"\n' "$pkg" > "$work/tools.go"
export GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build" GOFLAGS=-mod=mod CGO_ENABLED=0
cd "$work"
# The directory of a module of the build list, downloaded first: `go list -m` prints an empty
# Dir for a module not yet in the cache (a fresh machine).
module_dir() { go mod download -json "$1" | python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])'; }
lego=$(module_dir github.com/go-acme/lego/v5)
rm -rf "$work/lego"
cp -r "$lego" "$work/lego"
chmod -R u+w "$work/lego"
factory=providers/dns/zz_gen_dns_providers.go
python3 "$HERE/prune_lego.py" "$lego/$factory" "$work/lego/$factory" $UNSERVED
go mod edit -replace "github.com/go-acme/lego/v5=./lego"
goauth=$(module_dir github.com/abbot/go-http-auth)
rm -rf "$work/goauth"
cp -r "$goauth" "$work/goauth"
chmod -R u+w "$work/goauth"
rm -rf "$work/goauth/examples"  # package main programs, not needed
cp "$HERE/goauth/traefik_compat.go" "$work/goauth/"
printf 'module github.com/abbot/go-http-auth\n\ngo 1.20\n' > "$work/goauth/go.mod"
go mod edit -replace "github.com/abbot/go-http-auth=./goauth"
go build -trimpath -o "$out" "$pkg"
