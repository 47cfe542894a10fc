#!/usr/bin/env bash
# Makes the base image every meshproxy image builds FROM, without any registry:
# Debian bookworm (debootstrap --variant=minbase) + python3 + iptables, committed with
# buildah (daemonless) as localhost/meshproxy-base:bookworm and saved as an OCI archive
# in the cache, so a second run (or a fresh buildah storage) reuses it:
#   ${MESHPROXY_CACHE:-$HOME/.cache/meshproxy}/images/meshproxy-base-bookworm.oci.tar
#
# With --build it makes the build image instead: the same packages plus a C toolchain
# (gcc, libc6-dev, python3-dev), which the Dockerfile's build stage needs to compile the
# data path with mypyc. Only that stage uses it, so no compiler ends up in the runtime
# image. Same Debian suite and mirror, so the same python3 as the runtime base (the
# compiled extensions are built for that exact interpreter). Cached the same way:
#   localhost/meshproxy-build:bookworm  .../images/meshproxy-build-bookworm.oci.tar
#
#   scripts/base-image.sh            make it unless it is already there
#   scripts/base-image.sh --rebuild  make it again
#   scripts/base-image.sh --build [--rebuild]   the build image, likewise
#
# Needs root, buildah and debootstrap (scripts/system-deps.sh --k8s installs them).
# Packages come from the Debian mirror apt already uses (MESHPROXY_DEBIAN_MIRROR).
set -euo pipefail
CACHE=${MESHPROXY_CACHE:-$HOME/.cache/meshproxy}
OUT="$CACHE/images"
MIRROR=${MESHPROXY_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# python3-venv: the images install the project into a venv (ensurepip brings pip).
# iptables: `meshproxy iptables install` in the init container (nf_tables backend).
# ca-certificates: pip inside builds, OTLP/HTTPS exporters.
PACKAGES=python3,python3-venv,iptables,ca-certificates

log() { echo "base-image: $*" >&2; }
REBUILD=0 KIND=base
for arg in "$@"; do
  case $arg in
    --rebuild) REBUILD=1 ;;
    --build) KIND=build ;;
    *) log "unknown argument $arg (--build, --rebuild)"; exit 2 ;;
  esac
done
if [ "$KIND" = build ]; then
  # mypyc's C output needs a compiler (gcc), the C library headers (libc6-dev) and
  # Python.h for this python3 (python3-dev).
  PACKAGES=$PACKAGES,gcc,libc6-dev,python3-dev
fi
NAME=localhost/meshproxy-$KIND:bookworm
ARCHIVE="$OUT/meshproxy-$KIND-bookworm.oci.tar"
DLOG="$OUT/debootstrap.log"
[ "$KIND" = base ] || DLOG="$OUT/debootstrap-$KIND.log"
for tool in buildah debootstrap; do
  command -v "$tool" >/dev/null || { log "needs $tool (scripts/system-deps.sh --k8s)"; exit 1; }
done
[ "$(id -u)" = 0 ] || { log "needs root (debootstrap, buildah storage)"; exit 1; }

if [ "$REBUILD" = 0 ]; then
  if buildah inspect --type image "$NAME" >/dev/null 2>&1; then
    [ -f "$ARCHIVE" ] || buildah push -q "$NAME" "oci-archive:$ARCHIVE:$NAME" >/dev/null
    log "$NAME is there"; exit 0
  fi
  if [ -f "$ARCHIVE" ]; then
    # The archive carries the image's name, so pulling it restores $NAME.
    buildah pull -q "oci-archive:$ARCHIVE" >/dev/null
    if buildah inspect --type image "$NAME" >/dev/null 2>&1; then log "$NAME loaded from $ARCHIVE"; exit 0; fi
  fi
fi

mkdir -p "$OUT"
ctr=$(buildah from scratch)
cleanup() { buildah umount "$ctr" >/dev/null 2>&1 || true; buildah rm "$ctr" >/dev/null 2>&1 || true; }
trap cleanup EXIT
rootfs=$(buildah mount "$ctr")
log "debootstrap bookworm ($PACKAGES) from $MIRROR"
debootstrap --variant=minbase --include="$PACKAGES" bookworm "$rootfs" "$MIRROR" >"$DLOG" 2>&1 ||
  { tail -20 "$DLOG" >&2; exit 1; }
# Keep the image small and reproducible-ish: no package caches, lists or logs.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/tmp/*
buildah umount "$ctr" >/dev/null
buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
  --cmd '["/usr/bin/python3"]' --label org.opencontainers.image.title=meshproxy-$KIND "$ctr"
buildah commit -q --rm "$ctr" "$NAME" >/dev/null
trap - EXIT
rm -f "$ARCHIVE"
buildah push -q "$NAME" "oci-archive:$ARCHIVE:$NAME" >/dev/null
log "made $NAME ($(du -h "$ARCHIVE" | cut -f1), archive $ARCHIVE)"
