package capture

import (
	"net/netip"
	"strings"
	"testing"
)

func TestPlanIPv4(t *testing.T) {
	cfg := Config{
		ProxyUID: 15337, RedirectPort: 15001,
		ExcludeCIDRs: []netip.Prefix{netip.MustParsePrefix("10.96.0.0/12"), netip.MustParsePrefix("fd00:96::/64")},
		ExcludePorts: []uint16{5432},
		DNSServers:   []netip.Addr{netip.MustParseAddr("10.96.0.10"), netip.MustParseAddr("fd00:96::a")},
		UDPPolicy:    UDPDrop,
	}
	want := `# IPv4
*nat
:EGRESS_GUARD_OUTPUT - [0:0]
-I OUTPUT 1 -j EGRESS_GUARD_OUTPUT
-A EGRESS_GUARD_OUTPUT -m owner --uid-owner 15337 -j RETURN
-A EGRESS_GUARD_OUTPUT -d 127.0.0.0/8 -j RETURN
-A EGRESS_GUARD_OUTPUT -d 10.96.0.0/12 -j RETURN
-A EGRESS_GUARD_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN
-A EGRESS_GUARD_OUTPUT -d 10.96.0.10/32 -p tcp -m tcp --dport 53 -j RETURN
-A EGRESS_GUARD_OUTPUT -p tcp -j REDIRECT --to-ports 15001
COMMIT
*filter
:EGRESS_GUARD_FILTER - [0:0]
-I OUTPUT 1 -j EGRESS_GUARD_FILTER
-A EGRESS_GUARD_FILTER -m owner --uid-owner 15337 -j ACCEPT
-A EGRESS_GUARD_FILTER -m addrtype ! --src-type LOCAL -j DROP
-A EGRESS_GUARD_FILTER -p icmp -m owner --uid-owner 0-4294967294 -j DROP
-A EGRESS_GUARD_FILTER -o lo -j ACCEPT
-A EGRESS_GUARD_FILTER -d 127.0.0.1/32 -p tcp -m tcp --dport 15001 -j ACCEPT
-A EGRESS_GUARD_FILTER -d 10.96.0.0/12 -j ACCEPT
-A EGRESS_GUARD_FILTER -p tcp -m tcp --dport 5432 -j ACCEPT
-A EGRESS_GUARD_FILTER -d 10.96.0.10/32 -p udp -m udp --dport 53 -j ACCEPT
-A EGRESS_GUARD_FILTER -d 10.96.0.10/32 -p tcp -m tcp --dport 53 -j ACCEPT
-A EGRESS_GUARD_FILTER -m conntrack --ctdir REPLY -j ACCEPT
-A EGRESS_GUARD_FILTER -p icmp -m conntrack --ctstate RELATED -j ACCEPT
-A EGRESS_GUARD_FILTER -j DROP
COMMIT
`
	if got := BuildPlan(cfg, IPv4).String(); got != want {
		t.Fatalf("plan:\n%s\nwant:\n%s", got, want)
	}
	v6 := BuildPlan(cfg, IPv6).String()
	for _, s := range []string{"-d ::1/128 -j RETURN", "-d fd00:96::/64 -j RETURN", "-d fd00:96::a/128 -p udp -m udp --dport 53 -j ACCEPT",
		"! -p ipv6-icmp -m addrtype ! --src-type LOCAL -j DROP", "-p ipv6-icmp -m owner --uid-owner 0-4294967294 -j DROP"} {
		if !strings.Contains(v6, s) {
			t.Errorf("IPv6 plan lacks %q:\n%s", s, v6)
		}
	}
	if strings.Contains(v6, "10.96") {
		t.Errorf("IPv4 addresses in the IPv6 plan:\n%s", v6)
	}
}

// Whatever the app sends that no rule lets out (UDP-Lite, ICMP echo from a ping socket, raw
// IP) ends in the filter chain's last rule, a DROP; before it come only the proxy UID, the
// drops of forged sources and of ICMP from sockets, loopback, exclusions, DNS to the
// resolvers, replies, and what IPv6 itself needs (from the kernel, which owns no socket).
func TestPlanFilterEndsInDrop(t *testing.T) {
	cfg := Config{
		ProxyUID: 15337, RedirectPort: 15001,
		ExcludeCIDRs: []netip.Prefix{netip.MustParsePrefix("fd00:96::/64")},
		ExcludePorts: []uint16{5432},
		DNSServers:   []netip.Addr{netip.MustParseAddr("fd00:96::a")},
		UDPPolicy:    UDPDrop,
	}
	want := []string{
		"-m owner --uid-owner 15337 -j ACCEPT",
		"! -p ipv6-icmp -m addrtype ! --src-type LOCAL -j DROP",  // forged sources
		"-p ipv6-icmp -m owner --uid-owner 0-4294967294 -j DROP", // ICMPv6 from any socket
		"-o lo -j ACCEPT",
		"-d ::1/128 -p tcp -m tcp --dport 15001 -j ACCEPT", // redirected to the sidecar
		"-d fd00:96::/64 -j ACCEPT",
		"-p tcp -m tcp --dport 5432 -j ACCEPT",
		"-d fd00:96::a/128 -p udp -m udp --dport 53 -j ACCEPT",
		"-d fd00:96::a/128 -p tcp -m tcp --dport 53 -j ACCEPT",
		"-m conntrack --ctdir REPLY -j ACCEPT",
		"-p ipv6-icmp -m conntrack --ctstate RELATED -j ACCEPT",
		"-p ipv6-icmp -m icmp6 --icmpv6-type 135 -j ACCEPT", // neighbour solicitation
		"-p ipv6-icmp -m icmp6 --icmpv6-type 136 -j ACCEPT", // neighbour advertisement
		"-p ipv6-icmp -m icmp6 --icmpv6-type 133 -j ACCEPT", // router solicitation
		"-p ipv6-icmp -m icmp6 --icmpv6-type 143 -j ACCEPT", // MLDv2 report
		"-p ipv6-icmp -m icmp6 --icmpv6-type 2 -j ACCEPT",   // packet too big
		"-j DROP",
	}
	var got []string
	for _, r := range BuildPlan(cfg, IPv6).Tables[1].Rules {
		got = append(got, r.String())
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("IPv6 filter chain:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// Only the proxy's UID is exempt: no rule may match on a group, which the app can take.
func TestPlanExemptsNoGroup(t *testing.T) {
	cfg := Config{ProxyUID: 15337, RedirectPort: 15001, UDPPolicy: UDPAllow}
	for _, fam := range []Family{IPv4, IPv6} {
		if p := BuildPlan(cfg, fam).String(); strings.Contains(p, "gid-owner") {
			t.Errorf("%s plan exempts a group:\n%s", fam, p)
		}
	}
}

func TestPlanUDPPolicies(t *testing.T) {
	base := Config{ProxyUID: 1, RedirectPort: 15001}
	for policy, want := range map[string]string{
		UDPDrop:   "",
		UDPReject: "-p udp -j REJECT --reject-with icmp-port-unreachable",
		UDPAllow:  "-p udp -j ACCEPT",
	} {
		base.UDPPolicy = policy
		rules := BuildPlan(base, IPv4).Tables[1].Rules
		var udp []string
		for _, r := range rules {
			if s := r.String(); strings.HasPrefix(s, "-p udp -j") {
				udp = append(udp, s)
			}
		}
		if want == "" && len(udp) != 0 || want != "" && (len(udp) != 1 || udp[0] != want) {
			t.Errorf("%s: UDP rules %q, want %q", policy, udp, want)
		}
		// The policy is for UDP only: everything else still ends in the DROP.
		if last := rules[len(rules)-1].String(); last != "-j DROP" {
			t.Errorf("%s: last filter rule %q, want -j DROP", policy, last)
		}
	}
	base.UDPPolicy = UDPReject
	if !strings.Contains(BuildPlan(base, IPv6).String(), "icmp6-port-unreachable") {
		t.Error("IPv6 reject must use icmp6")
	}
}

func TestDetectBackendReadsTheNatTable(t *testing.T) {
	saves := map[string]string{}
	run := func(name string, args ...string) (string, error) {
		if out, ok := saves[name]; ok {
			return out, nil
		}
		return "", errNotFound
	}
	saves["iptables-nft-save"] = "*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -j KUBE-SERVICES\n-A KUBE-SERVICES -j RETURN\nCOMMIT\n"
	saves["iptables"] = "iptables v1.8.9 (legacy)"
	if b, why, err := DetectBackend(run); err != nil || b != BackendNFT || !strings.Contains(why, "nft nat table has 2 rules") {
		t.Fatalf("nft with rules: %s %q %v", b, why, err)
	}
	saves["iptables-nft-save"] = "*nat\nCOMMIT\n"
	if b, _, err := DetectBackend(run); err != nil || b != BackendLegacy {
		t.Fatalf("empty tables, iptables is legacy: %s %v", b, err)
	}
	saves["iptables"] = "iptables v1.8.9 (nf_tables)"
	if b, _, err := DetectBackend(run); err != nil || b != BackendNFT {
		t.Fatalf("empty tables, iptables is nft: %s %v", b, err)
	}
	delete(saves, "iptables")
	delete(saves, "iptables-nft-save")
	if _, _, err := DetectBackend(run); err == nil {
		t.Fatal("no iptables at all must be an error")
	}
}

type notFound struct{}

func (notFound) Error() string { return "not found" }

var errNotFound = notFound{}
