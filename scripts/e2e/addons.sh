#!/usr/bin/env bash
# Starts the observability backends of the journey next to the cluster, as processes
# in the node's network namespace (reachable from pods and from the host at $NODE_IP):
#   jaeger      Jaeger v2 all-in-one (scripts/build-jaeger.sh), OTLP gRPC :4317, query :16686
#   prometheus  Prometheus (scripts/go-tool.sh prometheus) :9090, scraping every pod
#               annotated prometheus.io/scrape=true (the injected sidecars, the control plane)
# Both register in $RUN/pids, so cluster-down.sh stops them.
#
#   scripts/e2e/addons.sh jaeger prometheus
set -euo pipefail
source "$(dirname "$0")/lib.sh"
[ -f "$RUN/env" ] || { log "no cluster (run scripts/e2e/cluster-up.sh first)"; exit 1; }

jaeger() {
  local bin; bin=$("$REPO/scripts/build-jaeger.sh")
  # In-memory storage; listen on every address of the node namespace (not the host).
  JAEGER_LISTEN_HOST=0.0.0.0 spawn jaeger "$bin"
  wait_until 120 "Jaeger query API" curl -sf "http://$NODE_IP:16686/api/services"
}

prometheus() {
  local bin; bin=$("$REPO/scripts/go-tool.sh" prometheus)
  mkdir -p "$RUN/prometheus"
  cat >"$RUN/etc/prometheus.yml" <<EOF
global:
  scrape_interval: 2s      # the journey checks metrics within seconds of traffic
  evaluation_interval: 5s
scrape_configs:
- job_name: meshproxy
  kubernetes_sd_configs:
  - role: pod
    kubeconfig_file: $RUN/pki/admin.kubeconfig
  relabel_configs:
  - {source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_scrape], action: keep, regex: "true"}
  - {source_labels: [__meta_kubernetes_pod_phase], action: keep, regex: Running}
  - source_labels: [__meta_kubernetes_pod_ip, __meta_kubernetes_pod_annotation_prometheus_io_port]
    regex: (.+);(\\d+)
    target_label: __address__
    replacement: \$1:\$2
  - {source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_path], regex: (.+), target_label: __metrics_path__}
  - {source_labels: [__meta_kubernetes_namespace], target_label: namespace}
  - {source_labels: [__meta_kubernetes_pod_name], target_label: pod}
  - {source_labels: [__meta_kubernetes_pod_label_app], target_label: app}
  - {source_labels: [__meta_kubernetes_pod_label_version], target_label: version}
EOF
  spawn prometheus "$bin" --config.file="$RUN/etc/prometheus.yml" --storage.tsdb.path="$RUN/prometheus" \
    --web.listen-address=0.0.0.0:9090 --storage.tsdb.retention.time=2h
  wait_until 120 "Prometheus ready" curl -sf "http://$NODE_IP:9090/-/ready"
}

for what in "$@"; do step "$what" "$what"; done
