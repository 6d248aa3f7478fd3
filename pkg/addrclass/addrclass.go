// Package addrclass says which IP addresses are internal.
//
// The proxy resolves every name itself and classifies each answer before dialing, so that an
// allowed public name (or a wildcard) never becomes a path to the cloud metadata service, a
// node's kubelet, or a private network. IPv6 forms that embed an IPv4 address (mapped,
// compatible, NAT64, 6to4, Teredo) are classified by what they embed: the kernel or a
// translator on the path would deliver them there.
package addrclass

import "net/netip"

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
	ULA               // fc00::/7
	Reserved          // 240.0.0.0/4, 192.0.0.0/24
	Self              // one of the proxy's own addresses
	Configured        // an operator-configured internal range
)

var classNames = [...]string{"public", "loopback", "link_local", "unspecified", "multicast", "private", "cgnat", "ula", "reserved", "self", "configured"}

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
var ranges = []rangeClass{
	{netip.MustParsePrefix("255.255.255.255/32"), Multicast},
	{netip.MustParsePrefix("0.0.0.0/8"), Unspecified},
	{netip.MustParsePrefix("10.0.0.0/8"), Private},
	{netip.MustParsePrefix("100.64.0.0/10"), CGNAT},
	{netip.MustParsePrefix("127.0.0.0/8"), Loopback},
	{netip.MustParsePrefix("169.254.0.0/16"), LinkLocal},
	{netip.MustParsePrefix("172.16.0.0/12"), Private},
	{netip.MustParsePrefix("192.0.0.0/24"), Reserved},
	{netip.MustParsePrefix("192.168.0.0/16"), Private},
	{netip.MustParsePrefix("224.0.0.0/4"), Multicast},
	{netip.MustParsePrefix("240.0.0.0/4"), Reserved},
	{netip.MustParsePrefix("::/128"), Unspecified},
	{netip.MustParsePrefix("::1/128"), Loopback},
	{netip.MustParsePrefix("fc00::/7"), ULA},
	{netip.MustParsePrefix("fe80::/10"), LinkLocal},
	{netip.MustParsePrefix("ff00::/8"), Multicast},
}

// IPv6 forms that carry an IPv4 address.
var (
	mapped     = netip.MustParsePrefix("::ffff:0:0/96")
	translated = netip.MustParsePrefix("::ffff:0:0:0/96")
	compatible = netip.MustParsePrefix("::/96")
	nat64      = netip.MustParsePrefix("64:ff9b::/96")
	nat64Local = netip.MustParsePrefix("64:ff9b:1::/48")
	sixToFour  = netip.MustParsePrefix("2002::/16")
	teredo     = netip.MustParsePrefix("2001::/32")
)

// Classifier classifies addresses. It is immutable and safe for concurrent use.
type Classifier struct {
	extra []netip.Prefix
	self  map[netip.Addr]bool
}

// New returns a classifier that also treats extra as Configured and self as Self.
func New(extra []netip.Prefix, self []netip.Addr) *Classifier {
	c := &Classifier{self: make(map[netip.Addr]bool, len(self))}
	for _, p := range extra {
		c.extra = append(c.extra, p.Masked())
	}
	for _, a := range self {
		c.self[a.WithZone("").Unmap()] = true
	}
	return c
}

// Classify returns the class of addr and the internal range that made it internal (the zero
// Prefix for Public). For an IPv6 embedding of an internal IPv4 address, the range returned is
// the embedding prefix itself, so that only a rule written for that IPv6 form names it.
func (c *Classifier) Classify(addr netip.Addr) (Class, netip.Prefix) {
	addr = addr.WithZone("")
	if addr.Is4In6() {
		if cl, _ := c.classify(addr.Unmap()); cl.Internal() {
			return cl, mapped
		}
		return Public, netip.Prefix{}
	}
	if cl, p := c.classify(addr); cl.Internal() {
		return cl, p
	}
	if addr.Is6() {
		for _, e := range embedded(addr) {
			if cl, _ := c.classify(e.v4); cl.Internal() {
				return cl, e.prefix
			}
		}
	}
	return Public, netip.Prefix{}
}

// classify looks addr up in the static table, the operator's ranges and the own addresses.
// The static table comes first so that, for example, 127.0.0.1 is Loopback (and named by a
// 127.0.0.0/8 rule) even though it is also one of the proxy's own addresses.
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
	if c.self[addr] {
		return Self, netip.PrefixFrom(addr, addr.BitLen())
	}
	return Public, netip.Prefix{}
}

type embedding struct {
	v4     netip.Addr
	prefix netip.Prefix
}

// embedded returns the IPv4 addresses an IPv6 address carries, with the form's prefix.
func embedded(a netip.Addr) []embedding {
	b := a.As16()
	last := netip.AddrFrom4([4]byte{b[12], b[13], b[14], b[15]})
	switch {
	case translated.Contains(a):
		return []embedding{{last, translated}}
	case compatible.Contains(a): // :: and ::1 were classified already
		return []embedding{{last, compatible}}
	case nat64.Contains(a):
		return []embedding{{last, nat64}}
	case nat64Local.Contains(a):
		return []embedding{{last, nat64Local}}
	case sixToFour.Contains(a):
		return []embedding{{netip.AddrFrom4([4]byte{b[2], b[3], b[4], b[5]}), sixToFour}}
	case teredo.Contains(a):
		server := netip.AddrFrom4([4]byte{b[4], b[5], b[6], b[7]})
		client := netip.AddrFrom4([4]byte{^b[12], ^b[13], ^b[14], ^b[15]})
		return []embedding{{client, teredo}, {server, teredo}}
	}
	return nil
}

// NamedBy reports whether a rule for prefix rule explicitly names the internal range that
// addr fell in (internal, as returned by Classify): the rule must contain addr and lie
// entirely inside that range.
//
// This is the invariant that keeps broad rules from opening internal networks: 10.0.0.0/24
// names 10.0.0.5 (inside 10/8), 169.254.169.254/32 names the metadata address, but 0.0.0.0/0
// or 8.0.0.0/5 name no internal address even though they contain some. Callers pass unmapped
// addresses (the proxy unmaps every resolved and literal address); a mapped address is then
// named only by a rule written in its IPv6 form.
func NamedBy(rule netip.Prefix, addr netip.Addr, internal netip.Prefix) bool {
	if !rule.IsValid() || !internal.IsValid() || !rule.Contains(addr.WithZone("")) {
		return false
	}
	return rule.Bits() >= internal.Bits() && internal.Contains(rule.Addr())
}
