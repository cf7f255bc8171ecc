{{/*
Helpers shared by every template. The chart keeps to a small subset of Go templates and
Sprig on purpose, so that tests/helm/render.py can render it without a Helm binary.
*/}}

{{/* Chart name, overridable. */}}
{{- define "kipam.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Fully qualified app name: fullnameOverride, else the release name if it already contains the
chart name, else <release>-<chart>.
*/}}
{{- define "kipam.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "kipam.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "kipam.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "kipam.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | quote }}
{{ include "kipam.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Labels that select the server pods (never change them after install). */}}
{{- define "kipam.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kipam.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Service account the server pods run as. */}}
{{- define "kipam.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kipam.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
Secret holding the database and Redis URLs and the bootstrap token: existingSecret, or the one
this chart makes.
*/}}
{{- define "kipam.secretName" -}}
{{- default (include "kipam.fullname" .) .Values.existingSecret -}}
{{- end -}}

{{/*
Image reference: repository@digest when image.digest is set (the tag is then ignored), else
repository:tag, the tag defaulting to the chart's appVersion.
*/}}
{{- define "kipam.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
checkov skip annotations for the metadata of the Deployment and the migration Job: the checks
the chart fails on purpose, each with its reason (checkov reads `checkov.io/skipN: ID=reason`;
a reason must not contain "="). A conditional skip is rendered only while the values make its
check fail: a CPU limit, pullPolicy Always or an image digest turns it into a passing check.
1. CKV_K8S_35, secrets as files rather than environment variables: kipam reads
   KIPAM_DATABASE_URL, KIPAM_REDIS_URL and KIPAM_BOOTSTRAP_TOKEN from its environment only (it
   has no *_FILE variants), so they come from the Secret by secretKeyRef; the values never
   appear in the pod spec.
2. CKV_K8S_11, CPU limits: none on purpose. A CPU limit throttles the container by the CFS
   quota even while the node has idle CPU, which shows up as latency spikes on allocation
   calls; CPU requests are set (scheduling, the HPA's utilization) and memory is limited.
3. CKV_K8S_15, pullPolicy Always: IfNotPresent by default. With image.digest, or a release tag
   that is never re-pushed (the default tag is the chart's appVersion, never "latest"), the
   node's copy is the same image, and Always would make every pod start depend on the registry.
4. CKV_K8S_43, image digest: set image.digest to pin the image by content. The chart cannot
   ship a digest: the image is built from the repository's Dockerfile by whoever deploys it.
Called with (dict "root" $ "resources" <the container's resources>).
*/}}
{{- define "kipam.checkovSkips" -}}
checkov.io/skip1: "CKV_K8S_35=kipam reads its database URL, Redis URL and bootstrap token from environment variables only (no file variants); they come from the Secret by secretKeyRef"
{{- $limits := default (dict) .resources.limits }}
{{- if not $limits.cpu }}
checkov.io/skip2: "CKV_K8S_11=no CPU limit on purpose: CFS throttling adds latency while the node has idle CPU; CPU requests and a memory limit are set"
{{- end }}
{{- if ne .root.Values.image.pullPolicy "Always" }}
checkov.io/skip3: "CKV_K8S_15=IfNotPresent: the image is pinned by image.digest or a release tag that is never re-pushed; Always would make every pod start depend on the registry"
{{- end }}
{{- if not .root.Values.image.digest }}
checkov.io/skip4: "CKV_K8S_43=image.digest is not set: the chart cannot ship the digest of an image built from the repository's Dockerfile; set image.digest to pin it"
{{- end }}
{{- end -}}

{{/*
Environment shared by the server and the migration Job, so both see the same database.
*/}}
{{- define "kipam.env" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: KIPAM_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "kipam.secretName" . }}
      key: {{ .Values.secretKeys.databaseUrl }}
- name: KIPAM_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "kipam.secretName" . }}
      key: {{ .Values.secretKeys.redisUrl }}
      # Without a Redis URL kipam uses PostgreSQL advisory locks.
      optional: true
- name: KIPAM_BOOTSTRAP_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "kipam.secretName" . }}
      key: {{ .Values.secretKeys.bootstrapToken }}
      # The first admin token, stored by `kipam serve` unless known; not needed once the
      # database holds a live token.
      optional: true
- name: KIPAM_DATA_DIR
  # Unused with a real database; points at the writable emptyDir all the same.
  value: /tmp/kipam
- name: KIPAM_LOG_FORMAT
  value: {{ .Values.config.logFormat | quote }}
- name: KIPAM_LOG_LEVEL
  value: {{ .Values.config.logLevel | quote }}
- name: KIPAM_SHUTDOWN_GRACE_S
  value: {{ .Values.config.shutdownGraceSeconds | quote }}
- name: KIPAM_LOCK_TTL_S
  value: {{ .Values.config.lockTtlSeconds | quote }}
- name: KIPAM_LOCK_WAIT_S
  value: {{ .Values.config.lockWaitSeconds | quote }}
- name: KIPAM_DB_POOL_MIN
  value: {{ .Values.config.dbPoolMin | quote }}
- name: KIPAM_DB_POOL_MAX
  value: {{ .Values.config.dbPoolMax | quote }}
- name: KIPAM_STATEMENT_TIMEOUT_S
  value: {{ .Values.config.statementTimeoutSeconds | quote }}
- name: KIPAM_AUTH
  value: {{ .Values.config.auth | quote }}
- name: KIPAM_AUTH_CACHE_S
  value: {{ .Values.config.authCacheSeconds | quote }}
- name: KIPAM_RATE_LIMIT
  value: {{ .Values.config.rateLimit | quote }}
- name: KIPAM_RATE_BURST
  value: {{ .Values.config.rateBurst | quote }}
{{- if .Values.otel.enabled }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ required "otel.endpoint is required when otel.enabled is true" .Values.otel.endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ .Values.otel.protocol | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ .Values.otel.serviceName | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ .Values.otel.sampler | quote }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ .Values.otel.samplerArg | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  {{- if .Values.otel.resourceAttributes }}
  value: {{ printf "k8s.namespace.name=%s,k8s.pod.name=$(POD_NAME),%s" .Release.Namespace .Values.otel.resourceAttributes | quote }}
  {{- else }}
  value: {{ printf "k8s.namespace.name=%s,k8s.pod.name=$(POD_NAME)" .Release.Namespace | quote }}
  {{- end }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
A probe of the server container: the values' Probe object with kipam's check added, unless the
values give a check of their own (grpc, httpGet, tcpSocket or exec). The kubelet's gRPC probes
cannot speak TLS, so with tls.enabled every check is an HTTPS GET (the kubelet does not verify
the certificate, and REST never asks for a client certificate).
Called with (dict "root" $ "probe" <values> "path" <HTTP path> "grpc" <gRPC health without TLS>).
*/}}
{{- define "kipam.probe" -}}
{{- $probe := .probe -}}
{{- if not (or $probe.grpc $probe.httpGet $probe.tcpSocket $probe.exec) -}}
{{- if and .grpc (not .root.Values.tls.enabled) -}}
grpc:
  port: 50051
{{- else -}}
httpGet:
  path: {{ .path }}
  port: http
  {{- if .root.Values.tls.enabled }}
  scheme: HTTPS
  {{- end }}
{{- end }}
{{ end -}}
{{ toYaml $probe }}
{{- end -}}
