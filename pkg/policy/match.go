package policy

import (
	"net/netip"
	"sort"

	"github.com/egress-guard/egress-guard/pkg/hostname"
)

// Identity is one workload identity and its compiled rules.
type Identity struct {
	Name    string
	Mode    Mode
	APIKeys []string
	// ServiceAccounts are the selectors of the Kubernetes ServiceAccounts this identity
	// stands for: "namespace/name", or "namespace/*" for every ServiceAccount of a namespace.
	ServiceAccounts []string
	Rules           []*Rule

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
// suffix rules from the longest suffix to the shortest. The host is normalised with
// hostname.Normalize (case-insensitive, one trailing dot ignored; no allocation when it is
// normal already): a host that is not a valid name, such as an IP literal or a name with a
// numeric last label, never matches a name rule.
func (id *Identity) MatchName(host string, port uint16) *Rule {
	host, err := hostname.Normalize(host)
	if err != nil {
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
