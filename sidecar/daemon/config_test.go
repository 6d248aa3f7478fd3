package daemon

import (
	"log/slog"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"
)

func env(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

func TestFromEnvDefaultsAreTheOriginals(t *testing.T) {
	c, err := FromEnv(env(nil))
	if err != nil {
		t.Fatal(err)
	}
	if c.ProxyPort != 4750 || c.MetricsPort != 9090 || c.PolicyPath != "/etc/config/egress-policy.yaml" ||
		c.WatchInterval != 5*time.Second || c.LogLevel != slog.LevelInfo {
		t.Fatalf("defaults differ from the original egress-guard: %+v", c)
	}
}

func TestFromEnvParses(t *testing.T) {
	c, err := FromEnv(env(map[string]string{
		"PROXY_PORT": "8080", "METRICS_PORT": "9191", "CONFIGMAP_PATH": "/p.yaml",
		"WATCH_INTERVAL": "2", "LOG_LEVEL": "DEBUG", "DRAIN_TIMEOUT": "3s",
		"TLS_PORTS": "443, 9443", "INTERNAL_CIDRS": "203.0.113.0/24", "INTERNAL_DOMAINS": "none",
		"LISTEN_ADDR": "127.0.0.1",
	}))
	if err != nil {
		t.Fatal(err)
	}
	if c.ProxyPort != 8080 || c.MetricsPort != 9191 || c.PolicyPath != "/p.yaml" || c.WatchInterval != 2*time.Second ||
		c.LogLevel != slog.LevelDebug || c.DrainTimeout != 3*time.Second || len(c.TLSPorts) != 2 || c.TLSPorts[1] != 9443 ||
		c.InternalCIDRs[0] != netip.MustParsePrefix("203.0.113.0/24") || len(c.InternalDomains) != 0 || c.ListenAddr != "127.0.0.1" {
		t.Fatalf("parsed %+v", c)
	}
	c, err = FromEnv(env(map[string]string{"WATCH_INTERVAL": "500ms", "LOG_LEVEL": "warn"}))
	if err != nil || c.WatchInterval != 500*time.Millisecond || c.LogLevel != slog.LevelWarn {
		t.Fatalf("duration interval / lowercase level: %+v %v", c, err)
	}
}

func TestFromEnvRejectsEveryBadValue(t *testing.T) {
	_, err := FromEnv(env(map[string]string{
		"PROXY_PORT": "70000", "WATCH_INTERVAL": "soon", "LOG_LEVEL": "LOUD", "DRAIN_TIMEOUT": "-1s",
		"INTERNAL_CIDRS": "10.0.0.1/8", "MAX_TUNNELS": "0", "LISTEN_ADDR": "localhost",
	}))
	if err == nil {
		t.Fatal("bad configuration accepted")
	}
	for _, name := range []string{"PROXY_PORT", "WATCH_INTERVAL", "LOG_LEVEL", "DRAIN_TIMEOUT", "INTERNAL_CIDRS", "MAX_TUNNELS", "LISTEN_ADDR"} {
		if !strings.Contains(err.Error(), name) {
			t.Errorf("error does not name %s: %v", name, err)
		}
	}
}

// The README's configuration tables describe every setting with its default: the declaration
// is the one source, and the documentation is checked against it.
func TestREADMEDocumentsEverySetting(t *testing.T) {
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, mode := range []string{ModeGateway, ModeSidecar} {
		var c Config
		set := Settings(&c, mode)
		if mode == ModeSidecar {
			// The sidecar's port defaults are documented in the sidecar table's own row.
			for _, env := range []string{"PROXY_PORT", "METRICS_PORT"} {
				st := set.Lookup(env)
				if !strings.Contains(string(readme), "`"+st.Default+"`") {
					t.Errorf("sidecar default %s=%s not in the README", env, st.Default)
				}
			}
			continue
		}
		if err := set.CheckDocumented(string(readme)); err != nil {
			t.Error(err)
		}
	}
}
