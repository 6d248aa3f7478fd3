package cli

import (
	"fmt"
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
	if c.ProxyUID != 15337 || o.ProxyGID != 15337 || c.RedirectPort != 15001 || c.UDPPolicy != "drop" || !o.SelfTest || o.DryRun || o.Cleanup || o.Backend != "auto" {
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

func TestParseSelfTestAndSwitches(t *testing.T) {
	for _, tc := range []struct {
		env                map[string]string
		args               []string
		self, dry, cleanup bool
	}{
		{env: nil, self: true},
		{env: map[string]string{"SELF_TEST": "false"}, self: false},
		{env: map[string]string{"SELF_TEST": "0", "DRY_RUN": "true", "CLEANUP": "1"}, self: false, dry: true, cleanup: true},
		{env: map[string]string{"SELF_TEST": "false"}, args: []string{"--self-test"}, self: true},
		{args: []string{"--self-test=false", "--dry-run", "--cleanup"}, self: false, dry: true, cleanup: true},
	} {
		getenv := func(k string) string {
			if k == "DNS_SERVERS" {
				return "10.96.0.10"
			}
			return tc.env[k]
		}
		o, err := Parse(tc.args, getenv, "/nonexistent")
		if err != nil {
			t.Fatalf("%v %v: %v", tc.env, tc.args, err)
		}
		if o.SelfTest != tc.self || o.DryRun != tc.dry || o.Cleanup != tc.cleanup {
			t.Errorf("%v %v: self-test %v, dry-run %v, cleanup %v", tc.env, tc.args, o.SelfTest, o.DryRun, o.Cleanup)
		}
	}
}

func TestParseNamesEveryBadValue(t *testing.T) {
	env := map[string]string{"PROXY_UID": "0", "SELF_TEST": "maybe", "EXCLUDE_PORTS": "22,http"}
	_, err := Parse([]string{"--redirect-port", "0", "--udp-policy", "sometimes", "--dns-servers", "10.96.0.10"}, func(k string) string { return env[k] }, "/nonexistent")
	if err == nil {
		t.Fatal("accepted")
	}
	for _, want := range []string{
		`PROXY_UID="0": 0 would exempt every root process from capture`,
		`SELF_TEST="maybe"`,
		`EXCLUDE_PORTS="22,http": "http"`,
		`--redirect-port="0"`,
		`--udp-policy="sometimes": want one of drop, reject, allow`,
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not name %s:\n%v", want, err)
		}
	}
}

func TestParseBadResolvConf(t *testing.T) {
	rc := resolvConf(t, "nameserver 10.96.0.10\nnameserver dns.example\n")
	_, err := Parse(nil, func(string) string { return "" }, rc)
	if err == nil || !strings.Contains(err.Error(), `"dns.example"`) || !strings.Contains(err.Error(), rc) {
		t.Fatalf("want the bad nameserver and the file named, got %v", err)
	}
}

func TestHelp(t *testing.T) {
	var out, errOut strings.Builder
	if code := Main([]string{"--help"}, &out, &errOut); code != 0 {
		t.Fatalf("--help exited %d: %s", code, errOut.String())
	}
	for _, want := range []string{"Usage: egress-guard-init", "--proxy-uid", "PROXY_UID", "15337", "--self-test", "SELF_TEST", "true", "/etc/resolv.conf"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("--help lacks %q:\n%s", want, out.String())
		}
	}
	if code := Main([]string{"--no-such-flag"}, &out, &errOut); code != 2 {
		t.Errorf("an unknown flag exited %d, want 2", code)
	}
}

// TestREADMEDocumentsEverySetting keeps the README's egress-guard-init table in step with the
// declarations: every environment variable in a row with its default.
func TestREADMEDocumentsEverySetting(t *testing.T) {
	b, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	section, err := readmeSection(string(b), "### `egress-guard-init`")
	if err != nil {
		t.Fatal(err)
	}
	if err := declare(new(Options), defaultResolvConf).CheckDocumented(section); err != nil {
		t.Errorf("README.md, section \"### `egress-guard-init`\": %v (a default must appear as declared: `false`, not off)", err)
	}
}

// readmeSection returns the Markdown from the heading that starts with heading to the next
// heading of the same or a higher level.
func readmeSection(md, heading string) (string, error) {
	lines := strings.Split(md, "\n")
	for i, l := range lines {
		if !strings.HasPrefix(l, heading) {
			continue
		}
		level := len(l) - len(strings.TrimLeft(l, "#"))
		end := len(lines)
		for j := i + 1; j < len(lines); j++ {
			if h := len(lines[j]) - len(strings.TrimLeft(lines[j], "#")); h > 0 && h <= level && strings.HasPrefix(lines[j][h:], " ") {
				end = j
				break
			}
		}
		return strings.Join(lines[i:end], "\n"), nil
	}
	return "", fmt.Errorf("no heading %q in README.md", heading)
}
