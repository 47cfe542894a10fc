#!/usr/bin/env bash
# Copies what is needed to read a failed e2e run afterwards into $ARTIFACTS
# (.artifacts/e2e by default, gitignored): every component log, the timings, the
# generated configs, and, if the API server still answers, the cluster's objects,
# events and every container's log.
set -uo pipefail
source "$(dirname "$0")/lib.sh"
[ -d "$RUN" ] || exit 0
mkdir -p "$ARTIFACTS"
cp -r "$RUN/logs" "$RUN/etc" "$ARTIFACTS/" 2>/dev/null
cp "$RUN/timings.txt" "$ARTIFACTS/" 2>/dev/null
if [ -f "$KUBECONFIG_ADMIN" ] && k8s_layout 2>/dev/null && kc get --raw /readyz >/dev/null 2>&1; then
  kc get all,events,endpointslices,mutatingwebhookconfigurations,httproutes -A -o wide >"$ARTIFACTS/objects.txt" 2>&1
  kc describe pods -A >"$ARTIFACTS/pods-describe.txt" 2>&1
  mkdir -p "$ARTIFACTS/pods"
  kc get pods -A -o jsonpath='{range .items[*]}{.metadata.namespace} {.metadata.name}{"\n"}{end}' 2>/dev/null |
    while read -r ns pod; do
      kc -n "$ns" logs "$pod" --all-containers --prefix --timestamps >"$ARTIFACTS/pods/$ns.$pod.log" 2>&1
      kc -n "$ns" logs "$pod" --all-containers --prefix --previous >>"$ARTIFACTS/pods/$ns.$pod.log" 2>/dev/null
    done
fi
log "artifacts in $ARTIFACTS"
