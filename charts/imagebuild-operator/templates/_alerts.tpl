{{/*
The alert rule groups: the `spec` of the PrometheusRule, and the whole of the plain rule
file prometheus/alerts.yml. Thresholds and `for:` come from .Values.alerts.
Prometheus' own templates in annotations are written {{`{{ ... }}`}} so that Helm leaves
them alone.
*/}}
{{- define "imagebuild-operator.alertGroups" -}}
{{- $a := .Values.alerts -}}
{{- $runbook := $a.runbookUrl -}}
groups:
- name: imagebuild-operator.runs
  rules:
  {{- with $a.runStuck }}{{ if .enabled }}
  - alert: ImageBuildRunStuck
    expr: |
      (time() - imagebuild_run_last_progress_timestamp_seconds) > {{ .noProgressSeconds }}
      and on (namespace, run) (sum by (namespace, run) (imagebuild_run_images{state=~"pending|running"}) > 0)
      and on (namespace, run) (imagebuild_run_suspended == 0)
      and on (namespace, run) (imagebuild_run_status_phase{phase="Building"} == 1)
    {{- include "imagebuild-operator.alertLabels" (dict "root" $ "alert" .) | nindent 4 }}
    annotations:
      summary: Image build run {{`{{ $labels.namespace }}/{{ $labels.run }}`}} is stuck
      description: >-
        No image of run {{`{{ $labels.namespace }}/{{ $labels.run }}`}} has finished
        for {{`{{ $value | humanizeDuration }}`}}, while images remain to build
        {{- `{{ with printf "sum(imagebuild_run_images{namespace='%s',run='%s',state=~'pending|running'})" $labels.namespace $labels.run | query }} (`}}
        {{- `{{ . | first | value | printf "%.0f" }} pending or running){{ end }}`}} and the
        run is not suspended.
      runbook_url: {{ $runbook }}#imagebuildrunstuck
  {{- end }}{{ end }}
  {{- with $a.runMissesDeadline }}{{ if .enabled }}
  - alert: ImageBuildRunWillMissDeadline
    expr: |
      (imagebuild_run_estimated_completion_timestamp_seconds - imagebuild_run_deadline_timestamp_seconds) > {{ .marginSeconds }}
    {{- include "imagebuild-operator.alertLabels" (dict "root" $ "alert" .) | nindent 4 }}
    annotations:
      summary: Image build run {{`{{ $labels.namespace }}/{{ $labels.run }}`}} will miss its deadline
      description: >-
        Run {{`{{ $labels.namespace }}/{{ $labels.run }}`}} is projected to finish
        {{`{{ $value | humanizeDuration }}`}} after its deadline (timeouts.run); at the
        deadline its unbuilt images fail with RunDeadlineExceeded.
      runbook_url: {{ $runbook }}#imagebuildrunwillmissdeadline
  {{- end }}{{ end }}
  {{- with $a.slowBuilds }}{{ if .enabled }}
  - alert: ImageBuildRunSlowBuilds
    expr: |
      imagebuild_run_build_duration_median_seconds
        > on (phase) group_left ()
          ({{ .factor }} * histogram_quantile(0.5, sum by (phase, le) (rate(imagebuild_build_duration_seconds_bucket[{{ .baselineWindow }}]))))
      and on (namespace, run, phase) (imagebuild_run_images{state="succeeded"} >= {{ .minBuilds }})
    {{- include "imagebuild-operator.alertLabels" (dict "root" $ "alert" .) | nindent 4 }}
    annotations:
      summary: Image build run {{`{{ $labels.namespace }}/{{ $labels.run }}`}} builds its {{`{{ $labels.phase }}`}} images slowly
      description: >-
        The median {{`{{ $labels.phase }}`}} build of run
        {{`{{ $labels.namespace }}/{{ $labels.run }}`}} takes
        {{`{{ $value | humanizeDuration }}`}}, more than {{ .factor }} times the median of
        {{`{{ $labels.phase }}`}} builds over the last {{ .baselineWindow }}
        {{- `{{ with printf "histogram_quantile(0.5, sum by (le) (rate(imagebuild_build_duration_seconds_bucket{phase='%s'}[`}}{{ .baselineWindow }}{{`])))" $labels.phase | query }}`}}
        {{- ` ({{ . | first | value | humanizeDuration }}){{ end }}`}}.
      runbook_url: {{ $runbook }}#imagebuildrunslowbuilds
  {{- end }}{{ end }}
  {{- with $a.failureRatio }}{{ if .enabled }}
  - alert: ImageBuildRunHighFailureRatio
    expr: |
      (
        sum by (namespace, run) (increase(imagebuild_builds_total{result="failed"}[{{ .window }}]))
        / sum by (namespace, run) (increase(imagebuild_builds_total[{{ .window }}]))
      ) > {{ .ratio }}
      and on (namespace, run) (sum by (namespace, run) (increase(imagebuild_builds_total[{{ .window }}])) >= {{ .minBuilds }})
    {{- include "imagebuild-operator.alertLabels" (dict "root" $ "alert" .) | nindent 4 }}
    annotations:
      summary: Image build run {{`{{ $labels.namespace }}/{{ $labels.run }}`}} fails many builds
      description: >-
        {{`{{ $value | humanizePercentage }}`}} of the builds run
        {{`{{ $labels.namespace }}/{{ $labels.run }}`}} finished in the last
        {{ .window }} failed for good.
      runbook_url: {{ $runbook }}#imagebuildrunhighfailureratio
  {{- end }}{{ end }}
  {{- with $a.retryStorm }}{{ if .enabled }}
  - alert: ImageBuildRunRetryStorm
    expr: |
      sum by (namespace, run) (increase(imagebuild_retries_total[{{ .window }}])) >= {{ .minRetries }}
      and on (namespace, run) (
        sum by (namespace, run) (increase(imagebuild_retries_total[{{ .window }}]))
        / sum by (namespace, run) (increase(imagebuild_builds_total[{{ .window }}])) > {{ .ratio }}
      )
    {{- include "imagebuild-operator.alertLabels" (dict "root" $ "alert" .) | nindent 4 }}
    annotations:
      summary: Image build run {{`{{ $labels.namespace }}/{{ $labels.run }}`}} retries builds in a storm
      description: >-
        Run {{`{{ $labels.namespace }}/{{ $labels.run }}`}} retried
        {{`{{ $value | printf "%.0f" }}`}} builds in the last {{ .window }}, more than
        {{ .ratio }} retries per finished build.
      runbook_url: {{ $runbook }}#imagebuildrunretrystorm
  {{- end }}{{ end }}
  {{- with $a.podsUnschedulable }}{{ if .enabled }}
  - alert: ImageBuildRunPodsUnschedulable
    expr: |
      imagebuild_run_pods_unschedulable > 0
    {{- include "imagebuild-operator.alertLabels" (dict "root" $ "alert" .) | nindent 4 }}
    annotations:
      summary: Build pods of image build run {{`{{ $labels.namespace }}/{{ $labels.run }}`}} cannot be scheduled
      description: >-
        {{`{{ $value }}`}} build pods of run {{`{{ $labels.namespace }}/{{ $labels.run }}`}}
        have found no node for {{ .for }} or more.
      runbook_url: {{ $runbook }}#imagebuildrunpodsunschedulable
  {{- end }}{{ end }}
  {{- with $a.evictionsOrDiskFull }}{{ if .enabled }}
  - alert: ImageBuildRunEvictionsOrDiskFull
    expr: |
      sum by (namespace, run) (increase(imagebuild_build_failures_total{class=~"Evicted|DiskFull"}[{{ .window }}])) >= {{ .threshold }}
    {{- include "imagebuild-operator.alertLabels" (dict "root" $ "alert" .) | nindent 4 }}
    annotations:
      summary: Builds of image build run {{`{{ $labels.namespace }}/{{ $labels.run }}`}} are evicted or run out of disk
      description: >-
        {{`{{ $value | printf "%.0f" }}`}} builds of run
        {{`{{ $labels.namespace }}/{{ $labels.run }}`}} were evicted or failed with no
        space left on device in the last {{ .window }}.
      runbook_url: {{ $runbook }}#imagebuildrunevictionsordiskfull
  {{- end }}{{ end }}
  {{- with $a.registryThrottled }}{{ if .enabled }}
  - alert: ImageBuildRegistryThrottled
    expr: |
      sum by (namespace, run) (increase(imagebuild_build_failures_total{class="RegistryThrottled"}[{{ .window }}]))
      + on (namespace, run)
      sum by (namespace, run) (increase(imagebuild_registry_requests_total{code="429"}[{{ .window }}]))
      >= {{ .threshold }}
    {{- include "imagebuild-operator.alertLabels" (dict "root" $ "alert" .) | nindent 4 }}
    annotations:
      summary: The registry throttles image build run {{`{{ $labels.namespace }}/{{ $labels.run }}`}}
      description: >-
        The registry throttled run {{`{{ $labels.namespace }}/{{ $labels.run }}`}}
        {{`{{ $value | printf "%.0f" }}`}} times in the last {{ .window }}: pushes that
        failed RegistryThrottled plus 429 answers to the operator's existence checks.
      runbook_url: {{ $runbook }}#imagebuildregistrythrottled
  {{- end }}{{ end }}
- name: imagebuild-operator.operator
  rules:
  {{- with $a.operatorDown }}{{ if .enabled }}
  {{- $selector := .selector | default (printf "job=%q" (include "imagebuild-operator.fullname" $)) }}
  - alert: ImageBuildOperatorDown
    expr: |
      up{ {{- $selector -}} } == 0 or absent(up{ {{- $selector -}} })
    {{- include "imagebuild-operator.alertLabels" (dict "root" $ "alert" .) | nindent 4 }}
    annotations:
      summary: The imagebuild operator is down
      description: >-
        {{`{{ with $labels.instance }}`}}Prometheus has not scraped the imagebuild operator at
        {{`{{ . }}{{ else }}`}}Prometheus has no scrape target for the imagebuild operator
        ({{ $selector }}){{`{{ end }}`}} for {{ .for }}: no run makes progress.
      runbook_url: {{ $runbook }}#imagebuildoperatordown
  {{- end }}{{ end }}
  {{- with $a.operatorNotReady }}{{ if .enabled }}
  - alert: ImageBuildOperatorNotReady
    expr: |
      imagebuild_ready == 0
    {{- include "imagebuild-operator.alertLabels" (dict "root" $ "alert" .) | nindent 4 }}
    annotations:
      summary: The imagebuild operator is not ready
      description: >-
        The imagebuild operator {{`{{ $labels.instance }}`}} has not been ready for
        {{ .for }}: its watches have not synced, or it cannot reach the API server.
      runbook_url: {{ $runbook }}#imagebuildoperatornotready
  {{- end }}{{ end }}
  {{- with $a.reconcileErrors }}{{ if .enabled }}
  - alert: ImageBuildReconcileErrors
    expr: |
      sum by (kind) (rate(imagebuild_reconcile_errors_total[{{ .window }}])) > {{ .perSecond }}
    {{- include "imagebuild-operator.alertLabels" (dict "root" $ "alert" .) | nindent 4 }}
    annotations:
      summary: Reconciles of image build runs keep failing ({{`{{ $labels.kind }}`}})
      description: >-
        Reconciles have failed with {{`{{ $labels.kind }}`}} errors at
        {{`{{ $value | printf "%.2f" }}`}} per second for {{ .for }}.
      runbook_url: {{ $runbook }}#imagebuildreconcileerrors
  {{- end }}{{ end }}
  {{- with $a.runsUnreadable }}{{ if .enabled }}
  - alert: ImageBuildRunsUnreadable
    expr: |
      imagebuild_runs_unreadable > 0
    {{- include "imagebuild-operator.alertLabels" (dict "root" $ "alert" .) | nindent 4 }}
    annotations:
      summary: ImageBuildRuns the operator cannot read are skipped
      description: >-
        {{`{{ $value }}`}} ImageBuildRun(s) do not read as the operator's type and have been
        skipped for {{ .for }}: see the Warning Events `Unreadable`.
      runbook_url: {{ $runbook }}#imagebuildrunsunreadable
  {{- end }}{{ end }}
{{- end -}}
