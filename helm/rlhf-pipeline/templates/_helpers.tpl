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
{{- printf "%s://%s-mlflow.%s.svc:%d" (ternary "https" "http" .Values.mlflow.tls.enabled) (include "rlhf.fullname" .) .Release.Namespace (int .Values.mlflow.port) -}}
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


{{/* Refuse (fail the render, naming the place) a value that carries a credential: a URI with a password, or a
token in a published shape. The same rules as rlhf_pipeline/secrets.py (tests/security checks they agree).
Call with (dict "where" "pipelineJob.parameters.x" "value" $v). */}}
{{- define "rlhf.refuseCredentials" -}}
{{- $text := toJson .value -}}
{{- if regexMatch `[A-Za-z][A-Za-z0-9+.\-]*://[^\s/@:?#"]*:[^\s/@?#"]*@` $text -}}
{{- fail (printf "%s holds a URI with a password: values and run parameters are readable by anyone who can read the release or the KFP UI; give the steps MLFLOW_TRACKING_USERNAME/PASSWORD from a Secret (pipelineJob.compileSettings.secrets)" .where) -}}
{{- end -}}
{{- if regexMatch `hf_[A-Za-z0-9]{30,}|gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,}|\b(AKIA|ASIA)[A-Z0-9]{16}\b|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}|\bsk-(proj-)?[A-Za-z0-9_-]{20,}|AIza[0-9A-Za-z_-]{35}|xox[abprs]-[A-Za-z0-9-]{10,}|-----BEGIN [A-Z ]*PRIVATE KEY-----|Bearer\s+[A-Za-z0-9._~+/-]{16,}` $text -}}
{{- fail (printf "%s holds a token: reference it from a Kubernetes Secret instead (pipelineJob.compileSettings.secrets)" .where) -}}
{{- end -}}
{{- end -}}

{{/* Plain env of the compile settings: a name that says "secret" is refused like in `rlhf compile`. */}}
{{- define "rlhf.refuseSecretEnv" -}}
{{- range $key, $value := . -}}
{{- if regexMatch `(?i)(^|_)(PASSWORD|PASSWD|PASS|PWD|SECRET|TOKEN|APIKEY|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIALS?)(_|$)|(^|_)KEY$` $key -}}
{{- fail (printf "pipelineJob.compileSettings.env.%s looks like a secret: reference a Kubernetes Secret under compileSettings.secrets" $key) -}}
{{- end -}}
{{- end -}}
{{- end -}}
