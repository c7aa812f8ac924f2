{{- define "crm-operator.fullname" -}}
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

{{- define "crm-operator.selectorLabels" -}}
app.kubernetes.io/name: crm-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "crm-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "crm-operator.selectorLabels" . }}
app.kubernetes.io/part-of: crm
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "crm-operator.imageOf" -}}
{{- $repo := .repository -}}
{{- if not $repo -}}
{{- $repo = .name -}}
{{- if .registry -}}
{{- $repo = printf "%s/%s" (trimSuffix "/" .registry) $repo -}}
{{- end -}}
{{- end -}}
{{- printf "%s:%s" $repo (.tag | default .appVersion) -}}
{{- end -}}

{{- define "crm-operator.image" -}}
{{- include "crm-operator.imageOf" (dict "repository" .Values.image.repository "registry" .Values.image.registry "tag" .Values.image.tag "appVersion" .Chart.AppVersion "name" "crm-operator") -}}
{{- end -}}

{{- define "crm-operator.bilogSinkImage" -}}
{{- .Values.bilogSinkImage | default (include "crm-operator.imageOf" (dict "repository" "" "registry" .Values.image.registry "tag" .Values.image.tag "appVersion" .Chart.AppVersion "name" "crm-bilog")) -}}
{{- end -}}

{{- define "crm-operator.tlsSecret" -}}
{{- .Values.webhook.existingSecret | default (printf "%s-webhook-tls" (include "crm-operator.fullname" .)) -}}
{{- end -}}

{{/* The webhook handlers of crm_operator.handlers (kopf serves each at /<handler id>). */}}
{{- define "crm-operator.webhooks" -}}
- id: validate-crmconfig
  plural: crmconfigs
- id: validate-bilogsink
  plural: bilogsinks
{{- end -}}

{{/* skaffold dev: restart the operator on synced sources (see the crm chart's crm.devReloadScript). */}}
{{- define "crm-operator.devReloadScript" -}}
set -eu
src="$(python -c 'import crm_operator, os; print(os.path.dirname(crm_operator.__file__))')"
mkdir -p /tmp/dev-src
cp -R "$src" /tmp/dev-src/
export PYTHONPATH=/tmp/dev-src
pid=""
trap 'kill -TERM "$pid" 2>/dev/null; wait "$pid"; exit 0' TERM INT
while :; do
  python -m crm_operator "$@" &
  pid=$!
  echo "$pid" > /tmp/dev-server.pid
  wait "$pid" || true
  sleep 1
done
{{- end -}}

{{/* The built-in sinks' rules (crm_operator.manifests.sink_rules): their Deployments, and their NetworkPolicies with sinkNetworkPolicy.enabled (SINK_POLICY_RULES). */}}
{{- define "crm-operator.sinkRules" -}}
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, create, patch, delete]
{{- if .Values.sinkNetworkPolicy.enabled }}
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, create, patch, delete]
{{- end }}
{{- end -}}
