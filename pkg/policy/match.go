package policy

import (
	"net/netip"
	"sort"
)

// Identity is one workload identity and its compiled rules.
type Identity struct {
	Name    string
	Mode    Mode
	APIKeys []string
	Rules   []*Rule

	exact  map[string][]*Rule
	suffix map[string][]*Rule
	// Address rules by prefix, grouped by prefix length; lengths are kept longest first per
	// family so that the most specific rule is found first. A lookup costs one map access per
	// distinct length (at most 33 or 129), however many rules there are.
	prefixes map[netip.Prefix][]*Rule
	lens4    []int
	lens6    []int
}

func (id *Identity) compile() {
	id.exact = map[string][]*Rule{}
	id.suffix = map[string][]*Rule{}
	id.prefixes = map[netip.Prefix][]*Rule{}
	seen4, seen6 := map[int]bool{}, map[int]bool{}
	for _, r := range id.Rules {
		switch r.Kind {
		case KindExact:
			id.exact[r.Host] = append(id.exact[r.Host], r)
		case KindSuffix:
			id.suffix[r.Host] = append(id.suffix[r.Host], r)
		case KindIP, KindCIDR:
			id.prefixes[r.Prefix] = append(id.prefixes[r.Prefix], r)
			if r.Prefix.Addr().Is4() {
				seen4[r.Prefix.Bits()] = true
			} else {
				seen6[r.Prefix.Bits()] = true
			}
		}
	}
	id.lens4, id.lens6 = sortedDesc(seen4), sortedDesc(seen6)
}

func sortedDesc(m map[int]bool) []int {
	out := make([]int, 0, len(m))
	for n := range m {
		out = append(out, n)
	}
	sort.Sort(sort.Reverse(sort.IntSlice(out)))
	return out
}

// MatchName returns the rule that allows host:port, or nil. Exact rules come first, then
// suffix rules from the longest suffix to the shortest. The host is compared
// case-insensitively and without one trailing dot; an IP literal never matches a name rule.
func (id *Identity) MatchName(host string, port uint16) *Rule {
	host = canonicalHost(host)
	if host == "" || looksNumeric(host) {
		return nil
	}
	if r := firstForPort(id.exact[host], port); r != nil {
		return r
	}
	if len(id.suffix) == 0 {
		return nil
	}
	for i := 0; i < len(host); i++ {
		if host[i] == '.' {
			if r := firstForPort(id.suffix[host[i+1:]], port); r != nil {
				return r
			}
		}
	}
	return nil
}

// MatchAddr returns the most specific IP or CIDR rule that contains addr and allows port, or
// nil.
func (id *Identity) MatchAddr(addr netip.Addr, port uint16) *Rule {
	addr = addr.WithZone("").Unmap()
	lens := id.lens6
	if addr.Is4() {
		lens = id.lens4
	}
	for _, bits := range lens {
		p, err := addr.Prefix(bits)
		if err != nil {
			continue
		}
		if r := firstForPort(id.prefixes[p], port); r != nil {
			return r
		}
	}
	return nil
}

func firstForPort(rules []*Rule, port uint16) *Rule {
	for _, r := range rules {
		if r.AllowsPort(port) {
			return r
		}
	}
	return nil
}

// canonicalHost lowercases and drops one trailing dot, allocating only when it must.
func canonicalHost(h string) string {
	if n := len(h); n > 0 && h[n-1] == '.' {
		h = h[:n-1]
	}
	for i := 0; i < len(h); i++ {
		if c := h[i]; c >= 'A' && c <= 'Z' {
			b := []byte(h)
			for j := i; j < len(b); j++ {
				if b[j] >= 'A' && b[j] <= 'Z' {
					b[j] += 'a' - 'A'
				}
			}
			return string(b)
		}
	}
	return h
}

// looksNumeric reports a host whose last label is all digits or that contains a colon: an IP
// literal, which only address rules may match.
func looksNumeric(h string) bool {
	i := len(h) - 1
	for ; i >= 0 && h[i] != '.'; i-- {
		if h[i] == ':' {
			return true
		}
		if h[i] < '0' || h[i] > '9' {
			return false
		}
	}
	return true
}
