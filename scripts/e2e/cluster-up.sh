#!/usr/bin/env bash
# Brings up a single-node Kubernetes cluster from processes, no Docker, no registry:
#   etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy
#   (built from their Go modules by scripts/k8s-bins.sh --all), containerd + runc + CNI
#   bridge/host-local (Debian packages), CoreDNS (Go module, scripts/go-tool.sh) as a
#   process behind the kube-dns Service, a locally built pause image.
#
#   scripts/e2e/cluster-up.sh        bring it up (tears an old one down first)
#   scripts/e2e/cluster-down.sh      tear it down (also runs here when a step fails)
#
# Needs root. Everything is under $RUN (scripts/e2e/lib.sh); the node is a network
# namespace with a /30 link to the host and no route out. On success it writes
# $RUN/env (KUBECONFIG=..., NODE_IP=..., ...) for the journey test; on failure it
# copies every log to $ARTIFACTS and tears the cluster down (MESHPROXY_E2E_KEEP=1
# keeps it for debugging). Per-step durations go to $RUN/timings.txt.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

[ "$(id -u)" = 0 ] || { log "needs root (network namespaces, containerd, kubelet)"; exit 1; }

"$E2E_DIR/cluster-down.sh" --quiet
mkdir -p "$RUN"/{logs,pids,pki,etc,cni/net.d,cni/ipam,containerd,kubelet}
: >"$RUN/timings.txt"

on_exit() {
  local rc=$?
  if [ $rc -ne 0 ]; then
    log "cluster-up failed (exit $rc) in step: $(cat "$RUN/current-step" 2>/dev/null || echo '?'); logs -> $ARTIFACTS"
    "$E2E_DIR/collect-artifacts.sh" || true
    if [ "${MESHPROXY_E2E_KEEP:-0}" != 1 ]; then "$E2E_DIR/cluster-down.sh" || true; fi
  fi
}
trap on_exit EXIT

# ---- prerequisites (each a cached no-op once done) ---------------------------------
prereqs() {
  "$REPO/scripts/system-deps.sh" --k8s
  "$REPO/scripts/k8s-bins.sh" --all
  k8s_layout
  COREDNS=$("$REPO/scripts/go-tool.sh" coredns)
  "$REPO/scripts/base-image.sh"
}
step prerequisites prereqs

# ---- the node's network namespace ----------------------------------------------------
node_netns() {
  ip netns add "$NETNS"
  ip link add "$HOST_VETH" type veth peer name eth0 netns "$NETNS"
  ip addr add "$HOST_IP/30" dev "$HOST_VETH"
  ip link set "$HOST_VETH" up
  in_node ip link set lo up
  in_node ip addr add "$NODE_IP/30" dev eth0
  in_node ip link set eth0 up
  # The node's own connections to Service IPs (the API server calling the webhook)
  # need a route before kube-proxy's OUTPUT DNAT picks the endpoint. There is no
  # default route (and this kernel has no dummy devices), so route the Service range
  # onto the pod bridge, made here (the CNI bridge plugin adopts it): a Service IP
  # without endpoints then fails on the bridge instead of leaving the node.
  in_node ip link add cni0 type bridge
  in_node ip link set cni0 up
  in_node ip route add "$SERVICE_CIDR" dev cni0
  # Pod<->service traffic crosses the bridge; conntrack must see it for kube-proxy's
  # DNAT replies (per-namespace since Linux 5.3). Forwarding between pods and node.
  modprobe br_netfilter 2>/dev/null || true
  modprobe overlay 2>/dev/null || true
  in_node sysctl -qw net.bridge.bridge-nf-call-iptables=1 net.ipv4.ip_forward=1
  # Kubelet sets these node-wide kernel knobs at start (and refuses other values with
  # protectKernelDefaults); remember the host's values so cluster-down restores them.
  sysctl -n vm.overcommit_memory kernel.panic kernel.panic_on_oops | paste -sd' ' >"$RUN/etc/host-sysctls"
}
step node-netns node_netns

# ---- PKI (openssl): CA, API server serving cert, client certs, SA keys ---------------
PKI=$RUN/pki
mkcert() { # NAME CN ORG(or -) EKU SAN(or -)
  local name=$1 cn=$2 org=$3 eku=$4 san=$5 subj="/CN=$2"
  [ "$org" != - ] && subj="/O=$org/CN=$cn"
  openssl ecparam -name prime256v1 -genkey -noout 2>/dev/null | openssl pkcs8 -topk8 -nocrypt -out "$PKI/$name.key"
  openssl req -new -key "$PKI/$name.key" -subj "$subj" -out "$PKI/$name.csr" 2>/dev/null
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$eku"
    [ "$san" != - ] && echo "subjectAltName=$san"
  } >"$PKI/$name.ext"
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -days 2 -extfile "$PKI/$name.ext" -out "$PKI/$name.crt" 2>/dev/null
}
kubeconfig() { # FILE CERTNAME
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster: {server: "https://$NODE_IP:6443", certificate-authority: "$PKI/ca.crt"}
users:
- name: $2
  user: {client-certificate: "$PKI/$2.crt", client-key: "$PKI/$2.key"}
contexts:
- name: e2e
  context: {cluster: e2e, user: $2}
current-context: e2e
EOF
}
pki() {
  openssl ecparam -name prime256v1 -genkey -noout 2>/dev/null | openssl pkcs8 -topk8 -nocrypt -out "$PKI/ca.key"
  openssl req -x509 -new -key "$PKI/ca.key" -subj "/CN=meshproxy-e2e-ca" -days 2 -out "$PKI/ca.crt" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature"
  mkcert apiserver kube-apiserver - serverAuth \
    "DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost,IP:$NODE_IP,IP:$APISERVER_SVC_IP,IP:127.0.0.1"
  mkcert admin admin system:masters clientAuth -
  mkcert apiserver-kubelet-client kube-apiserver-kubelet-client system:masters clientAuth -
  mkcert kubelet "system:node:$NODE_NAME" system:nodes clientAuth -
  mkcert kubelet-serving "system:node:$NODE_NAME" system:nodes serverAuth "DNS:$NODE_NAME,IP:$NODE_IP"
  mkcert controller-manager system:kube-controller-manager - clientAuth -
  mkcert scheduler system:kube-scheduler - clientAuth -
  mkcert kube-proxy system:kube-proxy - clientAuth -
  openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
  openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  for u in admin kubelet controller-manager scheduler kube-proxy; do kubeconfig "$PKI/$u.kubeconfig" "$u"; done
}
step pki pki

# ---- control plane ---------------------------------------------------------------------
start_etcd() {
  spawn etcd "$K8S_BIN/etcd" --name=e2e --data-dir="$RUN/etcd" \
    --listen-client-urls=http://127.0.0.1:2379 --advertise-client-urls=http://127.0.0.1:2379 \
    --listen-peer-urls=http://127.0.0.1:2380 --initial-advertise-peer-urls=http://127.0.0.1:2380 \
    --initial-cluster=e2e=http://127.0.0.1:2380 --unsafe-no-fsync --log-level=warn
  wait_until 60 "etcd health" in_node curl -sf http://127.0.0.1:2379/health
}
step etcd start_etcd

start_apiserver() {
  spawn kube-apiserver "$K8S_BIN/kube-apiserver" \
    --etcd-servers=http://127.0.0.1:2379 --bind-address=0.0.0.0 --advertise-address="$NODE_IP" \
    --secure-port=6443 --cert-dir="$RUN/apiserver-certs" \
    --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
    --client-ca-file="$PKI/ca.crt" \
    --kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" \
    --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority="$PKI/ca.crt" --kubelet-preferred-address-types=InternalIP \
    --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --api-audiences=https://kubernetes.default.svc.cluster.local \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --authorization-mode=Node,RBAC \
    --enable-admission-plugins=NamespaceLifecycle,LimitRanger,ServiceAccount,NodeRestriction,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ResourceQuota \
    --allow-privileged=true --profiling=false --v=1
  wait_until 120 "kube-apiserver /readyz" kc get --raw /readyz
}
step kube-apiserver start_apiserver

start_controllers() {
  spawn kube-controller-manager "$K8S_BIN/kube-controller-manager" \
    --kubeconfig="$PKI/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$PKI/controller-manager.kubeconfig" \
    --authorization-kubeconfig="$PKI/controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 --leader-elect=false --use-service-account-credentials=true \
    --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
    --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
    --service-cluster-ip-range="$SERVICE_CIDR" --allocate-node-cidrs=false \
    --controllers='*,-nodeipam' --profiling=false --v=1
  spawn kube-scheduler "$K8S_BIN/kube-scheduler" \
    --kubeconfig="$PKI/scheduler.kubeconfig" \
    --authentication-kubeconfig="$PKI/scheduler.kubeconfig" \
    --authorization-kubeconfig="$PKI/scheduler.kubeconfig" \
    --bind-address=127.0.0.1 --leader-elect=false --profiling=false --v=1
  # The default ServiceAccount appears once the controller manager's token
  # controllers run: pods can't be created before.
  wait_until 90 "default ServiceAccount" kc -n default get serviceaccount default
  wait_until 60 "kube-root-ca.crt ConfigMap" kc -n default get configmap kube-root-ca.crt
}
step controller-manager+scheduler start_controllers

# ---- containerd + images ---------------------------------------------------------------
start_containerd() {
  cat >"$RUN/etc/containerd.toml" <<EOF
version = 2
root = "$RUN/containerd/root"
state = "$RUN/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$CONTAINERD_SOCK"
[ttrpc]
  address = "$CONTAINERD_SOCK.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$RUN/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  stream_server_address = "127.0.0.1"
  # Pod network namespaces under our state dir, not /var/run/netns (cleanup knows them).
  netns_mounts_under_state_dir = true
  enable_unprivileged_ports = true
  # This machine's root has no CAP_SYS_RESOURCE (see docs/e2e.md), so lowering a
  # process's oom_score_adj below its parent's (the sandbox's -998, Guaranteed pods'
  # -997) is refused and runc init dies. Clamp to containerd's own score instead.
  restrict_oom_score_adj = true
  enable_unprivileged_icmp = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        Root = "$RUN/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$RUN/cni/net.d"
EOF
  spawn containerd /usr/bin/containerd --config "$RUN/etc/containerd.toml" --log-level warn
  wait_until 60 "containerd socket" ctr --address "$CONTAINERD_SOCK" version
}
step containerd start_containerd

images() { "$E2E_DIR/images.sh" pause base; }
step images images

# ---- CNI + kubelet -------------------------------------------------------------------------
start_kubelet() {
  cat >"$RUN/cni/net.d/10-mpe2e.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "mpe2e",
  "plugins": [{
    "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
    "ipam": {
      "type": "host-local", "dataDir": "$RUN/cni/ipam",
      "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$POD_GW"}]],
      "routes": [{"dst": "$ROUTED_CIDR"}]
    }
  }]
}
EOF
  # Pods resolve through the cluster DNS only; the host's resolver is out of reach.
  printf 'nameserver %s\n' "$DNS_SVC_IP" >"$RUN/etc/resolv.conf"
  cat >"$RUN/etc/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: "$PKI/ca.crt"}
authorization: {mode: Webhook}
tlsCertFile: "$PKI/kubelet-serving.crt"
tlsPrivateKeyFile: "$PKI/kubelet-serving.key"
containerRuntimeEndpoint: "unix://$CONTAINERD_SOCK"
cgroupDriver: cgroupfs
cgroupRoot: "$CGROUP_ROOT"
cgroupsPerQOS: true
failCgroupV1: false
failSwapOn: false
clusterDNS: ["$DNS_SVC_IP"]
clusterDomain: cluster.local
resolvConf: "$RUN/etc/resolv.conf"
serializeImagePulls: false
maxPods: 60
# A shared CI disk: never evict for disk pressure, never GC the imported images.
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
registerWithTaints: []
shutdownGracePeriod: 0s
EOF
  # kubelet wants its cgroupRoot to exist in every hierarchy; a new cpuset cgroup
  # starts with no CPUs or memory nodes, so it inherits the root's.
  local d
  for d in /sys/fs/cgroup/*/; do
    case $d in */unified/) continue ;; esac
    mkdir -p "$d${CGROUP_ROOT#/}"
  done
  cat /sys/fs/cgroup/cpuset/cpuset.cpus >"/sys/fs/cgroup/cpuset$CGROUP_ROOT/cpuset.cpus"
  cat /sys/fs/cgroup/cpuset/cpuset.mems >"/sys/fs/cgroup/cpuset$CGROUP_ROOT/cpuset.mems"
  spawn kubelet "$K8S_BIN/kubelet" --config="$RUN/etc/kubelet.yaml" \
    --kubeconfig="$PKI/kubelet.kubeconfig" --root-dir="$RUN/kubelet" \
    --hostname-override="$NODE_NAME" --node-ip="$NODE_IP" --v=1
  wait_until 120 "node $NODE_NAME Ready" \
    kc wait --for=condition=Ready "node/$NODE_NAME" --timeout=2s
}
step kubelet start_kubelet

has_service_rule() { in_node iptables -t nat -S KUBE-SERVICES | grep -q -- "-d $1/32"; }
start_kube_proxy() {
  cat >"$RUN/etc/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection: {kubeconfig: "$PKI/kube-proxy.kubeconfig"}
hostnameOverride: $NODE_NAME
clusterCIDR: $POD_CIDR
bindAddress: $NODE_IP
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
nodePortAddresses: ["$NODE_IP/32"]
# nf_conntrack_max is node-wide (host namespace only): leave it alone.
conntrack: {maxPerCore: 0, min: 0}
EOF
  spawn kube-proxy "$K8S_BIN/kube-proxy" --config="$RUN/etc/kube-proxy.yaml" --v=1
  wait_until 60 "kube-proxy healthz" in_node curl -sf http://127.0.0.1:10256/healthz
  wait_until 60 "kube-proxy rules for the kubernetes Service" has_service_rule "$APISERVER_SVC_IP"
}
step kube-proxy start_kube_proxy

# ---- cluster DNS: CoreDNS as a node process behind the kube-dns Service ----------------
start_coredns() {
  cat >"$RUN/etc/Corefile" <<EOF
.:53 {
    bind $NODE_IP
    errors
    health 127.0.0.1:8081
    ready 127.0.0.1:8181
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $PKI/admin.kubeconfig e2e
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }
    cache 30
}
EOF
  spawn coredns "$COREDNS" -conf "$RUN/etc/Corefile"
  wait_until 60 "CoreDNS ready" in_node curl -sf http://127.0.0.1:8181/ready
  kc apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels: {k8s-app: kube-dns}
spec:
  clusterIP: $DNS_SVC_IP
  ports:
  - {name: dns, port: 53, protocol: UDP, targetPort: 53}
  - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 53}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kube-dns-node
  namespace: kube-system
  labels: {kubernetes.io/service-name: kube-dns, endpointslice.kubernetes.io/managed-by: meshproxy-e2e}
addressType: IPv4
endpoints:
- addresses: ["$NODE_IP"]
  conditions: {ready: true}
ports:
- {name: dns, port: 53, protocol: UDP}
- {name: dns-tcp, port: 53, protocol: TCP}
EOF
}
step coredns start_coredns

cat >"$RUN/env" <<EOF
KUBECONFIG=$KUBECONFIG_ADMIN
KUBECTL=$KUBECTL
HELM=$HELM
NODE_IP=$NODE_IP
NODE_NAME=$NODE_NAME
NETNS=$NETNS
POD_CIDR=$POD_CIDR
SERVICE_CIDR=$SERVICE_CIDR
CONTAINERD_SOCK=$CONTAINERD_SOCK
GATEWAY_API_CRDS=$GATEWAY_API_CRDS
E2E_RUN=$RUN
EOF
log "cluster up in ${SECONDS}s: KUBECONFIG=$KUBECONFIG_ADMIN"
cat "$RUN/timings.txt" >&2
