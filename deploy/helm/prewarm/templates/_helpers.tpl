{{/*
Chart name, overridable with nameOverride. Cut to 63 characters (a label value).
*/}}
{{- define "prewarm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Full name used for the release's objects: fullnameOverride, else the release name when
it already contains the chart name, else "<release>-<chart>". Cut to 63 characters
because it is also the Service name, a DNS-1035 label.
*/}}
{{- define "prewarm.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
"<name>-<version>" for the helm.sh/chart label.
*/}}
{{- define "prewarm.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Selector labels: only the ones that never change over the release's life, because a
Deployment's selector is immutable. Call with (dict "context" $ "component" "observer").
*/}}
{{- define "prewarm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "prewarm.name" .context }}
app.kubernetes.io/instance: {{ .context.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/*
Labels common to every object but the component: version, manager and chart.
*/}}
{{- define "prewarm.commonLabels" -}}
app.kubernetes.io/version: {{ .Chart.AppVersion | replace "+" "_" | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ include "prewarm.chart" . }}
{{- end -}}

{{/*
Full label set of an object. Call with (dict "context" $ "component" "observer").
*/}}
{{- define "prewarm.labels" -}}
{{ include "prewarm.selectorLabels" . }}
{{ include "prewarm.commonLabels" .context }}
{{- end -}}

{{/*
Object names derived from the full name.
*/}}
{{- define "prewarm.serviceName" -}}
{{- include "prewarm.fullname" . -}}
{{- end -}}

{{- define "prewarm.tlsSecretName" -}}
{{- printf "%s-tls" (include "prewarm.fullname" .) -}}
{{- end -}}

{{- define "prewarm.caName" -}}
{{- printf "%s-ca" (include "prewarm.fullname" .) -}}
{{- end -}}

{{/*
The webhook configurations are named after the release itself (`<release>-observe`, as
DESIGN.md fixes it), not the full name: cluster-scoped, they are what an operator looks
for in `kubectl get validatingwebhookconfigurations`. fullnameOverride names them too,
for two releases of one name in different namespaces.
*/}}
{{- define "prewarm.validatingWebhookName" -}}
{{- printf "%s-observe" (.Values.fullnameOverride | default .Release.Name) -}}
{{- end -}}

{{- define "prewarm.mutatingWebhookName" -}}
{{- printf "%s-mutate" (.Values.fullnameOverride | default .Release.Name) -}}
{{- end -}}

{{/*
ServiceAccount names, one identity per component.
*/}}
{{- define "prewarm.serviceAccountName.observer" -}}
{{- if .Values.observer.serviceAccount.create -}}
{{- default (printf "%s-observer" (include "prewarm.fullname" .)) .Values.observer.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.observer.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "prewarm.serviceAccountName.reconciler" -}}
{{- if .Values.reconciler.serviceAccount.create -}}
{{- default (printf "%s-reconciler" (include "prewarm.fullname" .)) .Values.reconciler.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.reconciler.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "prewarm.serviceAccountName.certs" -}}
{{- printf "%s-certs" (include "prewarm.fullname" .) -}}
{{- end -}}

{{/*
Prewarm's own image reference (also the reconciler's PREWARM_HELPER_IMAGE).
*/}}
{{- define "prewarm.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
Namespaces the webhooks never call the observer for: the control plane's own, the
release namespace (Prewarm never learns its own pods) and learning.excludeNamespaces.
*/}}
{{- define "prewarm.excludedNamespaces" -}}
{{- $excluded := concat (list "kube-system" "kube-node-lease" .Release.Namespace) .Values.learning.excludeNamespaces | uniq -}}
{{- toYaml $excluded -}}
{{- end -}}

{{/*
Environment shared by the observer and the reconciler: where the state lives, logging,
and the learned-set settings (both writers must agree on what may be learned).
*/}}
{{- define "prewarm.commonEnv" -}}
- name: PREWARM_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: PREWARM_CONFIGMAP
  value: {{ .Values.learnedImagesConfigMap | quote }}
- name: PREWARM_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
- name: PREWARM_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
- name: PREWARM_ALLOW
  value: {{ join "," .Values.learning.allow | quote }}
- name: PREWARM_DENY
  value: {{ join "," .Values.learning.deny | quote }}
- name: PREWARM_MAX_IMAGES
  value: {{ .Values.learning.maxImages | int64 | quote }}
- name: PREWARM_MAX_IMAGES_PER_NAMESPACE
  value: {{ .Values.learning.maxImagesPerNamespace | int64 | quote }}
- name: PREWARM_IMAGE_TTL
  value: {{ .Values.learning.imageTTL | quote }}
- name: PREWARM_EXCLUDE_NAMESPACES
  value: {{ join "," .Values.learning.excludeNamespaces | quote }}
{{- end -}}

{{/*
Volumes every Prewarm container needs with a read-only root filesystem.
*/}}
{{- define "prewarm.tmpVolume" -}}
- name: tmp
  emptyDir:
    medium: Memory
    sizeLimit: 64Mi
{{- end -}}

{{/*
Comma-separated names of prepuller.imagePullSecrets, then imagePullSecrets
(PREWARM_IMAGE_PULL_SECRETS): the pre-pull pods also run Prewarm's own image (the
helper container), so the secrets that pull it for the chart's pods pull it there too.
*/}}
{{- define "prewarm.prepullerPullSecretNames" -}}
{{- $names := list -}}
{{- range concat .Values.prepuller.imagePullSecrets .Values.imagePullSecrets -}}
{{- $names = append $names .name -}}
{{- end -}}
{{- join "," ($names | uniq) -}}
{{- end -}}

{{/*
Seconds in a duration as the settings read it (`90`, `90s`, `15m`, `12h`, `30d`).
*/}}
{{- define "prewarm.seconds" -}}
{{- $text := toString . -}}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" $text -}}
{{- $unit := trimPrefix $number $text -}}
{{- $scale := get (dict "" 1 "s" 1 "m" 60 "h" 3600 "d" 86400) $unit -}}
{{- mulf (float64 $number) $scale -}}
{{- end -}}

{{/*
Checks across values that the schema cannot express, so that `helm install` or
`helm upgrade` refuses them instead of pods failing at start (webhook/settings.py
checks the same).
*/}}
{{- define "prewarm.checks" -}}
{{- $ttl := include "prewarm.seconds" .Values.learning.imageTTL | float64 -}}
{{- $resync := include "prewarm.seconds" .Values.prepuller.resyncPeriod | float64 -}}
{{- if le $resync 0.0 -}}
{{- fail (printf "prepuller.resyncPeriod (%s) must be more than 0" (toString .Values.prepuller.resyncPeriod)) -}}
{{- end -}}
{{- if le $ttl (addf 21600 $resync) -}}
{{- fail (printf "learning.imageTTL (%s) must be longer than 6h (how often a running image's lastSeen is refreshed) plus prepuller.resyncPeriod (%s): an image in use would expire between two refreshes" (toString .Values.learning.imageTTL) (toString .Values.prepuller.resyncPeriod)) -}}
{{- end -}}
{{- end -}}
