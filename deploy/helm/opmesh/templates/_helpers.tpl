{{/* Labels on every object: what it is part of, and Helm's bookkeeping. */}}
{{- define "opmesh.labels" -}}
app.kubernetes.io/part-of: opmesh
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* An image reference: opmesh.image (list . "opmesh-manager"). */}}
{{- define "opmesh.image" -}}
{{- $root := index . 0 -}}
{{- $name := index . 1 -}}
{{- with $root.Values.image.registry }}{{ . }}/{{ end }}{{ $name }}:{{ $root.Values.image.tag | default $root.Chart.AppVersion }}
{{- end -}}

{{/* The manager Service's in-cluster DNS name. */}}
{{- define "opmesh.serviceHost" -}}
opmesh-manager.{{ .Release.Namespace }}.svc
{{- end -}}
