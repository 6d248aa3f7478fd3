// Package capture installs, verifies and removes the iptables rules that send a pod's
// outbound TCP to the egress-guard sidecar.
//
// The work is split the way Istio's iptables tool splits it: a Plan is built from the
// configuration as plain data (so --dry-run prints exactly what would be applied and tests can
// compare it), then applied with one iptables backend, then read back and verified. A wrong
// guess of the backend would be a silent fail-open (rules in tables the kernel does not use),
// which is why the backend is detected from the nat table and the result verified.
package capture

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/egress-guard/egress-guard/pkg/contract"
)

// UDP policies for non-DNS UDP from the app.
const (
	UDPDrop   = "drop"   // silently: QUIC clients fall back to TCP, which is captured
	UDPReject = "reject" // with ICMP port unreachable: faster fallback, visible to the app
	UDPAllow  = "allow"  // not captured: UDP leaves the pod unproxied
)

// Config is what the installer is asked to do.
type Config struct {
	ProxyUID     uint32
	ProxyGID     uint32
	RedirectPort uint16
	ExcludeCIDRs []netip.Prefix
	ExcludePorts []uint16 // outbound destination TCP ports left alone
	DNSServers   []netip.Addr
	UDPPolicy    string
}

// Family is IPv4 or IPv6.
type Family int

// Families.
const (
	IPv4 Family = 4
	IPv6 Family = 6
)

func (f Family) String() string { return "IPv" + strconv.Itoa(int(f)) }

// Rule is one rule of one of our chains, as its arguments in iptables-save's canonical
// spelling (so that reading the chain back gives the same strings).
type Rule []string

func (r Rule) String() string { return strings.Join(r, " ") }

// TablePlan is the content of our chain in one table, and the jump from OUTPUT to it.
type TablePlan struct {
	Table string
	Chain string
	Rules []Rule
}

// Plan is every rule for one family.
type Plan struct {
	Family Family
	Tables []TablePlan // nat first: redirect before filtering
}

// BuildPlan returns the plan for one family.
func BuildPlan(cfg Config, fam Family) Plan {
	loopback := "127.0.0.0/8"
	if fam == IPv6 {
		loopback = "::1/128"
	}
	uid := strconv.FormatUint(uint64(cfg.ProxyUID), 10)
	gid := strconv.FormatUint(uint64(cfg.ProxyGID), 10)
	var dns []string
	for _, a := range cfg.DNSServers {
		if a.Is4() == (fam == IPv4) {
			dns = append(dns, hostPrefix(a))
		}
	}
	var excluded []string
	for _, p := range cfg.ExcludeCIDRs {
		if p.Addr().Is4() == (fam == IPv4) {
			excluded = append(excluded, p.Masked().String())
		}
	}

	// nat: the proxy's own traffic and loopback are left alone, then exclusions and DNS to
	// the resolvers, and every other TCP connection goes to the sidecar.
	nat := []Rule{
		{"-m", "owner", "--uid-owner", uid, "-j", "RETURN"},
		{"-m", "owner", "--gid-owner", gid, "-j", "RETURN"},
		{"-d", loopback, "-j", "RETURN"},
	}
	for _, p := range excluded {
		nat = append(nat, Rule{"-d", p, "-j", "RETURN"})
	}
	for _, port := range cfg.ExcludePorts {
		nat = append(nat, Rule{"-p", "tcp", "-m", "tcp", "--dport", strconv.Itoa(int(port)), "-j", "RETURN"})
	}
	for _, d := range dns {
		nat = append(nat, Rule{"-d", d, "-p", "tcp", "-m", "tcp", "--dport", "53", "-j", "RETURN"})
	}
	nat = append(nat, Rule{"-p", "tcp", "-j", "REDIRECT", "--to-ports", strconv.Itoa(int(cfg.RedirectPort))})

	// filter: accept the proxy and loopback; DNS only to the resolvers; other UDP per policy.
	// TCP needs no rule here: nat already sent it to loopback.
	filter := []Rule{
		{"-m", "owner", "--uid-owner", uid, "-j", "ACCEPT"},
		{"-m", "owner", "--gid-owner", gid, "-j", "ACCEPT"},
		{"-o", "lo", "-j", "ACCEPT"},
	}
	for _, p := range excluded {
		filter = append(filter, Rule{"-d", p, "-j", "ACCEPT"})
	}
	for _, d := range dns {
		filter = append(filter,
			Rule{"-d", d, "-p", "udp", "-m", "udp", "--dport", "53", "-j", "ACCEPT"},
			Rule{"-d", d, "-p", "tcp", "-m", "tcp", "--dport", "53", "-j", "ACCEPT"})
	}
	switch cfg.UDPPolicy {
	case UDPDrop:
		filter = append(filter, Rule{"-p", "udp", "-j", "DROP"})
	case UDPReject:
		unreach := "icmp-port-unreachable"
		if fam == IPv6 {
			unreach = "icmp6-port-unreachable"
		}
		filter = append(filter, Rule{"-p", "udp", "-j", "REJECT", "--reject-with", unreach})
	}
	return Plan{Family: fam, Tables: []TablePlan{
		{Table: "nat", Chain: contract.NatChain, Rules: nat},          // redirects
		{Table: "filter", Chain: contract.FilterChain, Rules: filter}, // drops what must not leave directly
	}}
}

func hostPrefix(a netip.Addr) string {
	return netip.PrefixFrom(a, a.BitLen()).String()
}

// Jump is the rule in OUTPUT that enters our chain.
func Jump(chain string) Rule { return Rule{"-j", chain} }

// String renders the plan in iptables-restore syntax (what --dry-run prints).
func (p Plan) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "# %s\n", p.Family)
	for _, t := range p.Tables {
		fmt.Fprintf(&b, "*%s\n:%s - [0:0]\n-I OUTPUT 1 %s\n", t.Table, t.Chain, Jump(t.Chain))
		for _, r := range t.Rules {
			fmt.Fprintf(&b, "-A %s %s\n", t.Chain, r)
		}
		b.WriteString("COMMIT\n")
	}
	return b.String()
}
