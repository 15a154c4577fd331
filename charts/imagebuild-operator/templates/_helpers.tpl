{{/* The name of the chart's objects. */}}
{{- define "imagebuild-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels of every object of the chart. */}}
{{- define "imagebuild-operator.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/*
The labels and the runbook link of one alert: a dict with root (the chart's context),
alert (its values) and anchor (its section in docs/runbooks.md).
*/}}
{{- define "imagebuild-operator.alertLabels" -}}
for: {{ .alert.for }}
labels:
  severity: {{ .alert.severity }}
  {{- with .root.Values.alerts.labels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end -}}
