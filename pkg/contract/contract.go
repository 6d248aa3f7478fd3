// Package contract is the pod contract: the numbers and names that the capture installer, the
// sidecar, the demo, the tests and (next) the injector and the Helm chart must agree on. Each
// is defined here once; a copy elsewhere is a bug waiting for one side to change.
package contract

// The sidecar's identity in the pod. The UID is the only traffic owner the capture rules
// exempt (a GID can be acquired by an app through a setgid binary or supplementalGroups).
// 15337, not Istio's 1337, so both can share a pod.
const (
	ProxyUID = 15337
	ProxyGID = 15337
)

// Ports of the sidecar, all on loopback except the admin port (probes come from the kubelet).
const (
	TransparentPort = 15001 // where the capture rules REDIRECT outbound TCP
	ExplicitPort    = 15002 // CONNECT and plain HTTP for proxy-aware apps, with the pod's identity
	AdminPort       = 15090 // /health, /ready, /metrics
)

// Ports of the gateway (the original egress-guard's defaults).
const (
	GatewayProxyPort = 4750
	GatewayAdminPort = 9090
)

// Chains the capture installer owns, in the nat and filter tables of both families.
const (
	NatChain    = "EGRESS_GUARD_OUTPUT"
	FilterChain = "EGRESS_GUARD_FILTER"
)

// Container and program names.
const (
	SidecarContainer = "egress-guard"
	InitContainer    = "egress-guard-init"
)

// Environment variables the sidecar reads that the injector sets (the rest of the proxy's
// settings are declared with their parsers in sidecar/daemon).
const (
	EnvMode            = "MODE"
	EnvIdentity        = "IDENTITY"
	EnvPolicyPath      = "CONFIGMAP_PATH"
	EnvTransparentPort = "TRANSPARENT_PORT"
	EnvProxyPort       = "PROXY_PORT"
	EnvMetricsPort     = "METRICS_PORT"
)

// Environment variables of the capture installer (each also a flag).
const (
	EnvProxyUID     = "PROXY_UID"
	EnvProxyGID     = "PROXY_GID"
	EnvRedirectPort = "REDIRECT_PORT"
	EnvExcludeCIDRs = "EXCLUDE_CIDRS"
	EnvExcludePorts = "EXCLUDE_PORTS"
	EnvDNSServers   = "DNS_SERVERS"
	EnvUDPPolicy    = "UDP_POLICY"
)

// Modes of the proxy program.
const (
	ModeGateway = "gateway"
	ModeSidecar = "sidecar"
)

// Policy distribution: where a sidecar asks the control plane for its identity's policy, the
// header that names the identity served, the token it authenticates with and its audience.
const (
	PolicyPath       = "/v1/policy"
	IdentityHeader   = "X-Egress-Guard-Identity"
	TokenDir         = "/var/run/secrets/egress-guard"
	TokenFile        = "token"
	TokenAudience    = "egress-guard"
	EnvControlPlane  = "CONTROL_PLANE_URL"
	EnvControlCA     = "CONTROL_PLANE_CA"
	EnvControlCAPEM  = "CONTROL_PLANE_CA_PEM" // the CA itself (what the injector sets: it is public)
	EnvTokenPath     = "TOKEN_PATH"
	DefaultTokenPath = TokenDir + "/" + TokenFile
)
