#!/usr/bin/env bash
# Installs the Debian packages the tests, the demo and the benchmarks need.
# Idempotent: installs only what is missing. Needs root (apt-get).
set -euo pipefail
# gcc, libc6-dev, python3-dev: make compile builds the data path with mypyc (meshproxy/compiled.py).
want=(iptables iproute2 procps gcc libc6-dev python3-dev)
case "${1:-}" in
  --bench) want+=(nginx-light libnginx-mod-stream haproxy iperf3) ;;
  --k8s) want+=(etcd-server containerd runc containernetworking-plugins buildah debootstrap conntrack socat) ;;
  --all) want+=(nginx-light haproxy etcd-server containerd runc containernetworking-plugins buildah debootstrap conntrack socat) ;;
esac
missing=()
for p in "${want[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then echo "system-deps: need root to install: ${missing[*]}" >&2; exit 1; fi
  echo "system-deps: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
