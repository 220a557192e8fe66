{{/*
The live keys Secret as JSON ("{}" on first install, and whenever there is no cluster:
`helm template`, `--dry-run`). Kept alone in this file so the chart's tests can replace it
with a fixed answer and check that an upgrade keeps the generated keys.
*/}}
{{- define "opennebula.liveKeysSecret" -}}
{{- lookup "v1" "Secret" .Release.Namespace (include "opennebula.keysSecretName" .) | toJson -}}
{{- end -}}
