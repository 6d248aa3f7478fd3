package resolver

import (
	"net/netip"
	"slices"
)

// precedence is RFC 6724's default policy table (section 2.1): the precedence of a
// destination address by its longest matching prefix.
var precedence = []struct {
	prefix netip.Prefix
	prec   int
}{
	{netip.MustParsePrefix("::1/128"), 50},
	{netip.MustParsePrefix("::ffff:0:0/96"), 35}, // IPv4
	{netip.MustParsePrefix("2002::/16"), 30},     // 6to4
	{netip.MustParsePrefix("2001::/32"), 5},      // Teredo
	{netip.MustParsePrefix("fc00::/7"), 3},       // ULA
	{netip.MustParsePrefix("::/96"), 1},
	{netip.MustParsePrefix("fec0::/10"), 1},
	{netip.MustParsePrefix("3ffe::/16"), 1},
	{netip.MustParsePrefix("::/0"), 40},
}

func precedenceOf(a netip.Addr) int {
	if a.Is4() {
		a = netip.AddrFrom16(a.As16())
	}
	best, bits := 40, -1
	for _, p := range precedence {
		if p.prefix.Contains(a) && p.prefix.Bits() > bits {
			best, bits = p.prec, p.prefix.Bits()
		}
	}
	return best
}

// sortByPrecedence orders addrs by RFC 6724 rule 6 (higher precedence first), keeping the
// answer's order otherwise: a global IPv6 address before IPv4, IPv4 before a ULA. This is the
// order Go's resolver gave (it sorts by RFC 6724) in the cases that matter here; the rules
// that depend on the source address (reachability, scope, label) are left to the dialer's
// Happy Eyeballs, which moves on from an unreachable family within 250 ms or at once.
func sortByPrecedence(addrs []netip.Addr) {
	slices.SortStableFunc(addrs, func(a, b netip.Addr) int { return precedenceOf(b) - precedenceOf(a) })
}
