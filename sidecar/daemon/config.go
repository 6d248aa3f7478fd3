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

	ListenAddr      string        // LISTEN_ADDR: IP to bind the proxy and admin listeners ("" = all)
	Resolver        string        // RESOLVER: DNS server host:port ("" = the system's)
	DrainTimeout    time.Duration // DRAIN_TIMEOUT (25s): below the pod's 30s default grace period
	DrainIdle       time.Duration // DRAIN_IDLE_TIMEOUT (5s): idle tunnels close this soon once draining
	IdleTimeout     time.Duration // IDLE_TIMEOUT (5m)
	MaxTunnels      int           // MAX_TUNNELS (10000)
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
	s.Func("WATCH_INTERVAL", "", "5", "policy poll interval: seconds, or a duration such as 500ms", func(v string) error {
		// The original takes whole seconds; a Go duration is accepted too.
		if n, err := strconv.Atoi(v); err == nil && n > 0 {
			c.WatchInterval = time.Duration(n) * time.Second
			return nil
		}
		if d, err := time.ParseDuration(v); err == nil && d > 0 {
			c.WatchInterval = d
			return nil
		}
		return errors.New("want seconds (5) or a duration (500ms)")
	})
	s.Func("LOG_LEVEL", "", "INFO", "DEBUG, INFO, WARN or ERROR", func(v string) error {
		if err := c.LogLevel.UnmarshalText([]byte(v)); err != nil {
			return errors.New("want DEBUG, INFO, WARN or ERROR")
		}
		return nil
	})
	s.Func("LISTEN_ADDR", "", "", "IP address to bind the gateway's listeners to", func(v string) error {
		if _, err := netip.ParseAddr(v); err != nil {
			return errors.New("want an IP address")
		}
		c.ListenAddr = v
		return nil
	})
	s.String(&c.Resolver, "RESOLVER", "", "", "DNS server host:port used to resolve destinations")
	s.Ports(&c.TLSPorts, "TLS_PORTS", "", "443,8443", "CONNECT ports whose tunnels must start with a matching ClientHello")
	s.Prefixes(&c.InternalCIDRs, "INTERNAL_CIDRS", "", "", "extra internal ranges")
	s.Func("INTERNAL_DOMAINS", "", strings.Join(policy.DefaultInternalDomains, ","), "private-use DNS suffixes whose exact names may reach private addresses; none for no suffix", func(v string) error {
		c.InternalDomains = nil
		if v != "none" {
			c.InternalDomains = settings.SplitList(v)
		}
		return nil
	})
	s.Duration(&c.IdleTimeout, "IDLE_TIMEOUT", "", "5m", "close a connection idle this long")
	s.PositiveInt(&c.MaxTunnels, "MAX_TUNNELS", "", "10000", "concurrent connection cap")
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
	if c.Mode == ModeSidecar && c.Identity == "" {
		return Config{}, fmt.Errorf("configuration: %s: required in sidecar mode (the policy identity of this pod)", contract.EnvIdentity)
	}
	return c, nil
}
