{{/*
Names and labels.
*/}}
{{- define "crm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Prefix of every resource name: the release name when it already contains the chart name. */}}
{{- define "crm.fullname" -}}
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

{{- define "crm.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The component templates below take one context:
  dict "root" $ "name" "<svc>" "svc" .Values.<svc>
<svc> is the service's short name (assignment): image crm-<svc>, Helm resources
<fullname>-<svc> (crm-assignment for a release named crm), environment CRM_<SVC>_*.
*/}}
{{- define "crm.componentName" -}}
{{- printf "%s-%s" (include "crm.fullname" .root) .name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector of the serving pods. The migrations Job's pods (component=migrations) never match it. */}}
{{- define "crm.selectorLabels" -}}
app.kubernetes.io/name: crm-{{ .name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component | default "server" }}
{{- end -}}

{{- define "crm.labels" -}}
helm.sh/chart: {{ include "crm.chart" .root }}
{{ include "crm.selectorLabels" . }}
app.kubernetes.io/part-of: crm
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end -}}

{{/* "<registry>/crm-<svc>:<tag>" unless <svc>.image.repository is set (skaffold sets it). */}}
{{- define "crm.image" -}}
{{- $g := .root.Values.global.image -}}
{{- $repo := .svc.image.repository -}}
{{- if not $repo -}}
{{- $repo = printf "crm-%s" .name -}}
{{- if $g.registry -}}
{{- $repo = printf "%s/%s" (trimSuffix "/" $g.registry) $repo -}}
{{- end -}}
{{- end -}}
{{- $tag := .svc.image.tag | default $g.tag | default .root.Chart.AppVersion -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}

{{- define "crm.envPrefix" -}}
{{- printf "CRM_%s" (.name | upper | replace "-" "_") -}}
{{- end -}}

{{/*
Container environment: the settings the chart owns (ports, log level, shutdown grace,
etcd, config prefix, database URL from a Secret), then <svc>.secretEnv, then <svc>.env.
<svc>.env may not redefine a variable the chart owns.
*/}}
{{- define "crm.env" -}}
{{- $p := include "crm.envPrefix" . -}}
{{- $g := .root.Values.global -}}
{{- $owned := list "PORT" "METRICS_PORT" "LOG_LEVEL" "SHUTDOWN_DELAY_S" "SHUTDOWN_GRACE_S" "ETCD_ENDPOINTS" "CONFIG_PREFIX" "DATABASE_URL" -}}
{{- range $name, $_ := .svc.env -}}
{{- range $owned -}}
{{- if eq $name (printf "%s_%s" $p .) -}}
{{- fail (printf "%s.env.%s: set by the chart from other values, do not set it here" $.name $name) -}}
{{- end -}}
{{- end -}}
{{- if hasKey $.svc.secretEnv $name -}}
{{- fail (printf "%s.env.%s is also in %s.secretEnv" $.name $name $.name) -}}
{{- end -}}
{{- end -}}
- name: {{ $p }}_PORT
  value: {{ .svc.port | quote }}
- name: {{ $p }}_METRICS_PORT
  value: {{ .svc.metricsPort | quote }}
- name: {{ $p }}_LOG_LEVEL
  value: {{ .svc.logLevel | default $g.logLevel | quote }}
- name: {{ $p }}_SHUTDOWN_DELAY_S
  value: {{ .svc.shutdownDelaySeconds | quote }}
- name: {{ $p }}_SHUTDOWN_GRACE_S
  value: {{ .svc.shutdownGraceSeconds | quote }}
- name: {{ $p }}_ETCD_ENDPOINTS
  value: {{ join "," $g.etcd.endpoints | quote }}
- name: {{ $p }}_CONFIG_PREFIX
  value: {{ $g.configPrefix | quote }}
{{- if .svc.database.enabled }}
- name: {{ $p }}_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .svc.database.existingSecret | default $g.mysql.existingSecret | required "global.mysql.existingSecret (or <svc>.database.existingSecret) is required" }}
      key: {{ .svc.database.secretKey }}
{{- end }}
{{- range $name, $ref := .svc.secretEnv }}
- name: {{ $name }}
  valueFrom:
    secretKeyRef:
      name: {{ $ref.secretName }}
      key: {{ $ref.key }}
      {{- if $ref.optional }}
      optional: true
      {{- end }}
{{- end }}
{{- range $name, $value := .svc.env }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end -}}

{{/* Non-root, nothing to escalate to, RuntimeDefault seccomp: the same for every pod. */}}
{{- define "crm.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "crm.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
privileged: false
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The root filesystem is read-only: /tmp is the only writable path. */}}
{{- define "crm.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- end -}}

{{- define "crm.tmpMount" -}}
- name: tmp
  mountPath: /tmp
{{- end -}}

{{- define "crm.grpcProbe" -}}
grpc:
  port: {{ .port }}
  {{- with .service }}
  service: {{ . | quote }}
  {{- end }}
{{ toYaml .timing }}
{{- end -}}

{{/*
One gRPC service: ServiceAccount, Service, Deployment, PodDisruptionBudget,
HorizontalPodAutoscaler, NetworkPolicy and the migrations Job hook, each as its values
ask. A new service is a values block plus templates/<svc>.yaml:
  {{- if .Values.<svc>.enabled }}
  {{- include "crm.grpcService" (dict "root" $ "name" "<svc>" "svc" .Values.<svc>) }}
  {{- end }}
*/}}
{{- define "crm.grpcService" -}}
{{- $fullName := include "crm.componentName" . -}}
{{- $svc := .svc -}}
{{- $root := .root -}}
{{- $grace := int $svc.terminationGracePeriodSeconds -}}
{{- $drain := add (int $svc.shutdownDelaySeconds) (int $svc.shutdownGraceSeconds) -}}
{{- if le $grace (int $drain) -}}
{{- fail (printf "%s.terminationGracePeriodSeconds (%d) must exceed shutdownDelaySeconds + shutdownGraceSeconds (%d): the kubelet would kill the server mid-drain" .name $grace (int $drain)) -}}
{{- end -}}
{{- if and $svc.autoscaling.enabled (gt (int $svc.autoscaling.minReplicas) (int $svc.autoscaling.maxReplicas)) -}}
{{- fail (printf "%s.autoscaling.minReplicas exceeds maxReplicas" .name) -}}
{{- end }}
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ $fullName }}
  labels:
    {{- include "crm.labels" . | nindent 4 }}
  {{- with $svc.serviceAccount.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
automountServiceAccountToken: false
---
apiVersion: v1
kind: Service
metadata:
  name: {{ $fullName }}
  labels:
    {{- include "crm.labels" . | nindent 4 }}
  {{- with $svc.service.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  type: ClusterIP
  {{- if $svc.service.headless }}
  clusterIP: "None"
  {{- end }}
  selector:
    {{- include "crm.selectorLabels" . | nindent 4 }}
  ports:
    - name: grpc
      port: {{ $svc.port }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
    - name: metrics
      port: {{ $svc.metricsPort }}
      targetPort: metrics
      protocol: TCP
      appProtocol: http
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $fullName }}
  labels:
    {{- include "crm.labels" . | nindent 4 }}
spec:
  {{- if not $svc.autoscaling.enabled }}
  replicas: {{ $svc.replicaCount }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "crm.selectorLabels" . | nindent 6 }}
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: 25%
      maxUnavailable: 0
  template:
    metadata:
      labels:
        {{- include "crm.labels" . | nindent 8 }}
      annotations:
        prometheus.io/scrape: "true"
        prometheus.io/port: {{ $svc.metricsPort | quote }}
        prometheus.io/path: /metrics
        {{- with $svc.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ $fullName }}
      automountServiceAccountToken: false
      {{- /* Service links would inject CRM_<SVC>_PORT=tcp://... for a Service named crm-<svc>. */}}
      enableServiceLinks: false
      terminationGracePeriodSeconds: {{ $grace }}
      securityContext:
        {{- include "crm.podSecurityContext" . | nindent 8 }}
      {{- with $root.Values.global.imagePullSecrets }}
      imagePullSecrets:
        {{- range . }}
        - name: {{ . }}
        {{- end }}
      {{- end }}
      {{- with $svc.topologySpreadKeys }}
      topologySpreadConstraints:
        {{- range . }}
        - topologyKey: {{ . }}
          maxSkew: 1
          whenUnsatisfiable: ScheduleAnyway
          labelSelector:
            matchLabels:
              {{- include "crm.selectorLabels" $ | nindent 14 }}
        {{- end }}
      {{- end }}
      {{- with $svc.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $svc.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $svc.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ .name }}
          image: {{ include "crm.image" . | quote }}
          imagePullPolicy: {{ $svc.image.pullPolicy | default $root.Values.global.imagePullPolicy }}
          {{- with $svc.command }}
          command:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- with $svc.args }}
          args:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          ports:
            - name: grpc
              containerPort: {{ $svc.port }}
              protocol: TCP
            - name: metrics
              containerPort: {{ $svc.metricsPort }}
              protocol: TCP
          env:
            {{- include "crm.env" . | nindent 12 }}
          startupProbe:
            {{- include "crm.grpcProbe" (dict "port" $svc.port "service" $svc.probes.readinessService "timing" $svc.probes.startup) | nindent 12 }}
          readinessProbe:
            {{- include "crm.grpcProbe" (dict "port" $svc.port "service" $svc.probes.readinessService "timing" $svc.probes.readiness) | nindent 12 }}
          livenessProbe:
            {{- include "crm.grpcProbe" (dict "port" $svc.port "service" $svc.probes.livenessService "timing" $svc.probes.liveness) | nindent 12 }}
          resources:
            {{- toYaml $svc.resources | nindent 12 }}
          securityContext:
            {{- include "crm.containerSecurityContext" . | nindent 12 }}
          volumeMounts:
            {{- include "crm.tmpMount" . | nindent 12 }}
      volumes:
        {{- include "crm.tmpVolume" . | nindent 8 }}
{{- if $svc.podDisruptionBudget.enabled }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ $fullName }}
  labels:
    {{- include "crm.labels" . | nindent 4 }}
spec:
  {{- if not (kindIs "invalid" $svc.podDisruptionBudget.minAvailable) }}
  minAvailable: {{ $svc.podDisruptionBudget.minAvailable }}
  {{- else }}
  maxUnavailable: {{ $svc.podDisruptionBudget.maxUnavailable }}
  {{- end }}
  unhealthyPodEvictionPolicy: AlwaysAllow
  selector:
    matchLabels:
      {{- include "crm.selectorLabels" . | nindent 6 }}
{{- end }}
{{- if $svc.autoscaling.enabled }}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ $fullName }}
  labels:
    {{- include "crm.labels" . | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ $fullName }}
  minReplicas: {{ $svc.autoscaling.minReplicas }}
  maxReplicas: {{ $svc.autoscaling.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $svc.autoscaling.targetCPUUtilizationPercentage }}
{{- end }}
{{- with $root.Values.global.networkPolicy }}
{{- if .enabled }}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ $fullName }}
  labels:
    {{- include "crm.labels" $ | nindent 4 }}
spec:
  podSelector:
    matchLabels:
      {{- include "crm.selectorLabels" $ | nindent 6 }}
  policyTypes:
    - Ingress
  ingress:
    - from:
        - podSelector:
            matchLabels:
              app.kubernetes.io/instance: {{ $root.Release.Name }}
              app.kubernetes.io/part-of: crm
        {{- with .extraGrpcFrom }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        - port: grpc
          protocol: TCP
    - from:
        - namespaceSelector:
            matchLabels:
              kubernetes.io/metadata.name: {{ .metricsNamespace }}
      ports:
        - port: metrics
          protocol: TCP
{{- end }}
{{- end }}
{{- if $svc.migrations.enabled }}
{{- $job := merge (dict "component" "migrations") . }}
---
# Schema migrations before the new pods start. A hook: it runs before the release's own
# objects exist, so it uses the namespace's default ServiceAccount (token not mounted).
apiVersion: batch/v1
kind: Job
metadata:
  name: {{ printf "%s-migrate" $fullName | trunc 63 | trimSuffix "-" }}
  labels:
    {{- include "crm.labels" $job | nindent 4 }}
  annotations:
    helm.sh/hook: pre-install,pre-upgrade
    helm.sh/hook-weight: "-5"
    helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
spec:
  backoffLimit: {{ $svc.migrations.backoffLimit }}
  activeDeadlineSeconds: {{ $svc.migrations.activeDeadlineSeconds }}
  template:
    metadata:
      labels:
        {{- include "crm.labels" $job | nindent 8 }}
    spec:
      restartPolicy: Never
      automountServiceAccountToken: false
      enableServiceLinks: false
      securityContext:
        {{- include "crm.podSecurityContext" . | nindent 8 }}
      {{- with $root.Values.global.imagePullSecrets }}
      imagePullSecrets:
        {{- range . }}
        - name: {{ . }}
        {{- end }}
      {{- end }}
      {{- with $svc.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $svc.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: migrate
          image: {{ include "crm.image" . | quote }}
          imagePullPolicy: {{ $svc.image.pullPolicy | default $root.Values.global.imagePullPolicy }}
          args: ["migrate"]
          env:
            {{- include "crm.env" . | nindent 12 }}
          resources:
            {{- toYaml $svc.migrations.resources | nindent 12 }}
          securityContext:
            {{- include "crm.containerSecurityContext" . | nindent 12 }}
          volumeMounts:
            {{- include "crm.tmpMount" . | nindent 12 }}
      volumes:
        {{- include "crm.tmpVolume" . | nindent 8 }}
{{- end }}
{{- end -}}
