{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "stepfleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name, prefixed with the chart name unless it already contains it. */}}
{{- define "stepfleet.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "stepfleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "stepfleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "stepfleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "stepfleet.labels" -}}
helm.sh/chart: {{ include "stepfleet.chart" . }}
{{ include "stepfleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: stepfleet
{{- end }}

{{- define "stepfleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "stepfleet.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "stepfleet.image" -}}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-cpu" .Chart.AppVersion) .Values.image.tag) }}
{{- end }}

{{/* Namespaces the operator watches: none means every one (clusterWide), else the given ones,
else the release's own. Fails on clusterWide with namespaces (which would it be?). */}}
{{- define "stepfleet.watchNamespaces" -}}
{{- if .Values.operator.clusterWide }}
{{- if .Values.operator.watchNamespaces }}
{{- fail "operator.clusterWide watches every namespace: leave operator.watchNamespaces empty" }}
{{- end }}
{{- toJson list }}
{{- else if .Values.operator.watchNamespaces }}
{{- toJson .Values.operator.watchNamespaces }}
{{- else }}
{{- toJson (list .Release.Namespace) }}
{{- end }}
{{- end }}

{{/* `--metrics-from` values: the operator itself (its control loop scrapes worker pods), then
networkPolicy.metricsFrom, as NAMESPACE[:LABEL=VALUE,...]. A JSON list. */}}
{{- define "stepfleet.metricsFromFlags" -}}
{{- $self := printf "%s:app.kubernetes.io/name=%s,app.kubernetes.io/instance=%s,app.kubernetes.io/component=operator" .Release.Namespace (include "stepfleet.name" .) .Release.Name }}
{{- $out := list $self }}
{{- range .Values.networkPolicy.metricsFrom }}
{{- $pairs := list }}
{{- range $k, $v := .podLabels }}
{{- $pairs = append $pairs (printf "%s=%s" $k $v) }}
{{- end }}
{{- $out = append $out (ternary (printf "%s:%s" .namespace (join "," $pairs)) .namespace (gt (len $pairs) 0)) }}
{{- end }}
{{- toJson $out }}
{{- end }}
