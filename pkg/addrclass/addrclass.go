// Package addrclass says which IP addresses are internal.
//
// The proxy resolves every name itself and classifies each answer before dialing, so that an
// allowed public name (or a wildcard) never becomes a path to the cloud metadata service or
// another cloud platform endpoint, a node's kubelet, a private network, or the proxy itself.
// IPv6 forms that embed an IPv4 address (mapped, compatible, NAT64, 6to4, Teredo) are
// classified by what they embed: the kernel or a translator on the path would deliver them
// there.
package addrclass

import (
	"net/netip"
	"slices"
	"sync/atomic"
)

// Class is the kind of an address. Every class but Public is internal.
type Class uint8

// Classes.
const (
	Public      Class = iota
	Loopback          // 127.0.0.0/8, ::1
	LinkLocal         // 169.254.0.0/16 (cloud metadata 169.254.169.254), fe80::/10
	Unspecified       // 0.0.0.0/8 ("this network"), ::
	Multicast         // 224.0.0.0/4, ff00::/8, 255.255.255.255
	Private           // RFC 1918
	CGNAT             // 100.64.0.0/10
	ULA               // fc00::/7, and the deprecated site-local fec0::/10
	Reserved          // 240.0.0.0/4, 192.0.0.0/24
	Self              // one of the proxy's own addresses; wins over every other class
	Configured        // an operator-configured internal range
	Platform          // a cloud platform endpoint in otherwise public space (see ranges)
)

var classNames = [...]string{"public", "loopback", "link_local", "unspecified", "multicast", "private", "cgnat", "ula", "reserved", "self", "configured", "platform"}

func (c Class) String() string {
	if int(c) < len(classNames) {
		return classNames[c]
	}
	return "unknown"
}

// Internal reports whether c is anything but Public.
func (c Class) Internal() bool { return c != Public }

type rangeClass struct {
	prefix netip.Prefix
	class  Class
}

// ranges is the whole list of internal ranges, most specific first where they nest
// (broadcast before reserved). 198.18.0.0/15 (benchmarking) and the documentation ranges are
// deliberately absent: they are not internal networks.
//
// Cloud platform endpoints must be as unreachable as the metadata address: never through a
// name (not even with allow_internal), only through an IP rule for exactly that address.
//   - 169.254.169.254, instance metadata of AWS, GCP, Azure, OCI, DigitalOcean, OpenStack,
//     Hetzner and others: LinkLocal already, as are AWS's Route 53 Resolver 169.254.169.253
//     and Time Sync 169.254.169.123, the ECS task metadata 169.254.170.2 and Tencent's
//     169.254.0.23;
//   - Platform (listed below, before the ranges that contain them): Azure's WireServer
//     168.63.129.16 (public space), AWS instance metadata over IPv6 fd00:ec2::254 with its DNS
//     ::253 and time ::123, GCP metadata over IPv6 fd20:ce::254 (all inside the ULA range,
//     where an allow_internal name or an fd00::/8 pod-network rule would otherwise reach
//     them), and Alibaba Cloud metadata 100.100.100.200 (inside CGNAT, often a pod range).
//
// Anything else an operator considers a platform endpoint goes in INTERNAL_CIDRS (Configured).
var ranges = []rangeClass{
	{netip.MustParsePrefix("255.255.255.255/32"), Multicast},
	{netip.MustParsePrefix("0.0.0.0/8"), Unspecified},
	{netip.MustParsePrefix("10.0.0.0/8"), Private},
	{netip.MustParsePrefix("100.100.100.200/32"), Platform}, // Alibaba Cloud metadata
	{netip.MustParsePrefix("100.64.0.0/10"), CGNAT},
	{netip.MustParsePrefix("127.0.0.0/8"), Loopback},
	// Azure WireServer: the host agent endpoint VM agents and extensions talk to (goal state,
	// certificates, extension settings), also Azure's DNS resolver, DHCP server and health
	// probe source. A public address that is only ever the local host's.
	{netip.MustParsePrefix("168.63.129.16/32"), Platform},
	{netip.MustParsePrefix("169.254.0.0/16"), LinkLocal},
	{netip.MustParsePrefix("172.16.0.0/12"), Private},
	{netip.MustParsePrefix("192.0.0.0/24"), Reserved},
	{netip.MustParsePrefix("192.168.0.0/16"), Private},
	{netip.MustParsePrefix("224.0.0.0/4"), Multicast},
	{netip.MustParsePrefix("240.0.0.0/4"), Reserved},
	{netip.MustParsePrefix("::/128"), Unspecified},
	{netip.MustParsePrefix("::1/128"), Loopback},
	{netip.MustParsePrefix("fd00:ec2::123/128"), Platform}, // AWS time sync over IPv6
	{netip.MustParsePrefix("fd00:ec2::253/128"), Platform}, // AWS DNS over IPv6
	{netip.MustParsePrefix("fd00:ec2::254/128"), Platform}, // AWS instance metadata over IPv6
	{netip.MustParsePrefix("fd20:ce::254/128"), Platform},  // GCP metadata over IPv6
	{netip.MustParsePrefix("fc00::/7"), ULA},
	{netip.MustParsePrefix("fe80::/10"), LinkLocal},
	// Site-local, ULA's deprecated predecessor (RFC 3879): still routed inside some old
	// networks, never on the internet.
	{netip.MustParsePrefix("fec0::/10"), ULA},
	{netip.MustParsePrefix("ff00::/8"), Multicast},
}

// IPv6 forms that carry an IPv4 address.
var (
	translated = netip.MustParsePrefix("::ffff:0:0:0/96")
	compatible = netip.MustParsePrefix("::/96")
	nat64      = netip.MustParsePrefix("64:ff9b::/96")
	nat64Local = netip.MustParsePrefix("64:ff9b:1::/48")
	sixToFour  = netip.MustParsePrefix("2002::/16")
	teredo     = netip.MustParsePrefix("2001::/32")
)

// Classifier classifies addresses. It is safe for concurrent use: the operator's ranges are
// fixed at New, and the proxy's own addresses are an immutable set that SetSelf swaps
// atomically. The zero Classifier knows no operator range and no own address.
type Classifier struct {
	extra []netip.Prefix
	self  atomic.Pointer[selfSet]
}

// selfSet is an immutable set of own addresses: unzoned, unmapped, sorted, without duplicates.
type selfSet struct {
	addrs []netip.Addr
}

// has reports whether a (unzoned, unmapped) is in the set; a nil set is empty. A pod or a node
// has a handful of addresses: a linear scan of comparable values beats hashing them.
func (s *selfSet) has(a netip.Addr) bool {
	if s == nil {
		return false
	}
	if len(s.addrs) > 16 {
		_, ok := slices.BinarySearchFunc(s.addrs, a, netip.Addr.Compare)
		return ok
	}
	for _, x := range s.addrs {
		if x == a {
			return true
		}
	}
	return false
}

// New returns a classifier that also treats extra as Configured and self as Self.
func New(extra []netip.Prefix, self []netip.Addr) *Classifier {
	c := &Classifier{}
	for _, p := range extra {
		c.extra = append(c.extra, p.Masked())
	}
	c.SetSelf(self)
	return c
}

// SetSelf replaces the set of the proxy's own addresses, for example after the pod or node
// gained or lost an address. It copies addrs (ignoring zones and unmapping IPv4-mapped forms)
// and publishes the new set atomically: it may be called while other goroutines classify, each
// Classify seeing either the old set or the new one.
func (c *Classifier) SetSelf(addrs []netip.Addr) {
	s := &selfSet{addrs: make([]netip.Addr, 0, len(addrs))}
	for _, a := range addrs {
		// Loopback stays loopback: it is never reachable through a name either way, and
		// an operator's 127.0.0.0/8 rule (local services, the benchmarks) keeps its meaning.
		if a.IsValid() && !a.Unmap().IsLoopback() {
			s.addrs = append(s.addrs, a.WithZone("").Unmap())
		}
	}
	slices.SortFunc(s.addrs, netip.Addr.Compare)
	s.addrs = slices.Compact(s.addrs)
	c.self.Store(s)
}

// Classify returns the class of addr and the internal range that made it internal (the zero
// Prefix for Public). For an IPv6 embedding of an internal IPv4 address, the range returned is
// the IPv6 image of the IPv4 range (see image), so that only a rule written for that IPv6 form
// of the internal range names it, never one for the embedding prefix as a whole.
//
// The proxy's own addresses are looked up first, in every form (plain, and the IPv4 address an
// IPv6 form embeds), so Self wins over every range class: the pod IP is RFC 1918 or ULA, yet
// it is Self. (Loopback addresses are not taken into the own set: they stay Loopback.) Its range is the address itself (/32, or /128 for an
// IPv6 form), so only an IP rule for exactly that address names it.
//
// Classify does not allocate.
func (c *Classifier) Classify(addr netip.Addr) (Class, netip.Prefix) {
	addr = addr.WithZone("")
	self := c.self.Load()
	if addr.Is4In6() {
		v4 := addr.Unmap()
		if self.has(v4) {
			return Self, netip.PrefixFrom(addr, 128)
		}
		if cl, r := c.classify(v4); cl.Internal() {
			return cl, image(addr, 96, cl, r)
		}
		return Public, netip.Prefix{}
	}
	if self.has(addr) {
		return Self, netip.PrefixFrom(addr, addr.BitLen())
	}
	if cl, p := c.classify(addr); cl.Internal() {
		return cl, p
	}
	if addr.Is6() {
		v4s, n, at := embedded(addr)
		for _, v4 := range v4s[:n] {
			if self.has(v4) {
				return Self, netip.PrefixFrom(addr, 128)
			}
		}
		for _, v4 := range v4s[:n] {
			if cl, r := c.classify(v4); cl.Internal() {
				return cl, image(addr, at, cl, r)
			}
		}
	}
	return Public, netip.Prefix{}
}

// classify looks addr up in the static table, then in the operator's ranges.
func (c *Classifier) classify(addr netip.Addr) (Class, netip.Prefix) {
	for _, r := range ranges {
		if r.prefix.Contains(addr) {
			return r.class, r.prefix
		}
	}
	for _, p := range c.extra {
		if p.Contains(addr) {
			return Configured, p
		}
	}
	return Public, netip.Prefix{}
}

// embedded returns the IPv4 addresses an IPv6 address carries (the first n of v4s: none, one,
// Teredo's client and server, or the four places an operator's local-use NAT64 prefix may put
// it) and the bit at which the form puts it (0 when not in one place: Teredo, local-use NAT64).
// It returns an array, not a slice, so that Classify does not
// allocate.
func embedded(a netip.Addr) (v4s [4]netip.Addr, n int, at int) {
	b := a.As16()
	last := netip.AddrFrom4([4]byte{b[12], b[13], b[14], b[15]})
	switch {
	case translated.Contains(a):
		return [4]netip.Addr{last}, 1, 96
	case compatible.Contains(a): // :: and ::1 were classified already
		return [4]netip.Addr{last}, 1, 96
	case nat64.Contains(a):
		return [4]netip.Addr{last}, 1, 96
	case nat64Local.Contains(a):
		// RFC 8215 lets the operator use a /48, /56, /64 or /96 inside 64:ff9b:1::/48, and
		// RFC 6052 puts the IPv4 address in a different place for each. Which one this
		// network uses is not known here, so every place that can hold one is checked: the
		// first three only when bits 64-71 are zero, as RFC 6052 requires of them. A place
		// that holds 0.0.0.0/8 is what the other layouts leave there, not an address (a
		// translator never sends to "this network"), and is skipped.
		candidates := [...]netip.Addr{
			netip.AddrFrom4([4]byte{b[6], b[7], b[9], b[10]}),   // /48
			netip.AddrFrom4([4]byte{b[7], b[9], b[10], b[11]}),  // /56
			netip.AddrFrom4([4]byte{b[9], b[10], b[11], b[12]}), // /64
			last, // /96
		}
		for i, c := range candidates {
			if (i == 3 || b[8] == 0) && c.As4()[0] != 0 {
				v4s[n], n = c, n+1
			}
		}
		return v4s, n, 0
	case sixToFour.Contains(a):
		return [4]netip.Addr{netip.AddrFrom4([4]byte{b[2], b[3], b[4], b[5]})}, 1, 16
	case teredo.Contains(a):
		server := netip.AddrFrom4([4]byte{b[4], b[5], b[6], b[7]})
		client := netip.AddrFrom4([4]byte{^b[12], ^b[13], ^b[14], ^b[15]})
		return [4]netip.Addr{client, server}, 2, 0
	}
	return v4s, 0, 0
}

// image is the internal range of an IPv6 form that embeds an internal IPv4 address whose
// range is r: the IPv6 image of r in that form (64:ff9b::a00:0/104 for 10.0.0.0/8 through
// NAT64). A rule for the embedding prefix as a whole, such as 64:ff9b::/96 on an IPv6-only
// cluster with DNS64 to reach the IPv4 internet, must not name the metadata address or a
// private network through it; a rule for the image of 10.0.0.0/8 may name 10.0.0.5 through it.
// Endpoints (Platform, and the loopback and link-local ranges that hold the metadata services)
// are the address alone, as Self is. Forms whose IPv4 bits are not in one place (Teredo, the
// local-use NAT64 prefix) are the address alone too.
func image(addr netip.Addr, at int, cl Class, r netip.Prefix) netip.Prefix {
	if at == 0 || cl == Platform || cl == Loopback || cl == LinkLocal {
		return netip.PrefixFrom(addr, 128)
	}
	return netip.PrefixFrom(addr, at+r.Bits()).Masked()
}

// NamedBy reports whether a rule for prefix rule explicitly names the internal range that
// addr fell in (internal, as returned by Classify): the rule must contain addr and lie
// entirely inside that range.
//
// This is the invariant that keeps broad rules from opening internal networks: 10.0.0.0/24
// names 10.0.0.5 (inside 10/8), 169.254.169.254/32 names the metadata address, but 0.0.0.0/0
// or 8.0.0.0/5 name no internal address even though they contain some. A Platform or Self
// address's range is the address alone, so only a rule for exactly it names it. Callers pass unmapped
// addresses (the proxy unmaps every resolved and literal address); a mapped address is then
// named only by a rule written in its IPv6 form.
func NamedBy(rule netip.Prefix, addr netip.Addr, internal netip.Prefix) bool {
	if !rule.IsValid() || !internal.IsValid() || !rule.Contains(addr.WithZone("")) {
		return false
	}
	return rule.Bits() >= internal.Bits() && internal.Contains(rule.Addr())
}
