#!/usr/bin/env bash
# The README's kind walkthrough as commands (make kind-up, demo-traffic, traces, kind-down).
#
#   scripts/kind.sh up        create the kind cluster, build and load the image, install the
#                             Gateway API CRDs and the chart (demo values), deploy the demo
#   scripts/kind.sh traffic   200 requests from a meshed, throwaway pod in the demo namespace
#   scripts/kind.sh traces    port-forward Jaeger's UI and print the URL (Ctrl-C to stop)
#   scripts/kind.sh down      delete the kind cluster
#
# Needs kind and Docker (kind runs its node in a container). kubectl and helm: the pinned
# ones from `make k8s-bins` if present, else those on PATH. The image is built with
# buildah (`make images`, root) unless MESHPROXY_IMAGE_BUILDER=docker, which builds the
# same Dockerfile with `docker build` on a python:3.11 base with iptables.
# The same steps run in CI on a single-node cluster made of processes (make e2e,
# tests/e2e/test_journey.py), because CI has no Docker for kind.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${MESHPROXY_CACHE:-$HOME/.cache/meshproxy}
CLUSTER=${KIND_CLUSTER:-meshproxy}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO/pyproject.toml" | head -1)
IMAGE=localhost/meshproxy:$VERSION
ARCHIVE=$CACHE/images/meshproxy-$VERSION.oci.tar
MESH_NS=meshproxy-system
say() { printf '\n== %s\n' "$*"; }

tool() {  # the pinned binary if k8s-bins fetched it, else PATH
  if [ -x "$CACHE/tools/bin/$1" ]; then echo "$CACHE/tools/bin/$1"; else command -v "$1" || { echo "kind.sh: needs $1" >&2; exit 1; }; fi
}
KUBECTL=$(tool kubectl)
HELM=$(tool helm)

up() {
  command -v kind >/dev/null || { echo "kind.sh: needs kind (and Docker): https://kind.sigs.k8s.io" >&2; exit 1; }
  say "cluster $CLUSTER"
  kind get clusters 2>/dev/null | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --wait 120s
  "$KUBECTL" config use-context "kind-$CLUSTER" >/dev/null
  say "image $IMAGE"
  if [ "${MESHPROXY_IMAGE_BUILDER:-buildah}" = docker ]; then
    docker build -t "$IMAGE" -f "$REPO/deploy/docker/Dockerfile" "$REPO" \
      --build-arg BASE_IMAGE="${BASE_IMAGE:-python:3.11-slim-bookworm}" \
      --build-arg BUILD_IMAGE="${BUILD_IMAGE:-python:3.11-bookworm}"  # has gcc + headers: the compiled data path
    kind load docker-image "$IMAGE" --name "$CLUSTER"
  else
    [ -f "$ARCHIVE" ] || (cd "$REPO" && make images)
    kind load image-archive "$ARCHIVE" --name "$CLUSTER"
  fi
  say "Gateway API CRDs"
  (cd "$REPO" && make -s k8s-bins >/dev/null)
  crds=$("$REPO/scripts/k8s-bins.sh" --print | sed -n 's/^GATEWAY_API_CRDS=//p')
  "$KUBECTL" apply --server-side -f "$crds" >/dev/null
  say "helm install meshproxy"
  "$HELM" upgrade --install meshproxy "$REPO/deploy/helm/meshproxy" -n "$MESH_NS" --create-namespace \
    -f "$REPO/deploy/demo/k8s/values/meshproxy.yaml" --wait --timeout 5m
  say "demo (namespace demo is labelled meshproxy.io/inject=enabled)"
  "$KUBECTL" apply -f "$REPO/deploy/demo/k8s/00-namespace.yaml"
  # The webhook fails open, so pods created before the API server can reach it would start
  # without a sidecar: wait until a server-side dry run of a pod comes back injected.
  for _ in $(seq 60); do
    if "$KUBECTL" -n demo run injection-probe --image "$IMAGE" --restart Never --dry-run=server -o json \
        --command -- sleep 1 2>/dev/null | grep -q '"name": "meshproxy"'; then break; fi
    sleep 2
  done
  "$KUBECTL" apply -f "$REPO/deploy/demo/k8s/"
  "$KUBECTL" -n demo rollout status deployment --timeout 5m
  "$KUBECTL" -n demo get pods -o wide
  cat <<EOT

Next:  make demo-traffic     send requests through the mesh
       make traces           Jaeger UI at http://localhost:16686
       meshctl proxy-status  (after: $KUBECTL -n $MESH_NS port-forward svc/meshproxy-controlplane 15010)
EOT
}

traffic() {
  "$KUBECTL" -n demo delete pod demo-traffic --ignore-not-found >/dev/null
  "$KUBECTL" -n demo run demo-traffic --image "$IMAGE" --restart Never --rm -i --quiet \
    --overrides '{"spec":{"securityContext":{"runAsUser":1000,"runAsGroup":1000}}}' \
    --command -- python3 -m meshdemo.load -n "${REQUESTS:-200}" -c 4 http://frontend.demo:8080/
}

traces() {
  echo "Jaeger UI: http://localhost:16686  (service: frontend, catalog, inventory...; Ctrl-C stops)"
  "$KUBECTL" -n "$MESH_NS" port-forward svc/meshproxy-jaeger 16686:16686
}

down() { kind delete cluster --name "$CLUSTER"; }

case "${1:-}" in
  up|traffic|traces|down) "$1" ;;
  *) sed -n '2,9p' "$0"; exit 2 ;;
esac
