{{/* Base name of every object. */}}
{{- define "meshproxy.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "meshproxy.controlplane" -}}
{{- printf "%s-controlplane" (include "meshproxy.fullname" .) -}}
{{- end -}}

{{- define "meshproxy.labels" -}}
app.kubernetes.io/name: {{ default .Chart.Name .Values.nameOverride }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: meshproxy
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "meshproxy.selectorLabels" -}}
app.kubernetes.io/name: {{ default .Chart.Name .Values.nameOverride }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controlplane
{{- end -}}

{{- define "meshproxy.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "meshproxy.sidecarImage" -}}
{{- $repo := default .Values.image.repository .Values.sidecar.image.repository -}}
{{- $tag := default (default .Chart.AppVersion .Values.image.tag) .Values.sidecar.image.tag -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}

{{/* OTLP/gRPC endpoint: only the explicit one (the bundled Jaeger is reached over OTLP/HTTP). */}}
{{- define "meshproxy.otlpGrpcEndpoint" -}}
{{- .Values.tracing.otlpGrpcEndpoint -}}
{{- end -}}

{{/* OTLP/HTTP endpoint: the explicit one, else the bundled Jaeger's when it is enabled and no
endpoint of any kind is set. HTTP, not gRPC, because a sidecar sends it for a fraction of the
CPU (docs/telemetry.md). */}}
{{- define "meshproxy.otlpHttpEndpoint" -}}
{{- if .Values.tracing.otlpHttpEndpoint -}}
{{- .Values.tracing.otlpHttpEndpoint -}}
{{- else if and .Values.jaeger.enabled (not .Values.tracing.otlpGrpcEndpoint) (not .Values.tracing.zipkinEndpoint) -}}
{{- printf "http://%s-jaeger.%s.svc:4318/v1/traces" (include "meshproxy.fullname" .) .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/* The injection template (JSON), read by controlplane.inject.InjectionTemplate.from_json. */}}
{{- define "meshproxy.injectionTemplate" -}}
{{- $cp := include "meshproxy.controlplane" . -}}
{{- dict
  "image" (include "meshproxy.sidecarImage" .)
  "imagePullPolicy" .Values.image.pullPolicy
  "proxyUID" (int .Values.sidecar.proxyUID)
  "logLevel" .Values.sidecar.logLevel
  "controlPlaneAddress" (printf "%s.%s.svc:15010" $cp .Release.Namespace)
  "meshNamespace" .Release.Namespace
  "nativeSidecar" .Values.sidecar.nativeSidecar
  "ports" (dict "admin" (int .Values.sidecar.ports.admin) "outbound" (int .Values.sidecar.ports.outbound) "inbound" (int .Values.sidecar.ports.inbound))
  "resources" .Values.sidecar.resources
  "initResources" .Values.sidecar.initResources
  "tracing" (dict "sampling" .Values.tracing.sampling "otlpGrpcEndpoint" (include "meshproxy.otlpGrpcEndpoint" .) "otlpHttpEndpoint" (include "meshproxy.otlpHttpEndpoint" .) "zipkinEndpoint" .Values.tracing.zipkinEndpoint)
  "prometheusAnnotations" .Values.sidecar.prometheusAnnotations
  "rewriteProbes" .Values.sidecar.rewriteProbes
  "excludeOutboundCIDRs" .Values.sidecar.excludeOutboundCIDRs
  "extraEnv" (default (list) .Values.sidecar.extraEnv)
  | toPrettyJson -}}
{{- end -}}
