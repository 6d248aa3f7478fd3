{{/* Chart name, truncated to 63 characters (DNS label). */}}
{{- define "egress-guard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Fully qualified app name: the release name, with the chart name appended unless the release
name already contains it. Truncated to 52 characters so that suffixes such as "-gateway" and
"-selfsigned-issuer" keep names within 63.
*/}}
{{- define "egress-guard.fullname" -}}
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

{{- define "egress-guard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object; pass (dict "ctx" $ "component" "controller"). */}}
{{- define "egress-guard.labels" -}}
helm.sh/chart: {{ include "egress-guard.chart" .ctx }}
{{ include "egress-guard.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Values.image.tag | default .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: egress-guard
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels; pass (dict "ctx" $ "component" "controller"). */}}
{{- define "egress-guard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "egress-guard.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end -}}

{{- define "egress-guard.controllerName" -}}
{{- include "egress-guard.fullname" . -}}
{{- end -}}

{{- define "egress-guard.gatewayName" -}}
{{- printf "%s-gateway" (include "egress-guard.fullname" .) -}}
{{- end -}}

{{- define "egress-guard.policyName" -}}
{{- printf "%s-policy" (include "egress-guard.fullname" .) -}}
{{- end -}}

{{- define "egress-guard.tlsSecretName" -}}
{{- printf "%s-tls" (include "egress-guard.fullname" .) -}}
{{- end -}}

{{/* The control plane's ClusterRole (and the webhook configuration's name). Cluster-scoped,
so it carries the namespace: two releases of the same name in two namespaces do not collide. */}}
{{- define "egress-guard.clusterRoleName" -}}
{{- printf "%s-%s" (include "egress-guard.fullname" .) .Release.Namespace | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The gateway's ClusterRole (TokenReviews only): <fullname>-gateway-<namespace>. */}}
{{- define "egress-guard.gatewayClusterRoleName" -}}
{{- printf "%s-%s" (include "egress-guard.gatewayName" .) .Release.Namespace | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The control plane's in-cluster DNS name, the serving certificate's subject. */}}
{{- define "egress-guard.controllerHost" -}}
{{- printf "%s.%s.svc" (include "egress-guard.controllerName" .) .Release.Namespace -}}
{{- end -}}

{{/* The proxy image (Dockerfile.sidecar): the gateway and the injected sidecar. */}}
{{- define "egress-guard.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) -}}
{{- end -}}

{{/* The control plane's image (Dockerfile.controller). */}}
{{- define "egress-guard.controllerImage" -}}
{{- $img := .Values.controller.image -}}
{{- printf "%s:%s" $img.repository ($img.tag | default .Chart.AppVersion | toString) -}}
{{- end -}}

{{/*
GOMEMLIMIT for a container; pass (dict "explicit" .goMemLimit "resources" .resources).
"off": none (prints nothing). A non-empty value: used as is. Empty: 80 % of
resources.limits.memory, in bytes (Go reads a plain number as bytes), so the garbage collector
works harder before the container reaches its limit instead of letting the heap double.
The limit must be an integer with an optional k, M, G, T, Ki, Mi, Gi or Ti suffix; no limit:
no GOMEMLIMIT.
*/}}
{{- define "egress-guard.goMemLimit" -}}
{{- $explicit := .explicit | default "" | toString -}}
{{- if eq $explicit "off" -}}
{{- else if $explicit -}}
{{- $explicit -}}
{{- else -}}
{{- $lim := "" -}}
{{- with .resources }}{{ with .limits }}{{ with .memory }}{{ $lim = toString . }}{{ end }}{{ end }}{{ end -}}
{{- if $lim -}}
{{- if not (regexMatch "^[0-9]+(k|M|G|T|Ki|Mi|Gi|Ti)?$" $lim) -}}
{{- fail (printf "cannot derive GOMEMLIMIT from resources.limits.memory %q: write it as an integer with k, M, G, T, Ki, Mi, Gi or Ti, or set goMemLimit" $lim) -}}
{{- end -}}
{{- $num := regexFind "^[0-9]+" $lim | int64 -}}
{{- $unit := regexReplaceAll "^[0-9]+" $lim "" -}}
{{- $mult := get (dict "none" 1 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776) (default "none" $unit) -}}
{{- div (mul $num $mult 80) 100 -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
The control plane's serving certificate and CA, base64-encoded, as JSON
{"ca": ..., "crt": ..., "key": ...}. Computed once per render (memoised in .Values, so the
Secret and the webhook's caBundle agree) from, in order: the existing Secret (lookup: kept
across upgrades), else a new CA and a certificate for <svc>.<ns>.svc signed by it.
*/}}
{{- define "egress-guard.tls" -}}
{{- if not (hasKey .Values "__egressGuardTLS") -}}
{{- $name := include "egress-guard.tlsSecretName" . -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace $name -}}
{{- $data := dict -}}
{{- if $existing -}}{{- $data = $existing.data | default dict -}}{{- end -}}
{{- $tls := dict -}}
{{- if and (index $data "ca.crt") (index $data "tls.crt") (index $data "tls.key") -}}
{{- $tls = dict "ca" (index $data "ca.crt") "crt" (index $data "tls.crt") "key" (index $data "tls.key") -}}
{{- else -}}
{{- $svc := include "egress-guard.controllerName" . -}}
{{- $host := include "egress-guard.controllerHost" . -}}
{{- $days := int .Values.tls.validityDays -}}
{{- $ca := genCA (printf "%s-ca" (include "egress-guard.fullname" .)) $days -}}
{{- $sans := list $host (printf "%s.%s" $svc .Release.Namespace) (printf "%s.cluster.local" $host) -}}
{{- $cert := genSignedCert $host nil $sans $days $ca -}}
{{- $tls = dict "ca" ($ca.Cert | b64enc) "crt" ($cert.Cert | b64enc) "key" ($cert.Key | b64enc) -}}
{{- end -}}
{{- $_ := set .Values "__egressGuardTLS" $tls -}}
{{- end -}}
{{- toJson (get .Values "__egressGuardTLS") -}}
{{- end -}}

{{/* Pod securityContext shared by the control plane and the gateway. */}}
{{- define "egress-guard.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 15337
runAsGroup: 15337
fsGroup: 15337
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "egress-guard.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* topologySpreadConstraints with the component's labelSelector filled in where missing;
pass (dict "ctx" $ "component" "controller" "constraints" list). */}}
{{- define "egress-guard.topologySpread" -}}
{{- $sel := include "egress-guard.selectorLabels" (dict "ctx" .ctx "component" .component) | fromYaml -}}
{{- range .constraints }}
- {{ merge (deepCopy .) (dict "labelSelector" (dict "matchLabels" $sel)) | toYaml | nindent 2 | trim }}
{{- end }}
{{- end -}}

{{/* "cpu=20m,memory=32Mi" from a resource list (the controller's INJECT_SIDECAR_RESOURCES). */}}
{{- define "egress-guard.resourceList" -}}
{{- $out := list -}}
{{- range $k, $v := . -}}
{{- $out = append $out (printf "%s=%v" $k $v) -}}
{{- end -}}
{{- join "," $out -}}
{{- end -}}
