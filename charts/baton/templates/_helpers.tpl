{{/* Names, labels and the operator's arguments. */}}

{{- define "baton.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "baton.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "baton.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "baton.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: baton
{{- end -}}

{{- define "baton.selectorLabels" -}}
app.kubernetes.io/name: {{ include "baton.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "baton.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "baton.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "baton.webhookServiceName" -}}
{{- printf "%s-webhook" (include "baton.fullname" .) -}}
{{- end -}}

{{/* The host name the apiserver calls: the webhook Service's DNS name, which the certificate names. */}}
{{- define "baton.webhookHost" -}}
{{- printf "%s.%s.svc" (include "baton.webhookServiceName" .) .Release.Namespace -}}
{{- end -}}

{{- define "baton.webhookSecretName" -}}
{{- default (printf "%s-webhook-tls" (include "baton.fullname" .)) .Values.webhook.certificate.existingSecret -}}
{{- end -}}

{{- define "baton.image" -}}
{{- $repo := .Values.image.repository -}}
{{- if .Values.image.registry -}}{{- $repo = printf "%s/%s" .Values.image.registry $repo -}}{{- end -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" $repo .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The LLMServices' router / model-fetch / Baton worker image (the operator's --worker-image). */}}
{{- define "baton.workerImage" -}}
{{- $repo := .Values.workerImage.repository -}}
{{- if .Values.workerImage.registry -}}{{- $repo = printf "%s/%s" .Values.workerImage.registry $repo -}}{{- end -}}
{{- if .Values.workerImage.digest -}}
{{- printf "%s@%s" $repo .Values.workerImage.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (default .Chart.AppVersion .Values.workerImage.tag) -}}
{{- end -}}
{{- end -}}

{{/* Whether the cluster serves the Prometheus Operator's kinds. */}}
{{- define "baton.hasMonitoring" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" -}}true{{- end -}}
{{- end -}}

{{/*
The namespaces this operator manages, as a JSON list: watchNamespaces, else the release's own namespace; an
empty list with clusterWide (every namespace). clusterWide with watchNamespaces is refused (it would grant
more than the list says).
*/}}
{{- define "baton.watchNamespaces" -}}
{{- if and .Values.clusterWide .Values.watchNamespaces -}}
{{- fail "clusterWide=true manages every namespace: leave watchNamespaces empty, or set clusterWide=false to name the namespaces" -}}
{{- end -}}
{{- if .Values.clusterWide -}}
[]
{{- else -}}
{{- toJson (default (list .Release.Namespace) .Values.watchNamespaces) -}}
{{- end -}}
{{- end }}
