{{/* Names, labels and the derived numbers every template shares. */}}

{{- define "flashportrait.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "flashportrait.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The headless Service's name leaves room for its suffix inside the 63-character limit. */}}
{{- define "flashportrait.grpcServiceName" -}}
{{- printf "%s-grpc" (include "flashportrait.fullname" . | trunc 58 | trimSuffix "-") -}}
{{- end -}}

{{- define "flashportrait.selectorLabels" -}}
app.kubernetes.io/name: {{ include "flashportrait.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "flashportrait.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "flashportrait.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: inference-server
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "flashportrait.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "flashportrait.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "flashportrait.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/*
Termination grace: the preStop sleep and Triton's drain both run inside it, so it must cover
both; 30 s more lets the server unload models and exit before the kubelet sends SIGKILL.
*/}}
{{- define "flashportrait.terminationGraceSeconds" -}}
{{- $needed := add (int .Values.lifecycle.preStopSleepSeconds) (int .Values.server.exitTimeoutSeconds) -}}
{{- if eq (int .Values.terminationGracePeriodSeconds) 0 -}}
{{- add $needed 30 -}}
{{- else -}}
{{- .Values.terminationGracePeriodSeconds -}}
{{- end -}}
{{- end -}}

{{- define "flashportrait.startupFailureThreshold" -}}
{{- $period := int .Values.probes.startup.periodSeconds -}}
{{- div (add (int .Values.probes.startup.maxStartupSeconds) (sub $period 1)) $period -}}
{{- end -}}

{{/* Rules the JSON schema cannot express; rendering stops with the reason. */}}
{{- define "flashportrait.validate" -}}
{{- $needed := add (int .Values.lifecycle.preStopSleepSeconds) (int .Values.server.exitTimeoutSeconds) -}}
{{- $grace := int .Values.terminationGracePeriodSeconds -}}
{{- if and (ne $grace 0) (lt $grace $needed) -}}
{{- fail (printf "terminationGracePeriodSeconds=%d is shorter than lifecycle.preStopSleepSeconds + server.exitTimeoutSeconds = %d: the kubelet would kill generations that Triton is still draining" $grace $needed) -}}
{{- end -}}
{{- if not .Values.weights.existingClaim -}}
{{- fail "weights.existingClaim is empty: name the PersistentVolumeClaim that holds the folder written by `python -m flashportrait.export.prepare_weights` (weights are never baked into the image)" -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (lt (int .Values.autoscaling.maxReplicas) (int .Values.autoscaling.minReplicas)) -}}
{{- fail (printf "autoscaling.maxReplicas=%d is below autoscaling.minReplicas=%d" (int .Values.autoscaling.maxReplicas) (int .Values.autoscaling.minReplicas)) -}}
{{- end -}}
{{- if and (eq .Values.autoscaling.metric.type "External") (not .Values.autoscaling.metric.selector) -}}
{{- fail "autoscaling.metric.type=External needs autoscaling.metric.selector (matchLabels) to pick this release's queue series" -}}
{{- end -}}
{{- if and (eq (int .Values.strategy.maxSurge) 0) (eq (int .Values.strategy.maxUnavailable) 0) -}}
{{- fail "strategy.maxSurge and strategy.maxUnavailable cannot both be 0: a rollout could never progress" -}}
{{- end -}}
{{- end -}}
