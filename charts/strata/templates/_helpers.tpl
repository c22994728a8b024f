{{/* Names, labels and images shared by every template. */}}

{{- define "strata.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "strata.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "strata.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* "repository:tag" of one entry of .Values.images; a tag is required (never latest). */}}
{{- define "strata.image" -}}
{{- $img := index .root.Values.images .name -}}
{{- if or (not $img.tag) (eq (toString $img.tag) "latest") -}}
{{- fail (printf "images.%s.tag must be a fixed version, not %q" .name (toString $img.tag)) -}}
{{- end -}}
{{- printf "%s:%s" $img.repository (toString $img.tag) -}}
{{- end -}}

{{- define "strata.nodeServiceAccount" -}}{{ include "strata.fullname" . }}-node{{- end -}}
{{- define "strata.controllerServiceAccount" -}}{{ include "strata.fullname" . }}-controller{{- end -}}

{{/* The Secret with the peer certificate (tls.crt, tls.key, ca.crt). */}}
{{- define "strata.peerTlsSecret" -}}
{{- .Values.peers.tls.existingSecret | default (printf "%s-peer-tls" (include "strata.fullname" .)) -}}
{{- end -}}

{{/* The name in the peer certificate, checked by every dialer (all nodes present one certificate). */}}
{{- define "strata.peerName" -}}{{ include "strata.fullname" . }}-peer.{{ .Release.Namespace }}.svc{{- end -}}

{{/* Where strata's pods find the peer Secret and their projected token. */}}
{{- define "strata.peerTlsDir" -}}/etc/strata/peer-tls{{- end -}}
{{- define "strata.peerTokenDir" -}}/var/run/secrets/strata{{- end -}}

{{/* Socket of the plugin on the host, as kubelet reaches it. */}}
{{- define "strata.pluginDir" -}}{{ .Values.kubeletDir }}/plugins/{{ .Values.driverName }}{{- end -}}

{{/* klog verbosity of the sidecars for .Values.logLevel. */}}
{{- define "strata.verbosity" -}}
{{- get (dict "debug" "5" "info" "2" "warning" "1" "error" "0") .Values.logLevel | default "2" -}}
{{- end -}}

{{/* The backup repository (backup.target), required when backups are on. */}}
{{- define "strata.backupTarget" -}}
{{- required "backup.target is required when backup.enabled is true: the registry repository snapshots are uploaded to, oci://HOST/REPOSITORY" .Values.backup.target -}}
{{- end -}}

{{/* Where the backup container finds the registry credentials ($DOCKER_CONFIG/config.json). */}}
{{- define "strata.backupRegistryDir" -}}/etc/strata/registry{{- end -}}

{{/* The Secret with the snapshot-metadata sidecar's certificate (tls.crt, tls.key). */}}
{{- define "strata.snapshotMetadataTlsSecret" -}}
{{- .Values.snapshotMetadata.tls.existingSecret | default (printf "%s-snapshot-metadata-tls" (include "strata.fullname" .)) -}}
{{- end -}}
