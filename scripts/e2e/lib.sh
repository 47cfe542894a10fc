# shellcheck shell=bash
# Shared settings of the e2e cluster scripts (sourced, never run).
#
# The whole node lives in one network namespace ($NETNS) joined to the host by one
# veth pair, so nothing the cluster does (kube-proxy's iptables rules, the CNI
# bridge, routes, per-namespace sysctls) touches the host's network, and the node
# has no route out of the machine: only the /30 to the host.
#
# Every file is under $RUN; every process has a pid file in $RUN/pids and a log in
# $RUN/logs. cluster-down.sh undoes exactly what is recorded there.

E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$E2E_DIR/../.." && pwd)
CACHE=${MESHPROXY_CACHE:-$HOME/.cache/meshproxy}
export MESHPROXY_CACHE=$CACHE
RUN=${MESHPROXY_E2E_RUN:-/var/lib/meshproxy-e2e}
ARTIFACTS=${MESHPROXY_E2E_ARTIFACTS:-$REPO/.artifacts/e2e}

# Addresses: all inside 198.18.0.0/15 (RFC 2544 benchmarking range), away from the
# 198.18.0-4.x / 198.19.0-2.x addresses the netns lab tests use.
NETNS=mpe2e                      # the node's network namespace
HOST_VETH=mpe2e-host             # host end of the node link
HOST_IP=198.18.200.1             # host end (/30)
NODE_IP=198.18.200.2             # node address: API server, kubelet, Jaeger, Prometheus
POD_CIDR=198.18.64.0/18          # CNI bridge + host-local
POD_GW=198.18.64.1               # cni0 in the node namespace
ROUTED_CIDR=198.18.0.0/15        # the only route a pod gets (no default route)
SERVICE_CIDR=198.19.128.0/17
APISERVER_SVC_IP=198.19.128.1
DNS_SVC_IP=198.19.128.10
NODE_NAME=mpe2e-node
CGROUP_ROOT=/mpe2e               # kubelet's cgroupRoot: pods live under it, cleanup kills it
PAUSE_IMAGE=localhost/meshproxy-pause:e2e
BASE_IMAGE=localhost/meshproxy-base:bookworm

KUBECONFIG_ADMIN=$RUN/pki/admin.kubeconfig
CONTAINERD_SOCK=$RUN/containerd/containerd.sock

k8s_layout() {
  # KEY=path lines from the k8s helper's script: K8S_BIN, TOOLS_BIN, GATEWAY_API_CRDS.
  eval "$("$REPO/scripts/k8s-bins.sh" --print)"
  KUBECTL=$TOOLS_BIN/kubectl
  HELM=$TOOLS_BIN/helm
}

log() { printf '%s e2e: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# step NAME CMD...: run a step and record how long it took in $RUN/timings.txt.
step() {
  local name=$1; shift
  local t0=$SECONDS
  log "$name ..."
  # Named in the failure report when "$@" fails (set -e ends the script right there).
  echo "$name" >"$RUN/current-step"
  "$@"
  rm -f "$RUN/current-step"
  local dt=$((SECONDS - t0))
  printf '%-28s %4ds\n' "$name" "$dt" >>"$RUN/timings.txt"
  log "$name done (${dt}s)"
}

in_node() { nsenter --net="/run/netns/$NETNS" -- "$@"; }

# spawn NAME CMD...: start a long-running process in the node's network namespace
# (network only: it shares the host's mount namespace, so kubelet's volume mounts
# are visible to containerd and runc), in its own session, pid recorded.
spawn() {
  local name=$1; shift
  mkdir -p "$RUN/logs" "$RUN/pids"
  setsid nsenter --net="/run/netns/$NETNS" -- "$@" >>"$RUN/logs/$name.log" 2>&1 </dev/null &
  # "pid program": cluster-down checks the program before it signals the pid.
  echo "$! $(basename "$1")" >"$RUN/pids/$name"
}

# pid_of NAME: the recorded pid if that process still runs the recorded program.
pid_of() {
  local f="$RUN/pids/$1" pid prog
  [ -f "$f" ] || return 1
  read -r pid prog <"$f"
  { tr '\0' '\n' <"/proc/$pid/cmdline"; } 2>/dev/null | head -1 | grep -q -- "$prog" || return 1
  echo "$pid"
}
alive() { pid_of "$1" >/dev/null; }

# wait_until SECONDS WHAT CMD...: poll CMD until it succeeds; fail with WHAT.
wait_until() {
  local limit=$1 what=$2; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then log "timed out after ${limit}s waiting for $what"; return 1; fi
    # A component that exited will not come back: fail now, with its last words.
    local f
    for f in "$RUN"/pids/*; do
      [ -e "$f" ] || continue
      if ! alive "$(basename "$f")"; then
        log "$(basename "$f") exited while waiting for $what; its log ends:"
        tail -n 15 "$RUN/logs/$(basename "$f").log" >&2
        return 1
      fi
    done
    sleep 0.5
  done
}

kc() { "$KUBECTL" --kubeconfig "$KUBECONFIG_ADMIN" "$@"; }
