{{/* The --store value built from relay.store's sentinel or cluster hosts, or its redisUrl;
empty when existingSecret holds it or the store is memory. */}}
{{- define "mailroute.storeUrl" -}}
{{- $s := .Values.relay.store -}}
{{- $tls := ternary "s" "" $s.tls -}}
{{- if and $s.sentinel.hosts $s.cluster.hosts -}}
{{- fail "relay.store: set sentinel.hosts or cluster.hosts, not both" -}}
{{- end -}}
{{- if and (or $s.sentinel.hosts $s.cluster.hosts) (or $s.redisUrl $s.existingSecret.name) -}}
{{- fail "relay.store: sentinel.hosts or cluster.hosts replace redisUrl and existingSecret; set one" -}}
{{- end -}}
{{- if $s.sentinel.hosts -}}
redis{{ $tls }}-sentinel://{{ join "," $s.sentinel.hosts }}/{{ $s.sentinel.masterName }}/{{ $s.sentinel.db }}
{{- else if $s.cluster.hosts -}}
redis{{ $tls }}-cluster://{{ join "," $s.cluster.hosts }}
{{- else -}}
{{ $s.redisUrl }}
{{- end -}}
{{- end -}}

{{/* The shared store's address and passwords as environment entries (relay and operator). */}}
{{- define "mailroute.storeEnv" -}}
{{- $storeUrl := include "mailroute.storeUrl" . }}
{{- if .Values.relay.store.existingSecret.name }}
- name: MAILROUTE_STORE
  valueFrom:
    secretKeyRef: {name: {{ .Values.relay.store.existingSecret.name }}, key: {{ .Values.relay.store.existingSecret.key }}}
{{- else if $storeUrl }}
- {name: MAILROUTE_STORE, value: {{ $storeUrl | quote }}}
{{- end }}
{{- with .Values.relay.store.sentinelPassword.existingSecret }}
{{- if .name }}
- name: MAILROUTE_STORE_SENTINEL_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ .name }}, key: {{ .key }}}
{{- end }}
{{- end }}
{{- end -}}

{{/* The store password file: the argument, the mount and the volume (relay and operator). */}}
{{- define "mailroute.storePasswordArg" -}}
{{- if .Values.relay.store.password.existingSecret.name }}
- --store-password-file=/etc/mailroute/store-password/{{ .Values.relay.store.password.existingSecret.key }}
{{- end }}
{{- end -}}
{{- define "mailroute.storePasswordMount" -}}
{{- if .Values.relay.store.password.existingSecret.name }}
- {name: store-password, mountPath: /etc/mailroute/store-password, readOnly: true}
{{- end }}
{{- end -}}
{{- define "mailroute.storePasswordVolume" -}}
{{- with .Values.relay.store.password.existingSecret }}
{{- if .name }}
- name: store-password
  secret: {secretName: {{ .name }}, items: [{key: {{ .key }}, path: {{ .key }}}]}
{{- end }}
{{- end }}
{{- end -}}

{{- define "mailroute.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "mailroute.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "mailroute.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "mailroute.configNamespace" -}}
{{ .Values.relay.configNamespace | default .Release.Namespace }}
{{- end -}}

{{- define "mailroute.relaySelector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: relay
{{- end -}}

{{- define "mailroute.operatorSelector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/*
A pod's own annotations and extra labels (operator.* or relay.* values as the argument),
under its template's metadata, after the selector labels.
*/}}
{{- define "mailroute.podLabels" -}}
{{- with .podLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "mailroute.podAnnotations" -}}
{{- with .podAnnotations }}
annotations: {{ toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Where a pod runs (operator.* or relay.* values as the argument): priority, spread, node
selection, tolerations and affinity.
*/}}
{{- define "mailroute.podPlacement" -}}
{{- with .priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .topologySpreadConstraints }}
topologySpreadConstraints: {{ toYaml . | nindent 2 }}
{{- end }}
{{- with .nodeSelector }}
nodeSelector: {{ toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations: {{ toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity: {{ toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Whether the relays share a store (one Redis, Sentinel, Cluster, or a URL from a Secret):
"true" or "".
*/}}
{{- define "mailroute.sharedStore" -}}
{{- if or (include "mailroute.storeUrl" .) .Values.relay.store.existingSecret.name }}true{{ end }}
{{- end }}

{{/*
Whether more than one relay may run: "true" or "".
*/}}
{{- define "mailroute.manyRelays" -}}
{{- if or .Values.relay.autoscaling.enabled (gt (int .Values.relay.replicas) 1) }}true{{ end }}
{{- end }}
