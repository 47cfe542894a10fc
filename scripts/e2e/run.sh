#!/usr/bin/env bash
# `make e2e`: bring the single-node cluster up, run the journey test (tests/e2e,
# marker e2e) against it, and always tear it down. When anything fails, every log
# (components, pods, the test's own report) is left in $ARTIFACTS (.artifacts/e2e).
#
#   scripts/e2e/run.sh [pytest args...]
#   MESHPROXY_E2E_KEEP=1 scripts/e2e/run.sh    keep the cluster afterwards (debugging;
#                                              scripts/e2e/cluster-down.sh removes it)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
rm -rf "$ARTIFACTS"; mkdir -p "$ARTIFACTS"
t0=$SECONDS

finish() {
  local rc=$?
  [ -f "$RUN/timings.txt" ] && cp "$RUN/timings.txt" "$ARTIFACTS/" 2>/dev/null
  if [ $rc -ne 0 ]; then
    [ -f "$RUN/current-step" ] && log "failed in step: $(cat "$RUN/current-step")"
    "$E2E_DIR/collect-artifacts.sh" || true
  fi
  if [ "${MESHPROXY_E2E_KEEP:-0}" = 1 ]; then
    log "cluster kept (MESHPROXY_E2E_KEEP=1): KUBECONFIG=$KUBECONFIG_ADMIN"
  else
    "$E2E_DIR/cluster-down.sh" || rc=1
  fi
  log "e2e finished in $((SECONDS - t0))s (exit $rc)"
  exit $rc
}
trap finish EXIT

MESHPROXY_E2E_KEEP=1 "$E2E_DIR/cluster-up.sh"   # teardown is ours (finish), after the test
# What `make kind-up` does for a kind user: build the mesh image from this tree and
# load it into the node; then the backends the journey checks (next to the cluster).
step mesh-image "$E2E_DIR/images.sh" mesh
"$E2E_DIR/addons.sh" jaeger prometheus
# The journey must run, not skip: a missing cluster is a failure here.
MESHPROXY_E2E_REQUIRED=1 MESHPROXY_E2E_ENV="$RUN/env" \
  "$REPO/.venv/bin/pytest" -m e2e "$REPO/tests/e2e" -p no:cacheprovider -rA --durations=0 \
  --junitxml="$ARTIFACTS/junit.xml" "$@" 2>&1 | tee "$ARTIFACTS/pytest.log"
