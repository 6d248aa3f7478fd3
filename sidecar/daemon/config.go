// Package daemon runs the proxy program, as the gateway or as the sidecar: it reads the
// configuration from the environment, loads and watches the policy, serves the listeners and
// the admin endpoints, and drains on SIGTERM.
package daemon

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/egress-guard/egress-guard/pkg/contract"
	"github.com/egress-guard/egress-guard/pkg/policy"
	"github.com/egress-guard/egress-guard/pkg/settings"
)

// Config is the daemon's configuration. The first five settings and their defaults are the
// original egress-guard's environment variables.
type Config struct {
	Mode string // MODE: "gateway" (default) or "sidecar"

	ProxyPort     uint16        // PROXY_PORT (4750)
	MetricsPort   uint16        // METRICS_PORT (9090)
	PolicyPath    string        // CONFIGMAP_PATH (/etc/config/egress-policy.yaml)
	WatchInterval time.Duration // WATCH_INTERVAL, seconds (5)
	LogLevel      slog.Level    // LOG_LEVEL (INFO)

	ListenAddr   string        // LISTEN_ADDR: gateway only: IP to bind the proxy listener ("" = all)
	AdminAddr    string        // ADMIN_ADDR: IP to bind the admin listener ("" = see adminHost)
	Resolver     string        // RESOLVER: DNS server host:port ("" = the system's)
	DrainTimeout time.Duration // DRAIN_TIMEOUT (25s): below the pod's 30s default grace period
	DrainIdle    time.Duration // DRAIN_IDLE_TIMEOUT (5s): idle tunnels close this soon once draining
	IdleTimeout  time.Duration // IDLE_TIMEOUT (5m)
	MaxTunnels   int           // MAX_TUNNELS (10000): decided connections
	// MAX_PENDING (1000), MAX_PENDING_PER_CLIENT (64), MAX_TUNNELS_PER_IDENTITY (0 = none):
	// connections not yet decided have their own budgets, so clients that never authenticate
	// cannot take the cap.
	MaxPending            int
	MaxPendingPerClient   int
	MaxTunnelsPerIdentity int
	KeepAliveTimeout      time.Duration // KEEPALIVE_TIMEOUT (30s): idle plain-HTTP client connections
	DenyECH               bool          // ECH=deny: refuse ClientHellos with ECH unless a rule opts in

	// A sidecar's policy from the control plane (CONTROL_PLANE_URL, CONTROL_PLANE_CA,
	// TOKEN_PATH), instead of a file and IDENTITY.
	ControlPlaneURL   string
	ControlPlaneCA    string
	ControlPlaneCAPEM string
	TokenPath         string

	// The gateway's ServiceAccount tokens (TOKEN_AUTH auto|on|off; KUBE_API_URL, KUBE_TOKEN_PATH,
	// KUBE_CA_PATH default to the in-cluster values; TOKEN_AUDIENCE).
	TokenAuth       string
	KubeAPIURL      string
	KubeTokenPath   string
	KubeCAPath      string
	TokenAudience   string
	TLSPorts        []uint16      // TLS_PORTS (443,8443)
	HeaderTimeout   time.Duration // HEADER_TIMEOUT (10s)
	MaxHeaderBytes  int           // MAX_HEADER_BYTES (32768)
	PeekTimeout     time.Duration // PEEK_TIMEOUT (5s)
	DialTimeout     time.Duration // DIAL_TIMEOUT (10s)
	InternalCIDRs   []netip.Prefix
	InternalDomains []string // INTERNAL_DOMAINS: exact names here may reach private addresses

	// Sidecar mode.
	TransparentPort    uint16        // TRANSPARENT_PORT (15001)
	Identity           string        // IDENTITY: the policy identity of this pod
	ServerFirstTimeout time.Duration // SERVER_FIRST_TIMEOUT (500ms)
	KnownAddrsInterval time.Duration // NAME_REFRESH_INTERVAL (30s): re-resolve exact-name rules

	// Admin bounds the admin listener. It is not read from the environment: the zero value
	// means DefaultAdminLimits (tests shorten it).
	Admin AdminLimits
}

// AdminLimits bound the admin listener (/health, /ready, /metrics), so that its sockets
// cannot pile up and starve the proxy of file descriptors. A zero field takes its value from
// DefaultAdminLimits.
type AdminLimits struct {
	ReadHeaderTimeout time.Duration // a new connection must send its request head within this
	ReadTimeout       time.Duration // the whole request
	WriteTimeout      time.Duration // from the end of the request head to the end of the response
	IdleTimeout       time.Duration // a kept-alive connection with no next request is closed after this
	MaxHeaderBytes    int
	MaxConns          int // concurrent admin connections; more wait in the kernel's accept queue
}

// DefaultAdminLimits are generous for kubelet probes and Prometheus scrapes, which send their
// request at once and need a handful of connections.
var DefaultAdminLimits = AdminLimits{
	ReadHeaderTimeout: 3 * time.Second,
	ReadTimeout:       5 * time.Second,
	WriteTimeout:      15 * time.Second,
	IdleTimeout:       30 * time.Second,
	MaxHeaderBytes:    8 << 10,
	MaxConns:          64,
}

// withDefaults fills the zero fields from DefaultAdminLimits.
func (l AdminLimits) withDefaults() AdminLimits {
	d := DefaultAdminLimits
	pick := func(v *time.Duration, def time.Duration) {
		if *v <= 0 {
			*v = def
		}
	}
	pick(&l.ReadHeaderTimeout, d.ReadHeaderTimeout)
	pick(&l.ReadTimeout, d.ReadTimeout)
	pick(&l.WriteTimeout, d.WriteTimeout)
	pick(&l.IdleTimeout, d.IdleTimeout)
	if l.MaxHeaderBytes <= 0 {
		l.MaxHeaderBytes = d.MaxHeaderBytes
	}
	if l.MaxConns <= 0 {
		l.MaxConns = d.MaxConns
	}
	return l
}

// adminHost is the address the admin listener binds to: ADMIN_ADDR when set; otherwise
// LISTEN_ADDR in gateway mode, and all addresses in sidecar mode (the kubelet probes the pod
// IP).
func adminHost(c Config) string {
	switch {
	case c.AdminAddr != "":
		return c.AdminAddr
	case c.Mode == ModeSidecar:
		return ""
	default:
		return c.ListenAddr
	}
}

// Modes.
const (
	ModeGateway = contract.ModeGateway
	ModeSidecar = contract.ModeSidecar
)

// Settings declares every setting of the proxy program for a mode (the defaults of the ports
// differ): the one place its environment variables, defaults and parsers are written down.
func Settings(c *Config, mode string) *settings.Set {
	proxyPort, metricsPort := contract.GatewayProxyPort, contract.GatewayAdminPort
	if mode == ModeSidecar {
		// The explicit listener serves only this pod's proxy-aware apps, on loopback; ports
		// that do not collide with common application ports.
		proxyPort, metricsPort = contract.ExplicitPort, contract.AdminPort
	}
	var s settings.Set
	s.OneOf(&c.Mode, []string{ModeGateway, ModeSidecar}, contract.EnvMode, "", ModeGateway, "gateway or sidecar")
	s.Port(&c.ProxyPort, contract.EnvProxyPort, "", strconv.Itoa(proxyPort), "explicit proxy listener port")
	s.Port(&c.MetricsPort, contract.EnvMetricsPort, "", strconv.Itoa(metricsPort), "/health, /ready and /metrics port")
	s.String(&c.PolicyPath, contract.EnvPolicyPath, "", "/etc/config/egress-policy.yaml", "policy file")
	s.SecondsOrDuration(&c.WatchInterval, "WATCH_INTERVAL", "", "5", "policy poll interval: seconds, or a duration such as 500ms")
	s.LogLevel(&c.LogLevel, "LOG_LEVEL", "", "INFO")
	s.Addr(&c.ListenAddr, "LISTEN_ADDR", "", "", "gateway: IP address to bind the proxy listener (and the admin listener unless ADMIN_ADDR is set) to; not allowed in sidecar mode")
	s.Addr(&c.AdminAddr, "ADMIN_ADDR", "", "", "IP address to bind the admin listener (/health, /ready, /metrics) to; unset: LISTEN_ADDR in gateway mode, all addresses in sidecar mode")
	s.String(&c.Resolver, "RESOLVER", "", "", "DNS server host:port used to resolve destinations")
	s.Ports(&c.TLSPorts, "TLS_PORTS", "", "443,8443", "CONNECT ports whose tunnels must start with a matching ClientHello")
	s.Prefixes(&c.InternalCIDRs, "INTERNAL_CIDRS", "", "", "extra internal ranges")
	s.ListOrNone(&c.InternalDomains, "INTERNAL_DOMAINS", "", strings.Join(policy.DefaultInternalDomains, ","), "private-use DNS suffixes whose exact names may reach private addresses; none for no suffix")
	s.Duration(&c.IdleTimeout, "IDLE_TIMEOUT", "", "5m", "close a connection idle this long")
	s.PositiveInt(&c.MaxTunnels, "MAX_TUNNELS", "", "10000", "cap on decided, open connections")
	s.PositiveInt(&c.MaxPending, "MAX_PENDING", "", "1000", "cap on connections not yet decided (reading the request head, authenticating, peeking)")
	s.PositiveInt(&c.MaxPendingPerClient, "MAX_PENDING_PER_CLIENT", "", "64", "gateway: cap on one client address's undecided connections")
	s.Func("MAX_TUNNELS_PER_IDENTITY", "", "0", "cap on one identity's open connections; 0 for none", func(v string) error {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			return errors.New("want a number, 0 for no limit")
		}
		c.MaxTunnelsPerIdentity = n
		return nil
	})
	s.Duration(&c.KeepAliveTimeout, "KEEPALIVE_TIMEOUT", "", "30s", "how long a plain-HTTP client connection may wait idle between requests")
	s.String(&c.ControlPlaneURL, contract.EnvControlPlane, "", "", "sidecar: the control plane's URL; the pod's identity and policy come from it")
	s.String(&c.ControlPlaneCA, contract.EnvControlCA, "", contract.TokenDir+"/ca.crt", "sidecar: CA certificate of the control plane")
	s.String(&c.ControlPlaneCAPEM, contract.EnvControlCAPEM, "", "", "sidecar: the control plane's CA certificate itself, PEM (set by the injector); overrides CONTROL_PLANE_CA")
	s.String(&c.TokenPath, contract.EnvTokenPath, "", contract.DefaultTokenPath, "sidecar: the pod's projected ServiceAccount token (re-read as the kubelet rotates it)")
	s.OneOf(&c.TokenAuth, []string{"auto", "on", "off"}, "TOKEN_AUTH", "", "auto", "gateway: accept ServiceAccount tokens (Bearer, or Basic user \"token\"); auto: when an API server is known")
	s.String(&c.KubeAPIURL, "KUBE_API_URL", "", "", "gateway: API server for TokenReviews; empty: in-cluster")
	s.String(&c.KubeTokenPath, "KUBE_TOKEN_PATH", "", "", "gateway: its own credential for TokenReviews; empty: the mounted ServiceAccount token")
	s.String(&c.KubeCAPath, "KUBE_CA_PATH", "", "", "gateway: the API server's CA; empty: the mounted ServiceAccount CA")
	s.String(&c.TokenAudience, "TOKEN_AUDIENCE", "", contract.TokenAudience, "audience ServiceAccount tokens must carry")
	s.Func("ECH", "", "allow", "allow (logged) or deny: ClientHellos with encrypted_client_hello, unless the matched rule says ech: allow", func(v string) error {
		switch v {
		case "allow", "deny":
			c.DenyECH = v == "deny"
			return nil
		}
		return errors.New("want allow or deny")
	})
	s.Duration(&c.HeaderTimeout, "HEADER_TIMEOUT", "", "10s", "time to send the request head")
	s.PositiveInt(&c.MaxHeaderBytes, "MAX_HEADER_BYTES", "", "32768", "bound on the request head")
	s.Duration(&c.PeekTimeout, "PEEK_TIMEOUT", "", "5s", "time to send the ClientHello")
	s.Duration(&c.DialTimeout, "DIAL_TIMEOUT", "", "10s", "resolve, then connect, each within this")
	s.Duration(&c.DrainTimeout, "DRAIN_TIMEOUT", "", "25s", "drain budget on SIGTERM")
	s.Duration(&c.DrainIdle, "DRAIN_IDLE_TIMEOUT", "", "5s", "while draining, idle connections close after this")
	s.Port(&c.TransparentPort, contract.EnvTransparentPort, "", strconv.Itoa(contract.TransparentPort), "sidecar: where the capture rules redirect")
	s.String(&c.Identity, contract.EnvIdentity, "", "", "sidecar: the policy identity of this pod")
	s.Duration(&c.ServerFirstTimeout, "SERVER_FIRST_TIMEOUT", "", "500ms", "sidecar: wait for the client's first bytes before deciding on the address")
	s.Duration(&c.KnownAddrsInterval, "NAME_REFRESH_INTERVAL", "", "30s", "sidecar: re-resolve the identity's exact-name rules")
	return &s
}

// FromEnv reads the configuration through getenv (os.Getenv in production). Every malformed
// value is an error naming the variable; nothing falls back silently.
func FromEnv(getenv func(string) string) (Config, error) {
	var c Config
	mode := strings.ToLower(getenv(contract.EnvMode))
	lower := func(name string) string {
		if name == contract.EnvMode {
			return mode
		}
		return getenv(name)
	}
	if err := Settings(&c, mode).Load("egress-guard", nil, lower); err != nil {
		return Config{}, fmt.Errorf("configuration: %w", err)
	}
	switch {
	case c.Mode == ModeSidecar && c.ControlPlaneURL != "" && c.Identity != "":
		// The identity is what the control plane answers for the pod's token; a variable
		// the workload's own pod spec could set must not choose it.
		return Config{}, fmt.Errorf("configuration: %s is refused with %s: the control plane decides the identity", contract.EnvIdentity, contract.EnvControlPlane)
	case c.Mode == ModeSidecar && c.ControlPlaneURL == "" && c.Identity == "":
		return Config{}, fmt.Errorf("configuration: sidecar mode needs %s (identity and policy from the control plane) or %s with a policy file", contract.EnvControlPlane, contract.EnvIdentity)
	case c.Mode != ModeSidecar && c.ControlPlaneURL != "":
		return Config{}, fmt.Errorf("configuration: %s is for sidecar mode", contract.EnvControlPlane)
	}
	if c.Mode == ModeSidecar && c.ListenAddr != "" {
		// The sidecar's explicit listener needs no credentials (it uses the pod's identity),
		// so it must serve this pod's apps only: anywhere but loopback, any other pod could
		// use this pod's identity.
		return Config{}, fmt.Errorf("configuration: LISTEN_ADDR=%q: not allowed in sidecar mode: the explicit proxy listener always binds loopback (127.0.0.1 and ::1); use ADMIN_ADDR to choose the admin listener's address", c.ListenAddr)
	}
	return c, nil
}
