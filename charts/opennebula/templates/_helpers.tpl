{{/* Chart name, or nameOverride. */}}
{{- define "opennebula.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Object name prefix. Kept to 52 characters so "<fullname>-headless" and the StatefulSet's
controller-revision-hash label stay within 63.
*/}}
{{- define "opennebula.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "opennebula.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select the front-end pod. */}}
{{- define "opennebula.selectorLabels" -}}
app.kubernetes.io/name: {{ include "opennebula.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Standard labels for every object. */}}
{{- define "opennebula.labels" -}}
helm.sh/chart: {{ include "opennebula.chart" . }}
{{ include "opennebula.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: opennebula
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* commonAnnotations block (empty when none), merged with the given extra annotations. */}}
{{- define "opennebula.annotations" -}}
{{- $all := merge (dict) (.extra | default dict) (.root.Values.commonAnnotations | default dict) -}}
{{- with $all -}}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end -}}
{{- end -}}

{{- define "opennebula.headlessServiceName" -}}
{{- printf "%s-headless" (include "opennebula.fullname" .) -}}
{{- end -}}

{{- define "opennebula.configMapName" -}}
{{- printf "%s-opennebula" (include "opennebula.fullname" .) -}}
{{- end -}}

{{- define "opennebula.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "opennebula.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret with the key material: existingSecret, or the chart-managed one. */}}
{{- define "opennebula.keysSecretName" -}}
{{- default (printf "%s-keys" (include "opennebula.fullname" .)) .Values.keys.existingSecret -}}
{{- end -}}

{{/* oned.conf HOSTNAME; also the name hypervisors connect to and pin in known_hosts. */}}
{{- define "opennebula.frontendHostname" -}}
{{- default (printf "%s.%s.svc" (include "opennebula.fullname" .) .Release.Namespace) .Values.frontend.hostname -}}
{{- end -}}

{{/* monitord.conf MONITOR_ADDRESS: the address hypervisors send monitoring messages to. */}}
{{- define "opennebula.monitorAddress" -}}
{{- include "opennebula.frontendHostname" . -}}
{{- end -}}

{{- define "opennebula.trustedUserCAKeys" -}}
{{- or (not (empty .Values.keys.trustedUserCAKeys)) .Values.keys.trustedUserCAKeysInSecret -}}
{{- end -}}

{{/* "registry/repository:tag@digest" */}}
{{- define "opennebula.image" -}}
{{- $ref := .image.repository -}}
{{- if .image.registry -}}
{{- $ref = printf "%s/%s" .image.registry .image.repository -}}
{{- end -}}
{{- if .image.digest -}}
{{- printf "%s@%s" $ref .image.digest -}}
{{- else -}}
{{- printf "%s:%s" $ref (toString (default .appVersion .image.tag)) -}}
{{- end -}}
{{- end -}}

{{- define "opennebula.sidecarImage" -}}
{{- include "opennebula.image" (dict "image" .Values.sidecar.image "appVersion" .Chart.AppVersion) -}}
{{- end -}}

{{- define "opennebula.frontendImage" -}}
{{- include "opennebula.image" (dict "image" .Values.frontend.image "appVersion" .Chart.AppVersion) -}}
{{- end -}}

{{/* Pod termination grace: explicit value, or the sidecar's drain time plus a margin. */}}
{{- define "opennebula.terminationGracePeriodSeconds" -}}
{{- $drain := int .Values.sidecar.shutdownGrace -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds -}}
{{- add $drain 15 -}}
{{- else -}}
{{- $grace := int .Values.terminationGracePeriodSeconds -}}
{{- if lt $grace $drain -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be >= sidecar.shutdownGrace (%d)" $grace $drain) -}}
{{- end -}}
{{- $grace -}}
{{- end -}}
{{- end -}}

{{/* Ports every Service carries; OpenNebula fixes both numbers. */}}
{{- define "opennebula.servicePorts" -}}
- name: ssh
  port: 22
  targetPort: ssh
  protocol: TCP
  {{- if and .nodePorts .nodePorts.ssh }}
  nodePort: {{ int .nodePorts.ssh }}
  {{- end }}
- name: monitord-tcp
  port: 4124
  targetPort: monitord-tcp
  protocol: TCP
  {{- if and .nodePorts .nodePorts.monitordTcp }}
  nodePort: {{ int .nodePorts.monitordTcp }}
  {{- end }}
- name: monitord-udp
  port: 4124
  targetPort: monitord-udp
  protocol: UDP
  {{- if and .nodePorts .nodePorts.monitordUdp }}
  nodePort: {{ int .nodePorts.monitordUdp }}
  {{- end }}
{{- end -}}

{{/* A list of key lines as a file: one per line, trailing newline, "" when empty. */}}
{{- define "opennebula.authorizedKeysFile" -}}
{{- range . }}
{{- trim . }}
{{ end -}}
{{- end -}}
