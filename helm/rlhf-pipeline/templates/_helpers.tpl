{{- define "rlhf.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "rlhf.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "rlhf.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* repository:tag, or repository:tag@digest when a digest is recorded (pull by digest). */}}
{{- define "rlhf.image" -}}
{{- if .digest -}}
{{- printf "%s:%s@%s" .repository .tag .digest -}}
{{- else -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}
{{- end -}}

{{- define "rlhf.runnerName" -}}
{{- default (printf "%s-runner" (include "rlhf.fullname" .)) .Values.runner.name -}}
{{- end -}}

{{- define "rlhf.mlflowUrl" -}}
{{- printf "http://%s-mlflow.%s.svc:%d" (include "rlhf.fullname" .) .Release.Namespace (int .Values.mlflow.port) -}}
{{- end -}}

{{/* The "restricted" Pod Security profile, pod level. */}}
{{- define "rlhf.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* ... and container level: nothing writable but the mounted emptyDirs. */}}
{{- define "rlhf.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "rlhf.authIni" -}}
{{- $pg := .Values.mlflow.backendStore -}}
[mlflow]
default_permission = {{ .Values.mlflow.auth.defaultPermission }}
database_uri = postgresql://{{ $pg.user }}@{{ $pg.host }}:{{ $pg.port }}/{{ .Values.mlflow.auth.database }}?sslmode={{ $pg.sslmode }}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
{{- end -}}

{{- define "rlhf.jobEnv" -}}
- name: HOME
  value: /tmp
{{- end -}}

{{- define "rlhf.jobMounts" -}}
- {name: tmp, mountPath: /tmp}
- {name: work, mountPath: /work}
- {name: settings, mountPath: /etc/rlhf-settings, readOnly: true}
- {name: kfp-token, mountPath: /var/run/secrets/kubeflow/pipelines, readOnly: true}
{{- end -}}
