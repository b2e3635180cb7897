{{/* Names: <release>-seal, or fullnameOverride; each service is <fullname>-<component>. */}}
{{- define "seal.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "seal.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The three services, in the order they start (each needs the ones before it). */}}
{{- define "seal.components" -}}
{{- list "student" "auditor" "teacher" | toJson -}}
{{- end -}}

{{- define "seal.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "seal.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: seal
{{- end -}}

{{- define "seal.selectorLabels" -}}
app.kubernetes.io/name: {{ include "seal.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of one component; call with (dict "root" $ "component" "student"). */}}
{{- define "seal.componentLabels" -}}
{{ include "seal.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "seal.componentSelector" -}}
{{ include "seal.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "seal.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "seal.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* repository:tag or repository@digest; call with (dict "root" $ "image" .image). */}}
{{- define "seal.image" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}
{{- end -}}

{{/* gRPC and metrics ports of a component, read from the settings every pod reads. */}}
{{- define "seal.grpcPort" -}}
{{- index .root.Values.settings.services (printf "%s_port" .component) | int -}}
{{- end -}}

{{- define "seal.metricsPort" -}}
{{- index .root.Values.settings.services (printf "%s_metrics_port" .component) | int -}}
{{- end -}}

{{- define "seal.address" -}}
{{- printf "%s-%s.%s.svc:%d" (include "seal.fullname" .root) .component .root.Release.Namespace (include "seal.grpcPort" . | int) -}}
{{- end -}}

{{/* The gRPC service a component's readiness probe asks for. */}}
{{- define "seal.grpcService" -}}
{{- printf "seal.v1.%sService" (title .component) -}}
{{- end -}}

{{- define "seal.executor" -}}
{{- dig "student" "executor" "in_process" .Values.settings -}}
{{- end -}}

{{/* Environment every seal process of the release gets: the settings file, its own state
     directory, and what only the chart knows (listen on every interface, the Services' DNS names). */}}
{{- define "seal.env" -}}
- name: SEAL_CONFIG_FILE
  value: /etc/seal/seal.json
- name: SEAL_HOME
  value: /var/lib/seal
- name: SEAL_MODEL__CACHE_DIR
  value: /opt/seal/models
- name: SEAL_SERVICES__HOST
  value: 0.0.0.0
{{- range $component := include "seal.components" .root | fromJsonArray }}
- name: SEAL_SERVICES__{{ upper $component }}_ADDRESS
  value: {{ include "seal.address" (dict "root" $.root "component" $component) | quote }}
{{- end }}
- name: HOME
  value: /tmp
- name: PYTHONUNBUFFERED
  value: "1"
{{- end -}}

{{- define "seal.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.fsGroup }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "seal.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Refuse values that render but cannot work, with a message that names the fix. */}}
{{- define "seal.validate" -}}
{{- if eq (include "seal.executor" .) "kubernetes" -}}
{{- $p := .Values.components.student.persistence -}}
{{- if not $p.enabled -}}
{{- fail "settings.student.executor=kubernetes: training Jobs write adapters into the student's registry volume; set components.student.persistence.enabled=true" -}}
{{- end -}}
{{- if and (not $p.existingClaim) (not (has "ReadWriteMany" $p.accessModes)) -}}
{{- fail "settings.student.executor=kubernetes: training Jobs run on other nodes and write into the student's registry; set components.student.persistence.accessModes to [ReadWriteMany] (an RWX storage class), or an existingClaim that is RWX" -}}
{{- end -}}
{{- end -}}
{{- if eq .Values.auth.mode "tls" -}}
{{- range $component := include "seal.components" . | fromJsonArray -}}
{{- if not (index $.Values.auth.tlsSecrets $component) -}}
{{- fail (printf "auth.mode=tls: set auth.tlsSecrets.%s to the %s's kubernetes.io/tls Secret (tls.crt, tls.key, ca.crt), or use auth.mode=tokens" $component $component) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- range $component := include "seal.components" . | fromJsonArray -}}
{{- $c := index $.Values.components $component -}}
{{- if lt ($c.terminationGracePeriodSeconds | float64) ($.Values.settings.services.shutdown_grace_s | float64) -}}
{{- fail (printf "components.%s.terminationGracePeriodSeconds (%v) is below settings.services.shutdown_grace_s (%v): in-flight RPCs would be killed before their grace ends" $component $c.terminationGracePeriodSeconds $.Values.settings.services.shutdown_grace_s) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* What a student that trains in Kubernetes Jobs needs and only the chart knows, each set only
     where settings.student.kubernetes leaves it empty: the image (the student's own), the
     registry volume (the student's PVC) and the model volume. */}}
{{- define "seal.executorEnv" -}}
{{- $k := .Values.settings.student.kubernetes -}}
{{- $student := .Values.components.student -}}
{{- if not $k.image }}
- name: SEAL_STUDENT__KUBERNETES__IMAGE
  value: {{ include "seal.image" (dict "root" . "image" $student.image) | quote }}
{{- end }}
{{- if not $k.home_claim_name }}
- name: SEAL_STUDENT__KUBERNETES__HOME_CLAIM_NAME
  value: {{ default (printf "%s-student" (include "seal.fullname" .)) $student.persistence.existingClaim | quote }}
{{- end }}
{{- /* The release's instance label joins the user's, so the chart's NetworkPolicy selects the training pods. */}}
- name: SEAL_STUDENT__KUBERNETES__LABELS
  value: {{ merge (dict "app.kubernetes.io/instance" .Release.Name) $k.labels | toJson | quote }}
{{- if and (not $k.model_claim_name) .Values.model.existingClaim }}
- name: SEAL_STUDENT__KUBERNETES__MODEL_CLAIM_NAME
  value: {{ .Values.model.existingClaim | quote }}
- name: SEAL_STUDENT__KUBERNETES__MODEL_MOUNT_PATH
  value: {{ .Values.model.mountPath | quote }}
- name: SEAL_STUDENT__KUBERNETES__MODEL_SUB_PATH
  value: {{ .Values.model.subPath | quote }}
{{- end }}
{{- end -}}

{{- define "seal.executorNamespace" -}}
{{- default .Release.Namespace .Values.settings.student.kubernetes.namespace -}}
{{- end -}}

{{- define "seal.authSecret" -}}
{{- default (printf "%s-auth" (include "seal.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{/* Auth environment of one service (dict "root" $ "component" name): its principals file, its
     own identity token, its certificate, and its plaintext probe port. */}}
{{- define "seal.authEnv" -}}
{{- $auth := .root.Values.auth -}}
- name: SEAL_SERVICES__{{ upper .component }}_PROBE_PORT
  value: {{ $auth.probePort | quote }}
{{- if eq $auth.mode "insecure" }}
- name: SEAL_AUTH__INSECURE
  value: "true"
{{- else }}
- name: SEAL_AUTH__PRINCIPALS_FILE
  value: /etc/seal/auth/principals.yaml
- name: SEAL_AUTH__{{ upper .component }}_TOKEN_FILE
  value: /etc/seal/auth/token
{{- if eq $auth.mode "tls" }}
- name: SEAL_AUTH__TLS_CERT_FILE
  value: /etc/seal/tls/tls.crt
- name: SEAL_AUTH__TLS_KEY_FILE
  value: /etc/seal/tls/tls.key
- name: SEAL_AUTH__TLS_CA_FILE
  value: /etc/seal/tls/ca.crt
{{- else }}
- name: SEAL_AUTH__PLAINTEXT
  value: "true"
{{- end }}
{{- end }}
{{- end -}}
