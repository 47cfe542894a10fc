#!/usr/bin/env bash
# Builds the meshproxy image with buildah (daemonless, no registry) from the working
# tree, on the locally made base images, and saves it as an OCI archive for
# `ctr -n k8s.io images import` (or any OCI tool):
#   localhost/meshproxy:<version>   + ${MESHPROXY_CACHE:-$HOME/.cache/meshproxy}/images/meshproxy-<version>.oci.tar
#
# The Dockerfile's build stage runs on the build image (scripts/base-image.sh --build:
# the base + gcc and Python headers), which compiles the data path with mypyc; the
# runtime stage runs on the base image, which has no compiler.
#
#   scripts/build-images.sh                   base + build images (if missing) + meshproxy image
#   BASE_IMAGE=some/python:3.11 scripts/build-images.sh   another runtime base
#   BUILD_IMAGE=some/python:3.11 scripts/build-images.sh  another build image (a C compiler
#                                                          and the runtime base's Python 3.x)
#
# The build context is the git working tree's tracked and untracked-but-not-ignored
# files (so .venv, caches and build output never enter it). Needs root and buildah.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${MESHPROXY_CACHE:-$HOME/.cache/meshproxy}
OUT="$CACHE/images"
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO/pyproject.toml" | head -1)
IMAGE=${MESHPROXY_IMAGE:-localhost/meshproxy:$VERSION}
BASE_IMAGE=${BASE_IMAGE:-localhost/meshproxy-base:bookworm}
BUILD_IMAGE=${BUILD_IMAGE:-localhost/meshproxy-build:bookworm}
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt

log() { echo "build-images: $*" >&2; }
[ "$(id -u)" = 0 ] || { log "needs root (buildah storage)"; exit 1; }
command -v buildah >/dev/null || { log "needs buildah (scripts/system-deps.sh --k8s)"; exit 1; }

if [ "$BASE_IMAGE" = localhost/meshproxy-base:bookworm ]; then
  "$REPO/scripts/base-image.sh"
fi
if [ "$BUILD_IMAGE" = localhost/meshproxy-build:bookworm ]; then
  "$REPO/scripts/base-image.sh" --build
fi

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} find {} -maxdepth 0 -type f -print0 2>/dev/null |
  tar --null -T - -cf -) | tar -x -C "$ctx"
# Generated protobuf modules are ignored by git; the wheel build regenerates them.

mkdir -p "$OUT"
log "building $IMAGE from $BASE_IMAGE (build stage: $BUILD_IMAGE)"
# --network host + the host's CA bundle: pip in the build stage reaches PyPI through
# whatever this machine is allowed to reach; nothing else is downloaded.
buildah bud --quiet --layers=false --network host \
  --volume "$CA_BUNDLE:$CA_BUNDLE:ro" \
  --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "BUILD_IMAGE=$BUILD_IMAGE" \
  -f "$REPO/deploy/docker/Dockerfile" -t "$IMAGE" "$ctx" >/dev/null
archive="$OUT/meshproxy-$VERSION.oci.tar"
rm -f "$archive"
buildah push -q "$IMAGE" "oci-archive:$archive:$IMAGE" >/dev/null
log "made $IMAGE ($archive)"
echo "$IMAGE"
