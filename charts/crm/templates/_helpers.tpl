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
What each process of the platform talks to: the single source of the environment the
chart wires (endpoints, targets) and of the NetworkPolicies (egress to what a process
uses or calls, ingress from what calls it). Keys are <service>/<component>; "server" is
the service's main process (values block <service>), every other component is the
values block <service>.<component>.
  uses:       external endpoints (global.mysql, global.etcd, global.redis, global.kafka,
              global.schemaRegistry); schemaRegistry is the in-release bilog registry
              when global.schemaRegistry.url is empty; kafka also sets the topic
              prefix (global.kafka.topicPrefix), so every producer and consumer of the
              BI topics (intake, sink, KPI consumer) names the same topics
  calls:      in-release gRPC servers: <service>/<component>: the setting naming its
              host:port (CRM_<SVC>_<SETTING>), "" when the address comes with the call
              (scheduler jobs carry their target)
  args:       arguments of the image's entrypoint (python -m crm_<svc>)
  protocol:   grpc (native gRPC probes on the standard health service) or http
  grpcServices: the gRPC services a server serves (full names)
  allowedTargetsEnv: the setting listing the gRPC services a scheduled job may call: the
              grpcServices of what scheduler/worker calls with the job ("" calls) plus
              scheduler.jobTargets.extraServices, i.e. what the worker's NetworkPolicy
              lets it reach
  portEnv / metricsPortEnv: the settings of its serving and /metrics ports ("" none)
  selfTargetEnv: the setting telling others where to call this process back
  migrations: the component owns the service's database: its `migrate` Job runs when
              the component is deployed and <service>.migrations.enabled
*/}}
{{- define "crm.topology" -}}
assignment/server:
  migrations: true
  args: [serve]
  protocol: grpc
  grpcServices: [crm.assignment.v1.AssignmentService]
  portEnv: PORT
  metricsPortEnv: METRICS_PORT
  uses: [mysql, etcd]
  calls:
    recommendation/server: RECOMMENDATION_TARGET
    bilog/server: BILOG_TARGET
    scheduler/server: SCHEDULER_TARGET
  selfTargetEnv: SELF_TARGET
recommendation/server:
  migrations: true
  args: [serve]
  protocol: grpc
  grpcServices: [crm.recommendation.v1.RecommendationService]
  portEnv: PORT
  metricsPortEnv: METRICS_PORT
  uses: [mysql, etcd]
  calls: {}
scheduler/server:
  migrations: true
  args: [serve]
  protocol: grpc
  grpcServices: [crm.scheduler.v1.SchedulerService]
  portEnv: PORT
  metricsPortEnv: METRICS_PORT
  allowedTargetsEnv: ALLOWED_TARGET_SERVICES
  uses: [mysql]
  calls: {}
scheduler/pump:
  args: [pump]
  protocol: grpc
  portEnv: PUMP_HEALTH_PORT
  metricsPortEnv: PUMP_METRICS_PORT
  uses: [mysql, redis]
  calls: {}
scheduler/worker:
  args: [worker]
  protocol: grpc
  portEnv: WORKER_HEALTH_PORT
  metricsPortEnv: WORKER_METRICS_PORT
  uses: [mysql, redis]
  calls:
    assignment/server: ""
bilog/server:
  args: [serve]
  protocol: grpc
  grpcServices: [crm.bilog.v1.BilogService]
  portEnv: PORT
  metricsPortEnv: METRICS_PORT
  uses: [kafka, schemaRegistry]
  calls: {}
bilog/registry:
  migrations: true
  args: [registry]
  protocol: http
  portEnv: REGISTRY_PORT
  metricsPortEnv: ""
  uses: [mysql]
  calls: {}
bilog/kpi:
  args: [kpi]
  protocol: grpc
  portEnv: KPI_PORT
  metricsPortEnv: KPI_METRICS_PORT
  uses: [kafka, schemaRegistry]
  calls: {}
bilog/sink:
  args: [sink]
  protocol: grpc
  portEnv: SINK_PORT
  metricsPortEnv: SINK_METRICS_PORT
  uses: [kafka, schemaRegistry]
  calls: {}
{{- end -}}

{{/*
The values of one component: .Values.<service> for "server", .Values.<service>.<component>
otherwise. Returns YAML (use with fromYaml); "" when the service or component is off.
*/}}
{{- define "crm.procValues" -}}
{{- $svcName := index (splitList "/" .key) 0 -}}
{{- $comp := index (splitList "/" .key) 1 -}}
{{- $svc := index .root.Values $svcName -}}
{{- if $svc.enabled -}}
{{- if eq $comp "server" -}}
{{- toYaml $svc -}}
{{- else if (index $svc $comp).enabled -}}
{{- toYaml (index $svc $comp) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "true" when the component <service>/<component> (.key) is deployed, else "". */}}
{{- define "crm.enabled" -}}
{{- $parts := splitList "/" .key -}}
{{- $svc := index .root.Values (index $parts 0) -}}
{{- if $svc.enabled -}}
{{- if eq (index $parts 1) "server" -}}
true
{{- else if (index $svc (index $parts 1)).enabled -}}
true
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The serving port of a component (.key). */}}
{{- define "crm.procPort" -}}
{{- $parts := splitList "/" .key -}}
{{- $svc := index .root.Values (index $parts 0) -}}
{{- if eq (index $parts 1) "server" -}}
{{- $svc.port -}}
{{- else -}}
{{- (index $svc (index $parts 1)).port -}}
{{- end -}}
{{- end -}}

{{/* Name of a component's objects: <fullname>-<service>[-<component>]. */}}
{{- define "crm.componentName" -}}
{{- $base := printf "%s-%s" (include "crm.fullname" .root) .name -}}
{{- if and .component (ne .component "server") -}}
{{- $base = printf "%s-%s" $base .component -}}
{{- end -}}
{{- $base | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector of a component's pods. The migrations Job's pods (component=migrations) never match a server's. */}}
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

{{/* host:port of an in-release component's Service; "" when it is not deployed. */}}
{{- define "crm.target" -}}
{{- if include "crm.enabled" . -}}
{{- $parts := splitList "/" .key -}}
{{- printf "%s:%s" (include "crm.componentName" (dict "root" .root "name" (index $parts 0) "component" (index $parts 1))) (include "crm.procPort" .) -}}
{{- end -}}
{{- end -}}

{{/* Schema registry URL: global.schemaRegistry.url, else the in-release bilog registry. */}}
{{- define "crm.schemaRegistryUrl" -}}
{{- if .Values.global.schemaRegistry.url -}}
{{- .Values.global.schemaRegistry.url -}}
{{- else -}}
{{- $t := include "crm.target" (dict "root" . "key" "bilog/registry") -}}
{{- if not $t -}}
{{- fail "global.schemaRegistry.url is required when bilog.registry is disabled" -}}
{{- end -}}
{{- printf "http://%s" $t -}}
{{- end -}}
{{- end -}}

{{/* A secretKeyRef env entry. */}}
{{- define "crm.secretEnvVar" -}}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ .key }}
      {{- if .optional }}
      optional: true
      {{- end }}
{{- end -}}

{{/*
Container environment of a component: the settings the chart owns (ports, log level,
shutdown timing, endpoints of what it uses, targets of what it calls), then
<svc>.secretEnv, then <svc>.env, then the component's own env. A user env may not
redefine a variable the chart owns.
*/}}
{{- define "crm.env" -}}
{{- $p := include "crm.envPrefix" . -}}
{{- $root := .root -}}
{{- $g := $root.Values.global -}}
{{- $topo := .topo -}}
{{- $proc := .proc -}}
{{- $owned := dict -}}
{{- with $topo.portEnv }}{{ $_ := set $owned (printf "%s_%s" $p .) (toString $proc.port) }}{{ end -}}
{{- with $topo.metricsPortEnv }}{{ $_ := set $owned (printf "%s_%s" $p .) (toString $proc.metricsPort) }}{{ end -}}
{{- $_ := set $owned (printf "%s_LOG_LEVEL" $p) ($proc.logLevel | default .svc.logLevel | default $g.logLevel) -}}
{{- $_ := set $owned (printf "%s_SHUTDOWN_DELAY_S" $p) (toString $proc.shutdownDelaySeconds) -}}
{{- $_ := set $owned (printf "%s_SHUTDOWN_GRACE_S" $p) (toString $proc.shutdownGraceSeconds) -}}
{{- if has "etcd" $topo.uses -}}
{{- $_ := set $owned (printf "%s_ETCD_ENDPOINTS" $p) (join "," $g.etcd.endpoints) -}}
{{- $_ := set $owned (printf "%s_CONFIG_PREFIX" $p) $g.configPrefix -}}
{{- end -}}
{{- if and (has "redis" $topo.uses) (not $g.redis.existingSecret) -}}
{{- $_ := set $owned (printf "%s_REDIS_URL" $p) $g.redis.url -}}
{{- end -}}
{{- if has "kafka" $topo.uses -}}
{{- $_ := set $owned (printf "%s_KAFKA_BOOTSTRAP" $p) (join "," $g.kafka.bootstrapServers) -}}
{{- $_ := set $owned (printf "%s_TOPIC_PREFIX" $p) $g.kafka.topicPrefix -}}
{{- end -}}
{{- if has "schemaRegistry" $topo.uses -}}
{{- $_ := set $owned (printf "%s_SCHEMA_REGISTRY_URL" $p) (include "crm.schemaRegistryUrl" $root) -}}
{{- end -}}
{{- if include "crm.traced" (dict "root" $root "topo" $topo) -}}
{{- $_ := set $owned (printf "%s_TRACING_EXPORTER" $p) "otlp" -}}
{{- $_ := set $owned (printf "%s_TRACING_OTLP_ENDPOINT" $p) $g.tracing.otlpEndpoint -}}
{{- $_ := set $owned (printf "%s_TRACING_SAMPLE_RATIO" $p) (toString $g.tracing.sampleRatio) -}}
{{- end -}}
{{- range $key, $setting := $topo.calls -}}
{{- if $setting -}}
{{- with include "crm.target" (dict "root" $root "key" $key) -}}
{{- $_ := set $owned (printf "%s_%s" $p $setting) . -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- with $topo.selfTargetEnv -}}
{{- $_ := set $owned (printf "%s_%s" $p .) (printf "%s:%v" (include "crm.componentName" $) $proc.port) -}}
{{- end -}}
{{- range $k, $v := .extraOwned -}}
{{- $_ := set $owned $k $v -}}
{{- end -}}
{{- $secretOwned := list -}}
{{- if and (has "mysql" $topo.uses) .svc.database.enabled -}}
{{- $secretOwned = append $secretOwned (printf "%s_DATABASE_URL" $p) -}}
{{- end -}}
{{- if and (has "redis" $topo.uses) $g.redis.existingSecret -}}
{{- $secretOwned = append $secretOwned (printf "%s_REDIS_URL" $p) -}}
{{- end -}}
{{- $userEnv := merge (dict) (.procEnv | default dict) (.svc.env | default dict) -}}
{{- range $name, $_ := $userEnv -}}
{{- if or (hasKey $owned $name) (has $name $secretOwned) -}}
{{- fail (printf "%s.env.%s: set by the chart from other values, do not set it here" $.name $name) -}}
{{- end -}}
{{- if hasKey $.svc.secretEnv $name -}}
{{- fail (printf "%s.env.%s is also in %s.secretEnv" $.name $name $.name) -}}
{{- end -}}
{{- end -}}
{{- range $name, $_ := .svc.secretEnv -}}
{{- if or (hasKey $owned $name) (has $name $secretOwned) -}}
{{- fail (printf "%s.secretEnv.%s: set by the chart from other values, do not set it here" $.name $name) -}}
{{- end -}}
{{- end -}}
{{- range $name := keys $owned | sortAlpha }}
- name: {{ $name }}
  value: {{ index $owned $name | toString | quote }}
{{- end }}
{{- if and (has "mysql" $topo.uses) .svc.database.enabled }}
{{ include "crm.secretEnvVar" (dict "env" (printf "%s_DATABASE_URL" $p) "secretName" (.svc.database.existingSecret | default $g.mysql.existingSecret | required "global.mysql.existingSecret (or <svc>.database.existingSecret) is required") "key" .svc.database.secretKey) }}
{{- end }}
{{- if and (has "redis" $topo.uses) $g.redis.existingSecret }}
{{ include "crm.secretEnvVar" (dict "env" (printf "%s_REDIS_URL" $p) "secretName" $g.redis.existingSecret "key" $g.redis.secretKey) }}
{{- end }}
{{- range $name, $ref := .svc.secretEnv }}
{{ include "crm.secretEnvVar" (dict "env" $name "secretName" $ref.secretName "key" $ref.key "optional" $ref.optional) }}
{{- end }}
{{- range $name, $value := $userEnv }}
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

{{/* The root filesystem is read-only: /tmp is the only writable path (plus a sink's data). */}}
{{- define "crm.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- end -}}

{{- define "crm.tmpMount" -}}
- name: tmp
  mountPath: /tmp
{{- end -}}

{{/*
The CA of a MySQL server that requires TLS (global.mysql.tls.caSecret), for processes
using MySQL; their URLs then end in ?ssl_ca=/etc/crm/mysql-tls/<caKey>.
*/}}
{{- define "crm.mysqlTlsMount" -}}
{{- if and (has "mysql" .topo.uses) .root.Values.global.mysql.tls.caSecret }}
- name: mysql-tls
  mountPath: /etc/crm/mysql-tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "crm.mysqlTlsVolume" -}}
{{- with .root.Values.global.mysql.tls }}
{{- if and (has "mysql" $.topo.uses) .caSecret }}
- name: mysql-tls
  secret:
    secretName: {{ .caSecret }}
    items:
      - key: {{ .caKey }}
        path: {{ .caKey }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "crm.grpcProbe" -}}
grpc:
  port: {{ .port }}
  {{- with .service }}
  service: {{ . | quote }}
  {{- end }}
{{ toYaml .timing }}
{{- end -}}

{{- define "crm.httpProbe" -}}
httpGet:
  port: http
  path: {{ .path }}
{{ toYaml .timing }}
{{- end -}}

{{/*
skaffold dev (global.devReload): the installed package is copied to /tmp/dev-src (the
/tmp emptyDir: the root filesystem stays read-only) and put first on PYTHONPATH; skaffold
syncs changed sources there and its after-sync hook stops the process (not the container,
whose files would be reset); this loop starts it again on the synced code.
*/}}
{{- define "crm.devReloadScript" -}}
set -eu
src="$(python -c 'import crm_{{ .name }}, os; print(os.path.dirname(crm_{{ .name }}.__file__))')"
mkdir -p /tmp/dev-src
cp -R "$src" /tmp/dev-src/
export PYTHONPATH=/tmp/dev-src
pid=""
trap 'kill -TERM "$pid" 2>/dev/null; wait "$pid"; exit 0' TERM INT
while :; do
  python -m crm_{{ .name }} "$@" &
  pid=$!
  echo "$pid" > /tmp/dev-server.pid
  wait "$pid" || true
  sleep 1
done
{{- end -}}

{{- define "crm.imagePullSecrets" -}}
{{- with .Values.global.imagePullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- end -}}

{{/*
One service: its ServiceAccount, every enabled component (crm.component) and the
migrations Job. A service is a values block plus templates/<svc>.yaml:
  {{- include "crm.service" (dict "root" $ "name" "<svc>") }}
and its components in crm.topology.
*/}}
{{- define "crm.service" -}}
{{- $svc := index .root.Values .name -}}
{{- if $svc.enabled -}}
{{- $ctx := dict "root" .root "name" .name "svc" $svc "component" "server" }}
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ include "crm.componentName" (dict "root" .root "name" .name) }}
  labels:
    {{- include "crm.labels" $ctx | nindent 4 }}
  {{- with $svc.serviceAccount.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
automountServiceAccountToken: false
{{- $topology := include "crm.topology" . | fromYaml }}
{{- range $key := keys $topology | sortAlpha }}
{{- $parts := splitList "/" $key }}
{{- if eq (index $parts 0) $.name }}
{{- if include "crm.enabled" (dict "root" $.root "key" $key) }}
{{- $proc := ternary $svc (index $svc (index $parts 1)) (eq (index $parts 1) "server") }}
{{ include "crm.component" (dict "root" $.root "name" $.name "svc" $svc "component" (index $parts 1) "proc" $proc "topo" (index $topology $key) "topology" $topology) }}
{{- end }}
{{- end }}
{{- end }}
{{- range $key, $t := $topology }}
{{- if and $t.migrations (eq (index (splitList "/" $key) 0) $.name) $svc.migrations.enabled (include "crm.enabled" (dict "root" $.root "key" $key)) }}
{{ include "crm.migrationsJob" $ctx }}
{{- end }}
{{- end }}
{{- end -}}
{{- end -}}

{{/*
One component: Service (when it has a port), Deployment, PodDisruptionBudget,
HorizontalPodAutoscaler, NetworkPolicy and ServiceMonitor, each as its values ask.
Context: root, name (service), svc (service values), component, proc (component values),
topo (its crm.topology entry), topology.
*/}}
{{- define "crm.component" -}}
{{- $fullName := include "crm.componentName" . -}}
{{- $svc := .svc -}}
{{- $proc := .proc -}}
{{- $root := .root -}}
{{- $topo := .topo -}}
{{- $where := ternary .name (printf "%s.%s" .name .component) (eq .component "server") -}}
{{- $grace := int $proc.terminationGracePeriodSeconds -}}
{{- $drain := add (int $proc.shutdownDelaySeconds) (int $proc.shutdownGraceSeconds) -}}
{{- if le $grace (int $drain) -}}
{{- fail (printf "%s.terminationGracePeriodSeconds (%d) must exceed shutdownDelaySeconds + shutdownGraceSeconds (%d): the kubelet would kill the server mid-drain" $where $grace (int $drain)) -}}
{{- end -}}
{{- if and $proc.autoscaling $proc.autoscaling.enabled (gt (int $proc.autoscaling.minReplicas) (int $proc.autoscaling.maxReplicas)) -}}
{{- fail (printf "%s.autoscaling.minReplicas exceeds maxReplicas" $where) -}}
{{- end -}}
{{- $autoscaling := and $proc.autoscaling $proc.autoscaling.enabled -}}
{{- $portName := ternary "grpc" "http" (eq $topo.protocol "grpc") -}}
{{- $hasMetrics := and $topo.metricsPortEnv (gt (int $proc.metricsPort) 0) -}}
{{- $extraOwned := dict -}}
{{- $persistence := $proc.persistence | default dict -}}
{{- if $proc.dataDir -}}
{{- $_ := set $extraOwned (printf "%s_SINK_DIR" (include "crm.envPrefix" .)) $proc.dataDir -}}
{{- end -}}
{{- if and (eq .name "assignment") (eq .component "server") (or $autoscaling (gt (int $proc.replicaCount) 1)) -}}
{{- /* several replicas: each must sign console tokens with the same secret */ -}}
{{- $_ := set $extraOwned "CRM_ASSIGNMENT_AUTH_TOKEN_SECRET_REQUIRED" "true" -}}
{{- end -}}
{{- if $topo.allowedTargetsEnv -}}
{{- $targets := list -}}
{{- range $key, $setting := (index .topology "scheduler/worker").calls -}}
{{- if and (not $setting) (include "crm.enabled" (dict "root" $root "key" $key)) -}}
{{- $targets = concat $targets ((index $.topology $key).grpcServices | default list) -}}
{{- end -}}
{{- end -}}
{{- $targets = concat $targets ($svc.jobTargets.extraServices | default list) | uniq -}}
{{- if not $targets -}}
{{- fail "scheduler: no service a job could call (assignment is off): set scheduler.jobTargets.extraServices" -}}
{{- end -}}
{{- $_ := set $extraOwned (printf "%s_%s" (include "crm.envPrefix" .) $topo.allowedTargetsEnv) (join "," $targets) -}}
{{- end -}}
{{- if $topo.portEnv }}
---
apiVersion: v1
kind: Service
metadata:
  name: {{ $fullName }}
  labels:
    {{- include "crm.labels" . | nindent 4 }}
  {{- with ($proc.service).annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  type: ClusterIP
  {{- if ($proc.service).headless }}
  clusterIP: "None"
  {{- end }}
  selector:
    {{- include "crm.selectorLabels" . | nindent 4 }}
  ports:
    - name: {{ $portName }}
      port: {{ $proc.port }}
      targetPort: {{ $portName }}
      protocol: TCP
      appProtocol: {{ ternary "grpc" "http" (eq $topo.protocol "grpc") }}
    {{- if $hasMetrics }}
    - name: metrics
      port: {{ $proc.metricsPort }}
      targetPort: metrics
      protocol: TCP
      appProtocol: http
    {{- end }}
{{- end }}
{{- if and $persistence.enabled (not $persistence.existingClaim) }}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: {{ $fullName }}
  labels:
    {{- include "crm.labels" . | nindent 4 }}
  annotations:
    # the files are the data: `helm uninstall` leaves the claim
    helm.sh/resource-policy: keep
spec:
  accessModes:
    {{- toYaml $persistence.accessModes | nindent 4 }}
  {{- with $persistence.storageClassName }}
  storageClassName: {{ . | quote }}
  {{- end }}
  resources:
    requests:
      storage: {{ $persistence.size }}
{{- end }}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $fullName }}
  labels:
    {{- include "crm.labels" . | nindent 4 }}
spec:
  {{- if not $autoscaling }}
  replicas: {{ $proc.replicaCount }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "crm.selectorLabels" . | nindent 6 }}
  {{- if $persistence.enabled }}
  # one writer of the data volume at a time
  strategy:
    type: Recreate
  {{- else }}
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: 25%
      maxUnavailable: 0
  {{- end }}
  template:
    metadata:
      labels:
        {{- include "crm.labels" . | nindent 8 }}
      {{- if or $hasMetrics $proc.podAnnotations }}
      annotations:
        {{- if and $hasMetrics $root.Values.metrics.podAnnotations }}
        prometheus.io/scrape: "true"
        prometheus.io/port: {{ $proc.metricsPort | quote }}
        prometheus.io/path: /metrics
        {{- end }}
        {{- with $proc.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
    spec:
      serviceAccountName: {{ include "crm.componentName" (dict "root" $root "name" .name) }}
      automountServiceAccountToken: false
      {{- /* Service links would inject CRM_<SVC>_PORT=tcp://... for a Service named crm-<svc>. */}}
      enableServiceLinks: false
      terminationGracePeriodSeconds: {{ $grace }}
      securityContext:
        {{- include "crm.podSecurityContext" . | nindent 8 }}
      {{- include "crm.imagePullSecrets" $root | nindent 6 }}
      {{- with $proc.topologySpreadKeys }}
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
      {{- with $proc.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $proc.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $proc.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ ternary .name (printf "%s-%s" .name .component) (eq .component "server") }}
          image: {{ include "crm.image" . | quote }}
          imagePullPolicy: {{ $svc.image.pullPolicy | default $root.Values.global.imagePullPolicy }}
          {{- if $proc.command }}
          command:
            {{- toYaml $proc.command | nindent 12 }}
          {{- else if $root.Values.global.devReload.enabled }}
          command: ["/bin/sh", "-c", {{ include "crm.devReloadScript" . | quote }}, "crm-dev"]
          {{- end }}
          args:
            {{- toYaml ($proc.args | default $topo.args) | nindent 12 }}
          {{- if $topo.portEnv }}
          ports:
            - name: {{ $portName }}
              containerPort: {{ $proc.port }}
              protocol: TCP
            {{- if $hasMetrics }}
            - name: metrics
              containerPort: {{ $proc.metricsPort }}
              protocol: TCP
            {{- end }}
          {{- end }}
          env:
            {{- include "crm.env" (dict "root" $root "name" .name "svc" $svc "component" .component "proc" $proc "topo" $topo "procEnv" (ternary (dict) $proc.env (eq .component "server")) "extraOwned" $extraOwned) | nindent 12 }}
          {{- if eq $topo.protocol "grpc" }}
          startupProbe:
            {{- include "crm.grpcProbe" (dict "port" $proc.port "service" $proc.probes.readinessService "timing" $proc.probes.startup) | nindent 12 }}
          readinessProbe:
            {{- include "crm.grpcProbe" (dict "port" $proc.port "service" $proc.probes.readinessService "timing" $proc.probes.readiness) | nindent 12 }}
          livenessProbe:
            {{- include "crm.grpcProbe" (dict "port" $proc.port "service" $proc.probes.livenessService "timing" $proc.probes.liveness) | nindent 12 }}
          {{- else if eq $topo.protocol "http" }}
          startupProbe:
            {{- include "crm.httpProbe" (dict "path" $proc.probes.livenessPath "timing" $proc.probes.startup) | nindent 12 }}
          readinessProbe:
            {{- include "crm.httpProbe" (dict "path" $proc.probes.readinessPath "timing" $proc.probes.readiness) | nindent 12 }}
          livenessProbe:
            {{- include "crm.httpProbe" (dict "path" $proc.probes.livenessPath "timing" $proc.probes.liveness) | nindent 12 }}
          {{- end }}
          resources:
            {{- toYaml $proc.resources | nindent 12 }}
          securityContext:
            {{- include "crm.containerSecurityContext" . | nindent 12 }}
          volumeMounts:
            {{- include "crm.tmpMount" . | nindent 12 }}
            {{- include "crm.mysqlTlsMount" . | nindent 12 }}
            {{- if $proc.dataDir }}
            - name: data
              mountPath: {{ $proc.dataDir }}
            {{- end }}
      volumes:
        {{- include "crm.tmpVolume" . | nindent 8 }}
        {{- include "crm.mysqlTlsVolume" . | nindent 8 }}
        {{- if $proc.dataDir }}
        - name: data
          {{- if $persistence.enabled }}
          persistentVolumeClaim:
            claimName: {{ $persistence.existingClaim | default $fullName }}
          {{- else }}
          emptyDir:
            sizeLimit: {{ $persistence.size }}
          {{- end }}
        {{- end }}
{{- if $proc.podDisruptionBudget.enabled }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ $fullName }}
  labels:
    {{- include "crm.labels" . | nindent 4 }}
spec:
  {{- if not (kindIs "invalid" $proc.podDisruptionBudget.minAvailable) }}
  minAvailable: {{ $proc.podDisruptionBudget.minAvailable }}
  {{- else }}
  maxUnavailable: {{ $proc.podDisruptionBudget.maxUnavailable }}
  {{- end }}
  unhealthyPodEvictionPolicy: AlwaysAllow
  selector:
    matchLabels:
      {{- include "crm.selectorLabels" . | nindent 6 }}
{{- end }}
{{- if $autoscaling }}
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
  minReplicas: {{ $proc.autoscaling.minReplicas }}
  maxReplicas: {{ $proc.autoscaling.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $proc.autoscaling.targetCPUUtilizationPercentage }}
{{- end }}
{{- if $root.Values.global.networkPolicy.enabled }}
{{ include "crm.networkPolicy" (merge (dict "fullName" $fullName "portName" $portName "hasMetrics" $hasMetrics) .) }}
{{- end }}
{{- if and $hasMetrics $root.Values.metrics.serviceMonitor.enabled }}
---
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata:
  name: {{ $fullName }}
  labels:
    {{- include "crm.labels" . | nindent 4 }}
    {{- with $root.Values.metrics.serviceMonitor.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  selector:
    matchLabels:
      {{- include "crm.selectorLabels" . | nindent 6 }}
  endpoints:
    - port: metrics
      path: /metrics
      interval: {{ $root.Values.metrics.serviceMonitor.interval }}
      scrapeTimeout: {{ $root.Values.metrics.serviceMonitor.scrapeTimeout }}
{{- end }}
{{- end -}}

{{/* Egress to an external endpoint: its ports, to its peers (anywhere when none are given). */}}
{{- define "crm.externalEgress" -}}
- ports:
    {{- range .ports }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
  {{- with .peers }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/* Port of a URL ("scheme://[user@]host:port/..."), else the scheme's default. */}}
{{- define "crm.urlPort" -}}
{{- $u := urlParse . -}}
{{- $hostport := $u.host -}}
{{- if contains ":" $hostport -}}
{{- last (splitList ":" $hostport) -}}
{{- else if eq $u.scheme "https" -}}443{{- else if eq $u.scheme "redis" -}}6379{{- else if eq $u.scheme "rediss" -}}6379{{- else -}}80{{- end -}}
{{- end -}}

{{/*
NetworkPolicy of a component, from crm.topology: ingress from the in-release components
that call it (plus global.networkPolicy.extraGrpcFrom on servers), /metrics from the
monitoring namespace; egress to DNS, to the components it calls and to the external
endpoints it uses (their ports; their peers when global.<endpoint>.networkPolicyPeers
is set). Kubelet probes are always allowed by Kubernetes.
*/}}
{{- define "crm.networkPolicy" -}}
{{- $root := .root -}}
{{- $g := $root.Values.global -}}
{{- $np := $g.networkPolicy -}}
{{- $self := printf "%s/%s" .name .component -}}
{{- $callers := list -}}
{{- range $key, $t := .topology -}}
{{- if and (hasKey $t.calls $self) (include "crm.enabled" (dict "root" $root "key" $key)) -}}
{{- $callers = append $callers $key -}}
{{- end -}}
{{- if and (eq $self "bilog/registry") (has "schemaRegistry" $t.uses) (not $g.schemaRegistry.url) (include "crm.enabled" (dict "root" $root "key" $key)) -}}
{{- $callers = append $callers $key -}}
{{- end -}}
{{- end -}}
{{- $callees := list -}}
{{- range $key, $_ := .topo.calls -}}
{{- if include "crm.enabled" (dict "root" $root "key" $key) -}}
{{- $callees = append $callees $key -}}
{{- end -}}
{{- end -}}
{{- $registry := "" -}}
{{- if has "schemaRegistry" .topo.uses -}}
{{- if $g.schemaRegistry.url -}}
{{- $registry = "external" -}}
{{- else -}}
{{- $callees = append $callees "bilog/registry" -}}
{{- end -}}
{{- end -}}
{{- $operatorSinks := and (eq $self "bilog/registry") $np.operatorSinks.enabled (not $g.schemaRegistry.url) -}}
{{- $ingressOpen := and .topo.portEnv (or $callers (and (eq .component "server") $np.extraGrpcFrom) .proc.networkPolicy.extraIngressFrom $operatorSinks) -}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ .fullName }}
  labels:
    {{- include "crm.labels" . | nindent 4 }}
spec:
  podSelector:
    matchLabels:
      {{- include "crm.selectorLabels" . | nindent 6 }}
  policyTypes:
    - Ingress
    - Egress
  {{- if not (or $ingressOpen .hasMetrics) }}
  ingress: []
  {{- else }}
  ingress:
    {{- if $ingressOpen }}
    - from:
        {{- range $callers }}
        {{- $parts := splitList "/" . }}
        - podSelector:
            matchLabels:
              {{- include "crm.selectorLabels" (dict "root" $root "name" (index $parts 0) "component" (index $parts 1)) | nindent 14 }}
        {{- end }}
        {{- if eq .component "server" }}
        {{- with $np.extraGrpcFrom }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        {{- end }}
        {{- with .proc.networkPolicy.extraIngressFrom }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        {{- if $operatorSinks }}
        # the operator's built-in BI log sinks (crm.operatorSinkPolicy)
        - podSelector:
            matchLabels:
              {{- include "crm.operatorSinkLabels" . | nindent 14 }}
        {{- end }}
      ports:
        - port: {{ .portName }}
          protocol: TCP
    {{- end }}
    {{- if .hasMetrics }}
    - from:
        - namespaceSelector:
            matchLabels:
              kubernetes.io/metadata.name: {{ $np.metricsNamespace }}
      ports:
        - port: metrics
          protocol: TCP
    {{- end }}
  {{- end }}
  egress:
    # DNS
    - ports:
        - port: 53
          protocol: UDP
        - port: 53
          protocol: TCP
      {{- with $np.dnsPeers }}
      to:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    {{- range $callees }}
    {{- $parts := splitList "/" . }}
    {{- $port := include "crm.procPort" (dict "root" $root "key" .) }}
    - to:
        - podSelector:
            matchLabels:
              {{- include "crm.selectorLabels" (dict "root" $root "name" (index $parts 0) "component" (index $parts 1)) | nindent 14 }}
      ports:
        - port: {{ $port }}
          protocol: TCP
    {{- end }}
    {{- if has "mysql" .topo.uses }}
    {{- include "crm.externalEgress" (dict "ports" (list $g.mysql.port) "peers" $g.mysql.networkPolicyPeers) | nindent 4 }}
    {{- end }}
    {{- if has "etcd" .topo.uses }}
    {{- $ports := list }}
    {{- range $g.etcd.endpoints }}{{ $ports = append $ports (last (splitList ":" .)) }}{{ end }}
    {{- include "crm.externalEgress" (dict "ports" ($ports | uniq) "peers" $g.etcd.networkPolicyPeers) | nindent 4 }}
    {{- end }}
    {{- if has "redis" .topo.uses }}
    {{- include "crm.externalEgress" (dict "ports" (list $g.redis.port) "peers" $g.redis.networkPolicyPeers) | nindent 4 }}
    {{- end }}
    {{- if has "kafka" .topo.uses }}
    {{- $ports := list }}
    {{- range $g.kafka.bootstrapServers }}{{ $ports = append $ports (last (splitList ":" .)) }}{{ end }}
    {{- $ports = concat $ports ($g.kafka.brokerPorts | default list) }}
    {{- include "crm.externalEgress" (dict "ports" ($ports | uniq) "peers" $g.kafka.networkPolicyPeers) | nindent 4 }}
    {{- end }}
    {{- if $registry }}
    {{- include "crm.externalEgress" (dict "ports" (list (include "crm.urlPort" $g.schemaRegistry.url)) "peers" $g.schemaRegistry.networkPolicyPeers) | nindent 4 }}
    {{- end }}
    {{- if include "crm.traced" (dict "root" $root "topo" .topo) }}
    # the OpenTelemetry collector (global.tracing)
    {{- include "crm.externalEgress" (dict "ports" (list (include "crm.urlPort" $g.tracing.otlpEndpoint)) "peers" $g.tracing.networkPolicyPeers) | nindent 4 }}
    {{- end }}
    {{- with .proc.networkPolicy.extraEgress }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}

{{/*
Schema migrations of a service (its `migrate` command) before the new pods start, and
(global.networkPolicy.enabled) their NetworkPolicy: no ingress, egress to DNS and MySQL
only. The policy is a hook too, created before the Job (weight -10) and kept for the next
run (hook resources are not part of the release: `helm uninstall` leaves it; it selects
only the migration pods).
*/}}
{{- define "crm.migrationsJob" -}}
{{- $svc := .svc -}}
{{- $root := .root -}}
{{- $g := $root.Values.global -}}
{{- $job := merge (dict "component" "migrations") . -}}
{{- $topo := dict "uses" (list "mysql") "calls" dict "portEnv" "" "metricsPortEnv" "" -}}
{{- $proc := dict "logLevel" "" "shutdownDelaySeconds" 0 "shutdownGraceSeconds" 0 -}}
{{- if $g.networkPolicy.enabled }}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ printf "%s-migrate" (include "crm.componentName" .) | trunc 63 | trimSuffix "-" }}
  labels:
    {{- include "crm.labels" $job | nindent 4 }}
  annotations:
    helm.sh/hook: pre-install,pre-upgrade
    helm.sh/hook-weight: "-10"
    helm.sh/hook-delete-policy: before-hook-creation
spec:
  podSelector:
    matchLabels:
      {{- include "crm.selectorLabels" $job | nindent 6 }}
  policyTypes:
    - Ingress
    - Egress
  ingress: []
  egress:
    # DNS
    - ports:
        - port: 53
          protocol: UDP
        - port: 53
          protocol: TCP
      {{- with $g.networkPolicy.dnsPeers }}
      to:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    {{- include "crm.externalEgress" (dict "ports" (list $g.mysql.port) "peers" $g.mysql.networkPolicyPeers) | nindent 4 }}
{{- end }}
---
# A hook: it runs before the release's own objects exist, so it uses the namespace's
# default ServiceAccount (token not mounted).
apiVersion: batch/v1
kind: Job
metadata:
  name: {{ printf "%s-migrate" (include "crm.componentName" .) | trunc 63 | trimSuffix "-" }}
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
      {{- include "crm.imagePullSecrets" $root | nindent 6 }}
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
            {{- include "crm.env" (dict "root" $root "name" .name "svc" $svc "component" "migrations" "proc" $proc "topo" $topo "procEnv" dict "extraOwned" dict) | nindent 12 }}
          resources:
            {{- toYaml $svc.migrations.resources | nindent 12 }}
          securityContext:
            {{- include "crm.containerSecurityContext" . | nindent 12 }}
          volumeMounts:
            {{- include "crm.tmpMount" . | nindent 12 }}
            {{- include "crm.mysqlTlsMount" (merge (dict "topo" $topo) .) | nindent 12 }}
      volumes:
        {{- include "crm.tmpVolume" . | nindent 8 }}
        {{- include "crm.mysqlTlsVolume" (merge (dict "topo" $topo) .) | nindent 8 }}
{{- end -}}


{{/* Labels of the sink Deployments the operator creates (crm_operator.builtin). */}}
{{- define "crm.operatorSinkLabels" -}}
app.kubernetes.io/name: crm-bilog-sink
app.kubernetes.io/managed-by: crm-operator
{{- end -}}

{{/*
NetworkPolicy of the built-in BI log sinks the operator creates in the release's
namespace (BILogSink target.builtin; crm_operator.builtin labels their pods): no ingress
but /metrics from the monitoring namespace (kubelet probes are always allowed), egress to
DNS, Kafka and the schema registry only.
*/}}
{{- define "crm.operatorSinkPolicy" -}}
{{- $g := .Values.global -}}
{{- $np := $g.networkPolicy -}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ printf "%s-operator-bilog-sinks" (include "crm.fullname" .) | trunc 63 | trimSuffix "-" }}
  labels:
    helm.sh/chart: {{ include "crm.chart" . }}
    app.kubernetes.io/instance: {{ .Release.Name }}
    app.kubernetes.io/part-of: crm
    app.kubernetes.io/managed-by: {{ .Release.Service }}
spec:
  podSelector:
    matchLabels:
      {{- include "crm.operatorSinkLabels" . | nindent 6 }}
  policyTypes:
    - Ingress
    - Egress
  ingress:
    - from:
        - namespaceSelector:
            matchLabels:
              kubernetes.io/metadata.name: {{ $np.metricsNamespace }}
      ports:
        - port: metrics
          protocol: TCP
  egress:
    # DNS
    - ports:
        - port: 53
          protocol: UDP
        - port: 53
          protocol: TCP
      {{- with $np.dnsPeers }}
      to:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    {{- $ports := list }}
    {{- range $g.kafka.bootstrapServers }}{{ $ports = append $ports (last (splitList ":" .)) }}{{ end }}
    {{- $ports = concat $ports ($g.kafka.brokerPorts | default list) }}
    {{- include "crm.externalEgress" (dict "ports" ($ports | uniq) "peers" $g.kafka.networkPolicyPeers) | nindent 4 }}
    {{- if $g.schemaRegistry.url }}
    {{- include "crm.externalEgress" (dict "ports" (list (include "crm.urlPort" $g.schemaRegistry.url)) "peers" $g.schemaRegistry.networkPolicyPeers) | nindent 4 }}
    {{- else if include "crm.enabled" (dict "root" . "key" "bilog/registry") }}
    - to:
        - podSelector:
            matchLabels:
              {{- include "crm.selectorLabels" (dict "root" . "name" "bilog" "component" "registry") | nindent 14 }}
      ports:
        - port: {{ .Values.bilog.registry.port }}
          protocol: TCP
    {{- end }}
{{- end -}}


{{/* "true" when a component exports traces: global.tracing on and a gRPC process (the crm_common server kit). */}}
{{- define "crm.traced" -}}
{{- if and .root.Values.global.tracing.enabled (eq .topo.protocol "grpc") -}}
true
{{- end -}}
{{- end -}}
