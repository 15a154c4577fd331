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
app.kubernetes.io/name: {{ .Chart.Name | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
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

{{/* Labels that select the operator's pod. */}}
{{- define "imagebuild-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
{{- end -}}

{{/* The ServiceAccount the operator runs as. */}}
{{- define "imagebuild-operator.serviceAccountName" -}}
{{- default (include "imagebuild-operator.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{/*
The RBAC rules of the operator, each with why it needs it. Used by the ClusterRole
(all namespaces) or by a Role in each watched namespace.
*/}}
{{- define "imagebuild-operator.rules" -}}
# Runs: watched (list, watch) and read; their status is the operator's to write.
- apiGroups: [imagebuild.dev]
  resources: [imagebuildruns]
  verbs: [get, list, watch]
- apiGroups: [imagebuild.dev]
  resources: [imagebuildruns/status]
  verbs: [patch]
# Build Jobs: created per image, watched for results, deleted once recorded or when
# their run goes.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [list, watch, create, delete]
# Build pods: watched, for where a build ran, why it is pending, and its exit report;
# the pod of a failed build is patched to outlive its Job, for its log.
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch, patch]
# ConfigMaps: the manifest shards the runs own (created, replaced, deleted with stale
# shards), each run's wrapper script for its build pods (created), and instance lists a
# run names in spec.instances.configMap (read).
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, create, update, delete]
# Events on runs: created, and patched when kube-runtime's recorder folds repeats.
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- if .Values.rbac.readPushSecrets }}
# Secrets: read (get only, never list) the spec.registry.pushSecretRef a run names, to
# check the registry with its credentials; only those named in rbac.pushSecretNames if
# it is set.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
  {{- with .Values.rbac.pushSecretNames }}
  resourceNames: {{ toJson . }}
  {{- end }}
{{- end }}
{{- end -}}
