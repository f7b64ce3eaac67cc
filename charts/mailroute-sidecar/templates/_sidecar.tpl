{{- /*
Sidecar mode: the relay as a container next to an application, listening on localhost.
A library chart: add it to an application chart's dependencies, then in a pod's containers:

  {{- include "mailroute.sidecar" (dict
        "image" "ghcr.io/mailroute/mailroute:0.1.0"
        "hostname" "app.example.com"
        "source" (list "--configmap=mail/mailroute-relay-config")) | nindent 8 }}

"source" is where the configuration comes from: --configmap (the operator's objects; the pod's
service account then needs the relay Role of relay.yaml), or --manifests=/etc/mailroute with a
ConfigMap of manifests mounted there. "port" (default 2525) is the loopback port the
application sends to.
*/ -}}
{{- define "mailroute.sidecar" -}}
- name: mailroute-relay
  image: {{ required "mailroute.sidecar: image" .image }}
  command: [/usr/local/bin/mailroute-relay]
  args:
    - --smtp=127.0.0.1:{{ .port | default 2525 }}
    - --hostname={{ required "mailroute.sidecar: hostname" .hostname }}
    - --admin=127.0.0.1:{{ .adminPort | default 9091 }}
    {{- range (required "mailroute.sidecar: source" .source) }}
    - {{ . }}
    {{- end }}
  env:
    - {name: MAILROUTE_LOG_FORMAT, value: json}
  readinessProbe:
    httpGet: {host: 127.0.0.1, path: /readyz, port: {{ .adminPort | default 9091 }}}
  resources:
    requests: {cpu: 20m, memory: 32Mi}
    limits: {memory: 256Mi}
  securityContext: {runAsNonRoot: true, runAsUser: 65532, allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {drop: [ALL]}}
{{- end -}}
