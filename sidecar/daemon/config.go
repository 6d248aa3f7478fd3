// Package daemon runs egress-guard: it reads the configuration from the environment, loads and
// watches the policy, serves the proxy and the admin endpoints, and drains on SIGTERM.
package daemon

import (
	"fmt"
	"log/slog"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/egress-guard/egress-guard/pkg/policy"
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
	ModeGateway = "gateway"
	ModeSidecar = "sidecar"
)

// FromEnv reads the configuration through getenv (os.Getenv in production). Every malformed
// value is an error naming the variable; nothing falls back silently.
func FromEnv(getenv func(string) string) (Config, error) {
	c := Config{
		Mode:            ModeGateway,
		ProxyPort:       4750,
		MetricsPort:     9090,
		PolicyPath:      "/etc/config/egress-policy.yaml",
		WatchInterval:   5 * time.Second,
		LogLevel:        slog.LevelInfo,
		DrainTimeout:    25 * time.Second,
		DrainIdle:       5 * time.Second,
		IdleTimeout:     5 * time.Minute,
		MaxTunnels:      10000,
		TLSPorts:        []uint16{443, 8443},
		HeaderTimeout:   10 * time.Second,
		MaxHeaderBytes:  32 << 10,
		PeekTimeout:     5 * time.Second,
		DialTimeout:     10 * time.Second,
		InternalDomains: policy.DefaultInternalDomains,

		TransparentPort:    15001,
		ServerFirstTimeout: 500 * time.Millisecond,
		KnownAddrsInterval: 30 * time.Second,
	}
	var errs []string
	fail := func(name, v, why string) { errs = append(errs, fmt.Sprintf("%s=%q: %s", name, v, why)) }

	port := func(name string, dst *uint16) {
		if v := getenv(name); v != "" {
			p, err := strconv.ParseUint(v, 10, 16)
			if err != nil || p == 0 {
				fail(name, v, "want a port number 1-65535")
				return
			}
			*dst = uint16(p)
		}
	}
	duration := func(name string, dst *time.Duration) {
		if v := getenv(name); v != "" {
			d, err := time.ParseDuration(v)
			if err != nil || d <= 0 {
				fail(name, v, "want a positive duration such as 30s")
				return
			}
			*dst = d
		}
	}
	integer := func(name string, dst *int) {
		if v := getenv(name); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil || n <= 0 {
				fail(name, v, "want a positive integer")
				return
			}
			*dst = n
		}
	}

	switch v := strings.ToLower(getenv("MODE")); v {
	case "", ModeGateway:
	case ModeSidecar:
		// Ports that do not collide with common application ports; the explicit listener
		// serves only this pod's proxy-aware apps, on loopback.
		c.Mode, c.ProxyPort, c.MetricsPort = ModeSidecar, 15002, 15090
	default:
		fail("MODE", v, "want gateway or sidecar")
	}
	port("TRANSPARENT_PORT", &c.TransparentPort)
	c.Identity = getenv("IDENTITY")
	if c.Mode == ModeSidecar && c.Identity == "" {
		errs = append(errs, "IDENTITY: required in sidecar mode (the policy identity of this pod)")
	}
	duration("SERVER_FIRST_TIMEOUT", &c.ServerFirstTimeout)
	duration("NAME_REFRESH_INTERVAL", &c.KnownAddrsInterval)
	port("PROXY_PORT", &c.ProxyPort)
	port("METRICS_PORT", &c.MetricsPort)
	if v := getenv("CONFIGMAP_PATH"); v != "" {
		c.PolicyPath = v
	}
	if v := getenv("WATCH_INTERVAL"); v != "" {
		// The original takes whole seconds; a Go duration is accepted too.
		if n, err := strconv.Atoi(v); err == nil && n > 0 {
			c.WatchInterval = time.Duration(n) * time.Second
		} else if d, err := time.ParseDuration(v); err == nil && d > 0 {
			c.WatchInterval = d
		} else {
			fail("WATCH_INTERVAL", v, "want seconds (5) or a duration (500ms)")
		}
	}
	if v := getenv("LOG_LEVEL"); v != "" {
		if err := c.LogLevel.UnmarshalText([]byte(v)); err != nil {
			fail("LOG_LEVEL", v, "want DEBUG, INFO, WARN or ERROR")
		}
	}
	if v := getenv("LISTEN_ADDR"); v != "" {
		if _, err := netip.ParseAddr(v); err != nil {
			fail("LISTEN_ADDR", v, "want an IP address")
		} else {
			c.ListenAddr = v
		}
	}
	c.Resolver = getenv("RESOLVER")
	duration("DRAIN_TIMEOUT", &c.DrainTimeout)
	duration("DRAIN_IDLE_TIMEOUT", &c.DrainIdle)
	duration("IDLE_TIMEOUT", &c.IdleTimeout)
	duration("HEADER_TIMEOUT", &c.HeaderTimeout)
	duration("PEEK_TIMEOUT", &c.PeekTimeout)
	duration("DIAL_TIMEOUT", &c.DialTimeout)
	integer("MAX_TUNNELS", &c.MaxTunnels)
	integer("MAX_HEADER_BYTES", &c.MaxHeaderBytes)
	if v := getenv("TLS_PORTS"); v != "" {
		c.TLSPorts = nil
		for _, f := range splitList(v) {
			p, err := strconv.ParseUint(f, 10, 16)
			if err != nil || p == 0 {
				fail("TLS_PORTS", v, "want comma-separated port numbers")
				break
			}
			c.TLSPorts = append(c.TLSPorts, uint16(p))
		}
	}
	if v := getenv("INTERNAL_CIDRS"); v != "" {
		for _, f := range splitList(v) {
			p, err := netip.ParsePrefix(f)
			if err != nil || p != p.Masked() {
				fail("INTERNAL_CIDRS", v, "want comma-separated masked CIDRs such as 203.0.113.0/24")
				break
			}
			c.InternalCIDRs = append(c.InternalCIDRs, p)
		}
	}
	if v, ok := lookup(getenv, "INTERNAL_DOMAINS"); ok {
		c.InternalDomains = splitList(v)
	}
	if len(errs) > 0 {
		return Config{}, fmt.Errorf("configuration: %s", strings.Join(errs, "; "))
	}
	return c, nil
}

// lookup distinguishes an empty value (no implicit internal domains) from an unset one. The
// getenv signature cannot, so "none" spells an empty list.
func lookup(getenv func(string) string, name string) (string, bool) {
	v := getenv(name)
	if v == "none" {
		return "", true
	}
	return v, v != ""
}

func splitList(v string) []string {
	var out []string
	for _, f := range strings.Split(v, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}
