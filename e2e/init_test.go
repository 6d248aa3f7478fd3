package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/egress-guard/egress-guard/internal/netlab"
)

// initNS makes a namespace with an IPv4 and (optionally) an IPv6 address on lo and default
// routes, enough for the installer and its self-test.
func initNS(t *testing.T, suffix string, v6 bool) *netlab.NS {
	t.Helper()
	require(t, "iptables", "ip6tables", "iptables-legacy")
	ctx := context.Background()
	ns, err := netlab.NewNS(ctx, fmt.Sprintf("ei%d-%s", os.Getpid()%100000, suffix))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ns.Delete)
	cmds := [][]string{{"ip", "addr", "add", "198.18.0.9/24", "dev", "lo"}, {"ip", "route", "add", "default", "dev", "lo"}}
	if v6 {
		cmds = append(cmds, []string{"ip", "-6", "addr", "add", "fd00:9::9/64", "dev", "lo", "nodad"}, []string{"ip", "-6", "route", "add", "default", "dev", "lo"})
	} else {
		cmds = append(cmds, []string{"sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6"})
	}
	for _, c := range cmds {
		if _, err := ns.Run(ctx, c...); err != nil {
			t.Fatal(err)
		}
	}
	return ns
}

func saveAll(t *testing.T, ns *netlab.NS, cmds ...string) string {
	t.Helper()
	var b strings.Builder
	for _, c := range cmds {
		out, err := ns.Run(context.Background(), c)
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range strings.Split(out, "\n") {
			if !strings.HasPrefix(l, "#") {
				b.WriteString(l + "\n")
			}
		}
	}
	return b.String()
}

func TestInitDryRunCleanupAndBackends(t *testing.T) {
	bin := binary(t, "./cmd/egress-guard-init")
	ctx := context.Background()
	args := []string{"--dns-servers", "198.18.1.53", "--exclude-cidrs", "198.18.7.0/24", "--exclude-ports", "5432"}

	t.Run("dry run prints the plan and changes nothing", func(t *testing.T) {
		ns := initNS(t, "dry", true)
		before := saveAll(t, ns, "iptables-save", "ip6tables-save")
		out, err := ns.Run(ctx, append([]string{bin, "--dry-run"}, args...)...)
		if err != nil || !strings.Contains(out, "-A EGRESS_GUARD_OUTPUT -p tcp -j REDIRECT --to-ports 15001") || !strings.Contains(out, "# IPv6") {
			t.Fatalf("dry run: %v\n%s", err, out)
		}
		if after := saveAll(t, ns, "iptables-save", "ip6tables-save"); after != before {
			t.Fatalf("dry run changed rules:\n%s", after)
		}
	})

	t.Run("cleanup removes only its own rules", func(t *testing.T) {
		ns := initNS(t, "clean", true)
		// A rule of somebody else's that must survive.
		if _, err := ns.Run(ctx, "iptables", "-t", "nat", "-A", "OUTPUT", "-d", "198.18.9.9", "-j", "RETURN"); err != nil {
			t.Fatal(err)
		}
		if out, err := ns.Run(ctx, append([]string{bin}, args...)...); err != nil {
			t.Fatalf("apply: %v\n%s", err, out)
		}
		for i := 0; i < 2; i++ { // idempotent
			if out, err := ns.Run(ctx, bin, "--cleanup"); err != nil {
				t.Fatalf("cleanup: %v\n%s", err, out)
			}
		}
		after := saveAll(t, ns, "iptables-save", "ip6tables-save")
		if strings.Contains(after, "EGRESS_GUARD") {
			t.Fatalf("cleanup left rules:\n%s", after)
		}
		if !strings.Contains(after, "-A OUTPUT -d 198.18.9.9/32 -j RETURN") {
			t.Fatalf("cleanup removed a foreign rule:\n%s", after)
		}
	})

	t.Run("legacy backend detected from the nat table", func(t *testing.T) {
		ns := initNS(t, "leg", true)
		// The node uses legacy iptables: its nat table has rules.
		if _, err := ns.Run(ctx, "iptables-legacy", "-t", "nat", "-A", "OUTPUT", "-d", "198.18.9.9", "-j", "RETURN"); err != nil {
			t.Fatal(err)
		}
		out, err := ns.Run(ctx, append([]string{bin}, args...)...)
		if err != nil || !strings.Contains(out, "iptables backend: legacy") || !strings.Contains(out, "self-test passed") {
			t.Fatalf("apply: %v\n%s", err, out)
		}
		legacy := saveAll(t, ns, "iptables-legacy-save", "ip6tables-legacy-save")
		if !strings.Contains(legacy, "-A EGRESS_GUARD_OUTPUT -p tcp -j REDIRECT --to-ports 15001") {
			t.Fatalf("rules not in the legacy tables:\n%s", legacy)
		}
		if nft := saveAll(t, ns, "iptables-nft-save"); strings.Contains(nft, "EGRESS_GUARD") {
			t.Fatalf("rules written to the unused nft backend:\n%s", nft)
		}
		out, err = ns.Run(ctx, append([]string{bin}, args...)...)
		if err != nil || !strings.Contains(out, "already in place") {
			t.Fatalf("second run: %v\n%s", err, out)
		}
	})

	t.Run("IPv6 that cannot be captured is refused", func(t *testing.T) {
		ns := initNS(t, "nov6", true)
		// A PATH with iptables but no ip6tables.
		dir := t.TempDir()
		for _, c := range []string{"iptables", "iptables-nft", "iptables-nft-save", "iptables-legacy", "iptables-legacy-save", "setpriv"} {
			p, err := lookPath(c)
			if err != nil {
				t.Fatal(err)
			}
			os.Symlink(p, filepath.Join(dir, c))
		}
		out, err := ns.Run(ctx, append([]string{"env", "PATH=" + dir, bin}, args...)...)
		if err == nil || !strings.Contains(out, "pod has IPv6 address fd00:9::9") || !strings.Contains(out, "refusing to leave IPv6 egress uncaptured") {
			t.Fatalf("want a refusal, got %v:\n%s", err, out)
		}
	})

	t.Run("IPv6 disabled on every interface is still captured when ip6tables works", func(t *testing.T) {
		ns := initNS(t, "v4", false)
		out, err := ns.Run(ctx, append([]string{bin}, args...)...)
		if err != nil || !strings.Contains(out, "IPv6 is disabled") || !strings.Contains(out, "self-test passed") {
			t.Fatalf("%v\n%s", err, out)
		}
	})
}

func TestInitExplainsMissingCapability(t *testing.T) {
	ns := initNS(t, "cap", false)
	bin := binary(t, "./cmd/egress-guard-init")
	// Root, but without NET_ADMIN (as an init container that forgot to ask for it).
	out, err := ns.Run(context.Background(), "setpriv", "--inh-caps=-all", "--bounding-set=-all", "--", bin, "--dns-servers", "198.18.1.53")
	if err == nil || !strings.Contains(out, "NET_ADMIN") {
		t.Fatalf("want an error naming NET_ADMIN, got %v:\n%s", err, out)
	}
	if strings.Count(strings.TrimSpace(out), "\n") > 2 {
		t.Errorf("the error should be short:\n%s", out)
	}
}
