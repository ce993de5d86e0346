{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "roomcast.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, or the release name alone when it already contains the chart name. */}}
{{- define "roomcast.fullname" -}}
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

{{/* The admin Service's name; 57 + "-admin" stays within 63. */}}
{{- define "roomcast.adminName" -}}
{{- printf "%s-admin" (include "roomcast.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{- define "roomcast.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The image tag: the chart's appVersion unless set. */}}
{{- define "roomcast.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{- define "roomcast.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (include "roomcast.imageTag" .) }}
{{- end }}
{{- end }}

{{/* The recommended labels, on every object. */}}
{{- define "roomcast.labels" -}}
helm.sh/chart: {{ include "roomcast.chart" . }}
{{ include "roomcast.selectorLabels" . }}
app.kubernetes.io/version: {{ include "roomcast.imageTag" . | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/component: server
app.kubernetes.io/part-of: roomcast
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "roomcast.selectorLabels" -}}
app.kubernetes.io/name: {{ include "roomcast.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "roomcast.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "roomcast.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* True ("true") for the shared-secret algorithms. */}}
{{- define "roomcast.hmac" -}}
{{- if has .Values.auth.algorithm (list "HS256" "HS384" "HS512") }}true{{ end }}
{{- end }}

{{/* The Secret the chart manages for auth, when it manages one. */}}
{{- define "roomcast.authSecretName" -}}
{{- printf "%s-jwt" (include "roomcast.fullname" . | trunc 59 | trimSuffix "-") }}
{{- end }}

{{- define "roomcast.chartManagesAuthSecret" -}}
{{- if include "roomcast.hmac" . }}
{{- if not .Values.auth.existingSecret }}true{{ end }}
{{- else }}
{{- if not .Values.auth.existingPublicKeySecret }}true{{ end }}
{{- end }}
{{- end }}

{{/* Where the JWT public key is mounted. */}}
{{- define "roomcast.publicKeyPath" -}}/etc/roomcast/jwt/public.pem{{- end }}
{{- define "roomcast.kafkaCaPath" -}}/etc/roomcast/kafka-ca/ca.pem{{- end }}
{{- define "roomcast.kafkaClientDir" -}}/etc/roomcast/kafka-client{{- end }}

{{/*
Seconds a pod needs to stop after the kubelet starts terminating it: the preStop sleep, the
drain window, 3 s for sessions to end, up to 5 s for the final offset commit, and 4 s for the
listeners and the runtime to stop.
*/}}
{{- define "roomcast.minTerminationSeconds" -}}
{{- add .Values.preStopSleepSeconds (int (ceil .Values.config.server.drainSeconds)) 12 }}
{{- end }}

{{- define "roomcast.terminationGracePeriodSeconds" -}}
{{- $min := int (include "roomcast.minTerminationSeconds" .) }}
{{- $set := int .Values.terminationGracePeriodSeconds }}
{{- if eq $set 0 }}
{{- add $min 3 }}
{{- else if le $set $min }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed preStopSleepSeconds + drainSeconds + 12 = %d, or roomcast is killed mid-drain" $set $min) }}
{{- else }}
{{- $set }}
{{- end }}
{{- end }}

{{/* librdkafka property name -> ROOMCAST_KAFKA_ variable (dots become underscores). */}}
{{- define "roomcast.kafkaEnvName" -}}
{{- printf "ROOMCAST_KAFKA_%s" (. | upper | replace "." "_" | replace "-" "_") }}
{{- end }}
