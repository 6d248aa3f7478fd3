package cli

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func resolvConf(t *testing.T, content string) string {
	p := filepath.Join(t.TempDir(), "resolv.conf")
	os.WriteFile(p, []byte(content), 0o644)
	return p
}

func TestParseDefaultsAndResolvConf(t *testing.T) {
	rc := resolvConf(t, "search svc.cluster.local\nnameserver 10.96.0.10\nnameserver fe80::1%eth0\noptions ndots:5\n")
	o, err := Parse(nil, func(string) string { return "" }, rc)
	if err != nil {
		t.Fatal(err)
	}
	c := o.Config
	if c.ProxyUID != 15337 || c.ProxyGID != 15337 || c.RedirectPort != 15001 || c.UDPPolicy != "drop" || !o.SelfTest || o.DryRun || o.Cleanup || o.Backend != "auto" {
		t.Fatalf("defaults: %+v", o)
	}
	if len(c.DNSServers) != 2 || c.DNSServers[0] != netip.MustParseAddr("10.96.0.10") || c.DNSServers[1] != netip.MustParseAddr("fe80::1") {
		t.Fatalf("DNS servers from resolv.conf: %v", c.DNSServers)
	}
}

func TestParseFlagsBeatEnv(t *testing.T) {
	env := map[string]string{"PROXY_UID": "2000", "REDIRECT_PORT": "16001", "EXCLUDE_PORTS": "22", "DNS_SERVERS": "1.1.1.1", "SELF_TEST": "false", "UDP_POLICY": "reject"}
	o, err := Parse([]string{"--proxy-uid", "3000", "--exclude-cidrs", "10.0.0.0/8, 169.254.169.254/32"}, func(k string) string { return env[k] }, "/nonexistent")
	if err != nil {
		t.Fatal(err)
	}
	c := o.Config
	if c.ProxyUID != 3000 || c.RedirectPort != 16001 || len(c.ExcludePorts) != 1 || c.ExcludePorts[0] != 22 || len(c.ExcludeCIDRs) != 2 ||
		c.DNSServers[0] != netip.MustParseAddr("1.1.1.1") || o.SelfTest || c.UDPPolicy != "reject" {
		t.Fatalf("parsed %+v", o)
	}
}

func TestParseRejects(t *testing.T) {
	for _, args := range [][]string{
		{"--proxy-uid", "0"},
		{"--proxy-uid", "x"},
		{"--redirect-port", "70000"},
		{"--exclude-cidrs", "10.0.0.0/33"},
		{"--exclude-ports", "0"},
		{"--dns-servers", "dns.example"},
		{"--udp-policy", "sometimes"},
		{"--iptables-backend", "ebpf"},
		{"stray"},
	} {
		if _, err := Parse(args, func(string) string { return "" }, "/nonexistent"); err == nil {
			t.Errorf("%v accepted", args)
		}
	}
	_, err := Parse(nil, func(string) string { return "" }, "/nonexistent/resolv.conf")
	if err == nil || !strings.Contains(err.Error(), "--dns-servers") {
		t.Errorf("missing resolv.conf: %v", err)
	}
}
