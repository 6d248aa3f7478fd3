// Package capture installs, verifies and removes the iptables rules that send a pod's
// outbound TCP to the egress-guard sidecar and drop the rest of its egress.
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

// UDP policies for non-DNS UDP from the app. Every other protocol the app sends (UDP-Lite,
// SCTP, ICMP echo through ping sockets, raw IP) is dropped whatever the policy.
const (
	UDPDrop   = "drop"   // silently: QUIC clients fall back to TCP, which is captured
	UDPReject = "reject" // with ICMP port unreachable: faster fallback, visible to the app
	UDPAllow  = "allow"  // not captured: UDP leaves the pod unproxied
)

// Config is what the installer is asked to do. Only the proxy's UID is exempt from capture:
// a group is not an identity the app cannot take (its primary group, a setgid binary), so
// there is no proxy GID here.
type Config struct {
	ProxyUID     uint32
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

	// filter: what may leave the pod without the sidecar, then a DROP for everything else
	// (UDP-Lite, SCTP, ICMP echo from ping sockets, raw IP...). TCP that nat redirected is
	// accepted by its new destination: it goes out through lo, but OUTPUT's hooks all see the
	// interface routed before nat, so "-o lo" does not match it.
	icmp := "icmp"
	if fam == IPv6 {
		icmp = "ipv6-icmp"
	}
	filter := []Rule{
		{"-m", "owner", "--uid-owner", uid, "-j", "ACCEPT"},
		// Only the pod's own addresses may be a packet's source. A forged one (a raw socket,
		// or IPV6_FREEBIND, which needs no privilege) sent to the pod's own address over lo
		// would otherwise be accepted there and leave a conntrack entry whose "replies", sent
		// from the pod to the forged address, the REPLY rule below lets out: a two-way UDP
		// channel to any host. ICMPv6 is left to the next rule: the kernel's own neighbour
		// discovery is sent from the unspecified address.
		append(notICMPv6(fam), "-m", "addrtype", "!", "--src-type", "LOCAL", "-j", "DROP"),
		// ICMP from any socket (raw, or ping sockets) is the app's; the kernel's own (errors,
		// echo replies, neighbour discovery, MLD) has none. Without this, a raw socket could
		// carry data to any host in the ICMPv6 types accepted below, or in an ICMP error
		// claiming to be about a tracked connection.
		{"-p", icmp, "-m", "owner", "--uid-owner", "0-4294967294", "-j", "DROP"},
		{"-o", "lo", "-j", "ACCEPT"},
		{"-d", hostPrefix(redirectAddr(fam)), "-p", "tcp", "-m", "tcp", "--dport", strconv.Itoa(int(cfg.RedirectPort)), "-j", "ACCEPT"},
	}
	for _, p := range excluded {
		filter = append(filter, Rule{"-d", p, "-j", "ACCEPT"})
	}
	for _, port := range cfg.ExcludePorts {
		filter = append(filter, Rule{"-p", "tcp", "-m", "tcp", "--dport", strconv.Itoa(int(port)), "-j", "ACCEPT"})
	}
	for _, d := range dns {
		filter = append(filter,
			Rule{"-d", d, "-p", "udp", "-m", "udp", "--dport", "53", "-j", "ACCEPT"},
			Rule{"-d", d, "-p", "tcp", "-m", "tcp", "--dport", "53", "-j", "ACCEPT"})
	}
	// Replies of connections made to the pod (its servers, the kernel's echo replies and
	// resets), and ICMP errors about tracked connections.
	filter = append(filter,
		Rule{"-m", "conntrack", "--ctdir", "REPLY", "-j", "ACCEPT"},
		Rule{"-p", icmp, "-m", "conntrack", "--ctstate", "RELATED", "-j", "ACCEPT"})
	if fam == IPv6 {
		// What IPv6 itself needs: neighbour solicitation and advertisement, router
		// solicitation, MLDv2 reports, packet too big.
		for _, typ := range []string{"135", "136", "133", "143", "2"} {
			filter = append(filter, Rule{"-p", icmp, "-m", "icmp6", "--icmpv6-type", typ, "-j", "ACCEPT"})
		}
	}
	switch cfg.UDPPolicy {
	case UDPAllow:
		filter = append(filter, Rule{"-p", "udp", "-j", "ACCEPT"})
	case UDPReject:
		unreach := "icmp-port-unreachable"
		if fam == IPv6 {
			unreach = "icmp6-port-unreachable"
		}
		filter = append(filter, Rule{"-p", "udp", "-j", "REJECT", "--reject-with", unreach})
	}
	filter = append(filter, Rule{"-j", "DROP"})
	return Plan{Family: fam, Tables: []TablePlan{
		{Table: "nat", Chain: contract.NatChain, Rules: nat},          // redirects
		{Table: "filter", Chain: contract.FilterChain, Rules: filter}, // drops what must not leave directly
	}}
}

// notICMPv6 is the start of a rule that leaves ICMPv6 out in the IPv6 family, and nothing in
// the IPv4 one.
func notICMPv6(fam Family) Rule {
	if fam == IPv6 {
		return Rule{"!", "-p", "ipv6-icmp"}
	}
	return Rule{}
}

// redirectAddr is where REDIRECT sends locally made connections.
func redirectAddr(fam Family) netip.Addr {
	if fam == IPv6 {
		return netip.IPv6Loopback()
	}
	return netip.AddrFrom4([4]byte{127, 0, 0, 1})
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
