#!/usr/bin/env bash
# Tears down what scripts/e2e/cluster-up.sh made, and only that: the processes in
# $RUN/pids, the pods' processes (the kubelet's cgroup root $CGROUP_ROOT), the
# containerd shims serving our containerd socket, every mount under $RUN, the node's
# network namespace (which takes the CNI bridge, pod veths and kube-proxy's rules with
# it), the host end of the node link, and $RUN itself. Restores the node-wide sysctls
# kubelet changed. Idempotent and safe to run when nothing is up.
#
#   scripts/e2e/cluster-down.sh [--quiet]
set -uo pipefail
source "$(dirname "$0")/lib.sh"
QUIET=0; [ "${1:-}" = --quiet ] && QUIET=1
say() { [ $QUIET = 1 ] || log "$*"; }

[ "$(id -u)" = 0 ] || { log "needs root"; exit 1; }
[ -d "$RUN" ] || ip netns list 2>/dev/null | grep -qw "$NETNS" || { say "nothing to tear down"; exit 0; }
say "tearing down the e2e cluster in $RUN"

stop() { # NAME...: SIGTERM, wait up to 10 s, then SIGKILL
  local name pid
  local -a pids=()
  for name in "$@"; do pid=$(pid_of "$name") && { kill -TERM "$pid" 2>/dev/null; pids+=("$pid"); }; done
  for _ in $(seq 100); do
    local any=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && any=1; done
    [ $any = 0 ] && break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null; done
  return 0
}

# Everything the journey started next to the cluster (Jaeger, Prometheus, port
# forwards, the mesh's control plane as a process...) registers in $RUN/pids too.
extras=()
if [ -d "$RUN/pids" ]; then
  for f in "$RUN"/pids/*; do
    [ -e "$f" ] || continue
    n=$(basename "$f")
    case $n in etcd|kube-apiserver|kube-controller-manager|kube-scheduler|kubelet|kube-proxy|coredns|containerd) ;;
      *) extras+=("$n") ;;
    esac
  done
fi
# The kubelet first, so it restarts nothing while the pods go.
stop kubelet
[ ${#extras[@]} -gt 0 ] && stop "${extras[@]}"
stop kube-proxy coredns kube-scheduler kube-controller-manager

# Pods: kill every process in the kubelet's cgroup tree, then let containerd reap
# the tasks so the shims exit by themselves.
kill_cgroup_tree() {
  local sig=$1 d
  for d in /sys/fs/cgroup/*"$CGROUP_ROOT"; do
    [ -d "$d" ] || continue
    find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null | while read -r pid; do kill "-$sig" "$pid" 2>/dev/null; done
  done
}
kill_cgroup_tree KILL
if [ -S "$CONTAINERD_SOCK" ] && alive containerd; then
  c() { timeout 20 ctr --address "$CONTAINERD_SOCK" -n k8s.io "$@"; }
  for t in $(c tasks ls -q 2>/dev/null); do c tasks kill -a -s SIGKILL "$t" >/dev/null 2>&1; done
  for t in $(c tasks ls -q 2>/dev/null); do c tasks delete -f "$t" >/dev/null 2>&1; done
  for ct in $(c containers ls -q 2>/dev/null); do c containers delete "$ct" >/dev/null 2>&1; done
fi
stop containerd
# Shims left behind (containerd killed mid-way): ours name our socket on their command line.
for p in /proc/[0-9]*; do
  if { tr "\0" " " <"$p/cmdline"; } 2>/dev/null | grep -q -- "containerd-shim.*-address $CONTAINERD_SOCK"; then
    kill -KILL "${p#/proc/}" 2>/dev/null
  fi
done
kill_cgroup_tree KILL
stop kube-apiserver etcd

# Mounts under $RUN (overlay rootfs, volume tmpfs, pod netns, shm), deepest first.
for _ in 1 2 3; do
  mapfile -t mounts < <(awk -v run="$RUN/" 'index($5, run) == 1 { print $5 }' /proc/self/mountinfo | sort -r)
  [ ${#mounts[@]} -eq 0 ] && break
  for m in "${mounts[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null; done
done

# Cgroups the kubelet made (empty now), deepest first.
for d in /sys/fs/cgroup/*"$CGROUP_ROOT"; do
  [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null
done

ip netns del "$NETNS" 2>/dev/null
ip link del "$HOST_VETH" 2>/dev/null

if [ -f "$RUN/etc/host-sysctls" ]; then
  read -r oc panic oops <"$RUN/etc/host-sysctls"
  sysctl -qw vm.overcommit_memory="$oc" kernel.panic="$panic" kernel.panic_on_oops="$oops" || true
fi

if awk -v run="$RUN/" 'index($5, run) == 1 { found = 1 } END { exit !found }' /proc/self/mountinfo; then
  log "mounts remain under $RUN; leaving the directory in place"
  exit 1
fi
# --one-file-system: never follow into anything still mounted beneath.
rm -rf --one-file-system "$RUN"
say "torn down"
