{{/* The stages, in the order a turn flows through them. */}}
{{- define "voicebus.stageNames" -}}
ingress stt llm tts egress
{{- end }}

{{/* The roles that join LiveKit rooms or mint tokens: only they get the LiveKit secret. */}}
{{- define "voicebus.livekitRoles" -}}
ingress egress token
{{- end }}

{{- define "voicebus.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release> when it already names the chart, else <release>-<chart>. */}}
{{- define "voicebus.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Labels of every object; "component" is the stage or "token". Call with (dict "root" $ "component" name). */}}
{{- define "voicebus.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: voicebus
{{ include "voicebus.selectorLabels" . }}
{{- end }}

{{- define "voicebus.selectorLabels" -}}
app.kubernetes.io/name: {{ include "voicebus.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "voicebus.componentName" -}}
{{- printf "%s-%s" (include "voicebus.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "voicebus.image" -}}
{{- printf "%s-%s:%s" .root.Values.image.repository .component (.root.Values.image.tag | default .root.Chart.AppVersion) }}
{{- end }}

{{/* The Secret holding a role's nkey seed (key <role>.nk). Call with (dict "root" $ "role" name). */}}
{{- define "voicebus.nkeySecret" -}}
{{- $prefix := .root.Values.nats.nkeys.secretPrefix | default (printf "%s-nkey" (include "voicebus.fullname" .root)) }}
{{- printf "%s-%s" $prefix .role }}
{{- end }}

{{/* Where the SIP gateway's trunks file is mounted (from the ConfigMap of sip.config). */}}
{{- define "voicebus.sipConfigPath" -}}
/etc/voicebus/sip/trunks.toml
{{- end }}

{{- define "voicebus.livekitSecret" -}}
{{- .Values.livekit.existingSecret | default (printf "%s-livekit" (include "voicebus.fullname" .)) }}
{{- end }}

{{/*
The grace period must cover the preStop sleep, the shutdown grace and 5 s for the handover and
the drain (docs/operations.md); less would SIGKILL a replica mid-handover. Call with
(dict "root" $ "component" name "values" componentValues).
*/}}
{{- define "voicebus.checkGrace" -}}
{{- $need := add (int .values.preStopSleepSeconds) (int (ceil .root.Values.shutdownGraceSeconds)) 5 }}
{{- if lt (int .values.terminationGracePeriodSeconds) (int $need) }}
{{- fail (printf "%s: terminationGracePeriodSeconds %v is too short: the handover needs preStopSleepSeconds + shutdownGraceSeconds + 5 = %v" .component .values.terminationGracePeriodSeconds $need) }}
{{- end }}
{{- end }}

{{/*
The pod template of a stage, the token service or the SIP gateway. Call with
(dict "root" $ "component" name "values" componentValues "ports" list "readiness" probe), and
optionally "metricsPort" (instead of metrics.port), "hostNetwork" true (the node's network:
each port is the node's too), "annotations", "volumes" and "volumeMounts" (extra ones).
A port is (dict "name" n "port" p), with "protocol" UDP where it is not TCP.
*/}}
{{- define "voicebus.podTemplate" -}}
{{- $root := .root }}
{{- $v := .values }}
{{- $component := .component }}
{{- $hostNetwork := .hostNetwork | default false }}
{{- $metricsPort := int (.metricsPort | default $root.Values.metrics.port) -}}
metadata:
  labels:
    {{- include "voicebus.selectorLabels" . | nindent 4 }}
  annotations:
    {{- if $root.Values.metrics.podAnnotations }}
    prometheus.io/scrape: "true"
    prometheus.io/port: {{ $metricsPort | quote }}
    prometheus.io/path: /metrics
    {{- end }}
    {{- with .annotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- with $v.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  # The services never call the Kubernetes API.
  automountServiceAccountToken: false
  {{- if $hostNetwork }}
  hostNetwork: true
  # Cluster names (the NATS Service) still resolve on the node's network.
  dnsPolicy: ClusterFirstWithHostNet
  {{- end }}
  terminationGracePeriodSeconds: {{ int $v.terminationGracePeriodSeconds }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $root.Values.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if $root.Values.topologySpread.enabled }}
  topologySpreadConstraints:
    - maxSkew: 1
      topologyKey: {{ $root.Values.topologySpread.topologyKey }}
      whenUnsatisfiable: ScheduleAnyway
      labelSelector:
        matchLabels:
          {{- include "voicebus.selectorLabels" . | nindent 10 }}
  {{- end }}
  {{- with $v.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ $component }}
      image: {{ include "voicebus.image" . }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      {{- with $root.Values.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      ports:
        - name: metrics
          containerPort: {{ $metricsPort }}
          {{- if $hostNetwork }}
          hostPort: {{ $metricsPort }}
          {{- end }}
          protocol: TCP
        {{- range .ports }}
        - name: {{ .name }}
          containerPort: {{ .port }}
          {{- if $hostNetwork }}
          hostPort: {{ .port }}
          {{- end }}
          protocol: {{ .protocol | default "TCP" }}
        {{- end }}
      env:
        {{- include "voicebus.env" . | nindent 8 }}
      # /readyz: 200 once a stage joined $SRV discovery (the gateway: listens for SIP) and while
      # its bus connection is up; 503 while it drains. /healthz: 200 while the process serves.
      readinessProbe:
        {{- toYaml .readiness | nindent 8 }}
        periodSeconds: 5
        timeoutSeconds: 2
        failureThreshold: 2
      livenessProbe:
        httpGet:
          path: /healthz
          port: metrics
        periodSeconds: 10
        timeoutSeconds: 5
        failureThreshold: 6
      {{- if gt (int $v.preStopSleepSeconds) 0 }}
      lifecycle:
        preStop:
          sleep:
            seconds: {{ int $v.preStopSleepSeconds }}
      {{- end }}
      {{- with $v.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        - name: cache
          mountPath: /var/cache/voicebus
        {{- if $root.Values.nats.nkeys.enabled }}
        - name: nkey
          mountPath: /etc/voicebus/nkey
          readOnly: true
        {{- if and (eq $component "token") $root.Values.token.sessionPages }}
        - name: nkey-pages
          mountPath: /etc/voicebus/nkey-pages
          readOnly: true
        {{- end }}
        {{- end }}
        {{- if $root.Values.nats.tls.enabled }}
        - name: nats-tls
          mountPath: /etc/voicebus/nats-tls
          readOnly: true
        {{- end }}
        {{- with .volumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: tmp
      emptyDir: {}
    - name: cache
      emptyDir: {}
    {{- if $root.Values.nats.nkeys.enabled }}
    # This role's seed and no other role's (docs/security.md).
    - name: nkey
      secret:
        secretName: {{ include "voicebus.nkeySecret" (dict "root" $root "role" $component) }}
        defaultMode: 0440
        items:
          - key: {{ $component }}.nk
            path: {{ $component }}.nk
    {{- if and (eq $component "token") $root.Values.token.sessionPages }}
    - name: nkey-pages
      secret:
        secretName: {{ include "voicebus.nkeySecret" (dict "root" $root "role" "pages") }}
        defaultMode: 0440
        items:
          - key: pages.nk
            path: pages.nk
    {{- end }}
    {{- end }}
    {{- if $root.Values.nats.tls.enabled }}
    - name: nats-tls
      secret:
        secretName: {{ required "nats.tls.secretName is required when nats.tls.enabled" $root.Values.nats.tls.secretName }}
        defaultMode: 0440
    {{- end }}
    {{- with .volumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/* The environment of a service: the bus, its identity, LiveKit where needed, its own settings. */}}
{{- define "voicebus.env" -}}
{{- $root := .root }}
{{- $v := .values }}
{{- $component := .component -}}
- name: HOME
  value: /tmp
- name: VOICEBUS_NATS_URL
  value: {{ join "," $root.Values.nats.urls | quote }}
- name: VOICEBUS_METRICS_PORT
  value: {{ .metricsPort | default $root.Values.metrics.port | quote }}
{{- if .hostNetwork }}
{{- /* On the node's network 0.0.0.0 would be every address of the node, public ones too: the
pod's address is the node's cluster address, which the probes and Prometheus use. */}}
- name: VOICEBUS_METRICS_ADDR
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- else }}
- name: VOICEBUS_METRICS_ADDR
  value: 0.0.0.0
{{- end }}
{{- if ne $component "sip" }}
{{- /* The gateway keeps nothing in JetStream, hangs up in a fixed 5 s and has no model. */}}
- name: VOICEBUS_JS_REPLICAS
  value: {{ $root.Values.nats.jetstreamReplicas | quote }}
- name: VOICEBUS_SHUTDOWN_GRACE
  value: {{ $root.Values.shutdownGraceSeconds | quote }}
- name: VOICEBUS_WHISPER_CACHE
  value: /var/cache/voicebus
{{- end }}
{{- if $root.Values.nats.nkeys.enabled }}
- name: VOICEBUS_NATS_NKEY_FILE
  value: /etc/voicebus/nkey/{{ $component }}.nk
{{- end }}
{{- if $root.Values.nats.tls.enabled }}
- name: VOICEBUS_NATS_TLS_CA
  value: /etc/voicebus/nats-tls/ca.crt
{{- if $root.Values.nats.tls.clientCert }}
- name: VOICEBUS_NATS_TLS_CERT
  value: /etc/voicebus/nats-tls/tls.crt
- name: VOICEBUS_NATS_TLS_KEY
  value: /etc/voicebus/nats-tls/tls.key
{{- end }}
{{- end }}
{{- with $root.Values.otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- if has $component (splitList " " (include "voicebus.livekitRoles" $root)) }}
- name: LIVEKIT_URL
  value: {{ $root.Values.livekit.url | quote }}
- name: LIVEKIT_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "voicebus.livekitSecret" $root }}
      key: {{ $root.Values.livekit.apiKeyKey }}
- name: LIVEKIT_API_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "voicebus.livekitSecret" $root }}
      key: {{ $root.Values.livekit.apiSecretKey }}
{{- end }}
{{- if eq $component "token" }}
- name: VOICEBUS_TOKEN_HOST
  value: 0.0.0.0
- name: VOICEBUS_TOKEN_PORT
  value: {{ $v.port | quote }}
{{- with $v.livekitPublicUrl }}
- name: VOICEBUS_LIVEKIT_PUBLIC_URL
  value: {{ . | quote }}
{{- end }}
{{- with $v.authorize }}
- name: VOICEBUS_TOKEN_AUTHORIZE
  value: {{ . | quote }}
{{- end }}
{{- with $v.trustedProxies }}
- name: VOICEBUS_TOKEN_TRUSTED_PROXIES
  value: {{ . | quote }}
{{- end }}
{{- with $v.corsOrigins }}
- name: VOICEBUS_TOKEN_CORS_ORIGINS
  value: {{ . | quote }}
{{- end }}
{{- if $v.sessionPages }}
- name: VOICEBUS_SESSION_PAGES
  value: "true"
{{- if $root.Values.nats.nkeys.enabled }}
- name: VOICEBUS_SESSION_PAGES_NKEY_FILE
  value: /etc/voicebus/nkey-pages/pages.nk
{{- end }}
{{- end }}
{{- end }}
{{- if eq $component "sip" }}
- name: VOICEBUS_SIP_LISTEN
  value: {{ printf "0.0.0.0:%d" (int $v.port) | quote }}
- name: VOICEBUS_SIP_TRANSPORTS
  value: {{ $v.transports | quote }}
- name: VOICEBUS_SIP_RTP_PORTS
  value: {{ $v.rtpPorts | quote }}
- name: VOICEBUS_SIP_CONFIG
  value: {{ include "voicebus.sipConfigPath" $root }}
{{- if $v.externalHost }}
- name: VOICEBUS_SIP_EXTERNAL_HOST
  value: {{ $v.externalHost | quote }}
{{- else if .hostNetwork }}
{{- /* The node's address as the cluster knows it (its InternalIP, else ExternalIP). */}}
- name: VOICEBUS_SIP_EXTERNAL_HOST
  valueFrom:
    fieldRef:
      fieldPath: status.hostIP
{{- end }}
{{- end }}
{{- range $name, $value := merge (dict) ($v.env | default dict) $root.Values.env }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- range $v.secretEnv }}
- name: {{ required "secretEnv: each entry needs a name" .name }}
  valueFrom:
    secretKeyRef:
      name: {{ required (printf "secretEnv %s: the secret's name is required" .name) .secret }}
      key: {{ required (printf "secretEnv %s: the key is required" .name) .key }}
{{- end }}
{{- end }}
