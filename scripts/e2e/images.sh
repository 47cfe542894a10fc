#!/usr/bin/env bash
# Builds (once, cached as OCI archives in $CACHE/images) and imports into the e2e
# cluster's containerd the images the journey needs. No registry is involved:
#   pause   localhost/meshproxy-pause:e2e  the sandbox image, from scripts/e2e/pause (Go, static)
#   base    localhost/meshproxy-base:bookworm  scripts/base-image.sh (debootstrap + python3)
#   mesh    localhost/meshproxy:<chart appVersion>  scripts/build-images.sh (helper "helm")
#
#   scripts/e2e/images.sh pause base [mesh]
set -euo pipefail
source "$(dirname "$0")/lib.sh"
IMAGES=$CACHE/images
mkdir -p "$IMAGES"

import() { # ARCHIVE: import into the CRI namespace (unpacked for overlayfs)
  ctr --address "$CONTAINERD_SOCK" -n k8s.io images import --no-unpack=false "$1" >&2
}

pause() {
  local src=$E2E_DIR/pause
  local sum; sum=$(cat "$src/main.go" "$src/go.mod" | sha256sum | cut -c1-12)
  local archive=$IMAGES/meshproxy-pause-$sum.oci.tar
  if [ ! -f "$archive" ]; then
    log "building the pause image ($sum)"
    local tmp; tmp=$(mktemp -d)
    (cd "$src" && CGO_ENABLED=0 GOTOOLCHAIN=local GOCACHE="$CACHE/go/build" GOFLAGS=-mod=mod \
      go build -trimpath -ldflags "-s -w" -o "$tmp/pause" .)
    local c; c=$(buildah from scratch)
    buildah copy -q "$c" "$tmp/pause" /pause >/dev/null
    buildah config --entrypoint '["/pause"]' --user 65535:65535 "$c"
    buildah commit -q --rm "$c" "$PAUSE_IMAGE" >/dev/null
    buildah push -q "$PAUSE_IMAGE" "oci-archive:$archive.part:$PAUSE_IMAGE" >/dev/null
    mv "$archive.part" "$archive"; rm -rf "$tmp"
  fi
  import "$archive"
}

base() {
  "$REPO/scripts/base-image.sh" >&2
  import "$IMAGES/meshproxy-base-bookworm.oci.tar"
}

mesh() {
  local script=$REPO/scripts/build-images.sh
  [ -x "$script" ] || { log "scripts/build-images.sh (helper \"helm\") is not there yet"; return 1; }
  "$script" >&2
  local a
  local version
  version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO/pyproject.toml" | head -1)
  import "$IMAGES/meshproxy-$version.oci.tar"
}

for what in "$@"; do "$what"; done
