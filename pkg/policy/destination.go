package policy

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/egress-guard/egress-guard/pkg/hostname"
)

// RuleKind says how a rule matches.
type RuleKind int

// Rule kinds, in the original egress-guard's matching order.
const (
	KindExact  RuleKind = iota // a name, case-insensitive
	KindSuffix                 // *.suffix: any name below suffix, not suffix itself
	KindIP                     // one address (Prefix is /32 or /128)
	KindCIDR                   // a range
)

// PortRange is an inclusive range of ports.
type PortRange struct{ Lo, Hi uint16 }

// Rule is one allowed destination entry.
type Rule struct {
	Entry         string       // as written, used as the bounded metric label
	Kind          RuleKind     //
	Host          string       // normalised name (Exact), or the suffix without "*." (Suffix)
	Prefix        netip.Prefix // masked (IP, CIDR)
	Ports         []PortRange  // empty: any port
	AllowInternal bool         // may reach private addresses through this name (see Options)
	// TLSOptional lets a CONNECT tunnel to a TLS port carry another protocol (ssh over 443);
	// when it does start with a ClientHello, its SNI must still name the host.
	TLSOptional bool
	AllowECH    bool // a ClientHello with encrypted_client_hello may use this rule (ECH=deny)
	Line        int

	// Dest and PortText are the destination and ports as written (without brackets), so that
	// the rule can be written out again with the same Entry (Document).
	Dest     string
	PortText []string
}

// AllowsPort reports whether the rule covers port.
func (r *Rule) AllowsPort(port uint16) bool {
	if len(r.Ports) == 0 {
		return true
	}
	for _, p := range r.Ports {
		if port >= p.Lo && port <= p.Hi {
			return true
		}
	}
	return false
}

// parseDestination parses one destination string: a name, *.suffix, IP or CIDR, optionally
// followed by :PORT or :LO-HI (IPv6 forms take brackets when they carry a port).
func parseDestination(s string) (*Rule, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return nil, errors.New("empty destination")
	}
	host, portSpec, err := splitPort(s)
	if err != nil {
		return nil, err
	}
	r := &Rule{Entry: s, Dest: host}
	if portSpec != "" {
		pr, err := parsePortRange(portSpec)
		if err != nil {
			return nil, err
		}
		r.Ports = []PortRange{pr}
		r.PortText = []string{portSpec}
	}
	switch {
	case strings.Contains(host, "/"):
		p, err := netip.ParsePrefix(host)
		if err != nil {
			return nil, fmt.Errorf("malformed CIDR: %v", cleanErr(err))
		}
		if p.Addr().Zone() != "" {
			return nil, errors.New("IPv6 zones are not allowed")
		}
		if p.Addr().Is4In6() {
			return nil, fmt.Errorf("IPv4-mapped CIDR; write the IPv4 range instead")
		}
		if m := p.Masked(); m != p {
			return nil, fmt.Errorf("CIDR has host bits set; did you mean %s?", m)
		}
		r.Kind, r.Prefix = KindCIDR, p
	case isIPLiteral(host):
		a, err := netip.ParseAddr(host)
		if err != nil {
			return nil, fmt.Errorf("malformed IP address: %v", cleanErr(err))
		}
		if a.Zone() != "" {
			return nil, errors.New("IPv6 zones are not allowed")
		}
		a = a.Unmap()
		r.Kind, r.Prefix = KindIP, netip.PrefixFrom(a, a.BitLen())
	case host == "*" || host == "*." || host == "**":
		return nil, errors.New("bare wildcard is not allowed: it would allow every destination")
	case strings.HasPrefix(host, "*."):
		suffix, err := hostname.NormalizePolicy(host[2:])
		if err != nil {
			return nil, err
		}
		if !strings.Contains(suffix, ".") {
			return nil, fmt.Errorf("wildcard covers a whole top-level domain (%q)", suffix)
		}
		if len(suffix) > hostname.MaxLength-2 {
			return nil, fmt.Errorf("wildcard suffix longer than %d bytes: no valid name fits below it", hostname.MaxLength-2)
		}
		r.Kind, r.Host = KindSuffix, suffix
	case strings.Contains(host, "*"):
		return nil, errors.New("a wildcard is allowed only as a leading \"*.\" label")
	default:
		name, err := hostname.NormalizePolicy(host)
		if err != nil {
			return nil, err
		}
		r.Kind, r.Host = KindExact, name
	}
	return r, nil
}

// isIPLiteral tells addresses from names before either is validated: anything with a colon is
// an IPv6 attempt, and dotted digits an IPv4 attempt (so "10.0.0.300" is a bad IP, not a name).
func isIPLiteral(h string) bool {
	if strings.Contains(h, ":") {
		return true
	}
	for i := 0; i < len(h); i++ {
		if c := h[i]; c != '.' && (c < '0' || c > '9') {
			return false
		}
	}
	return h != ""
}

// splitPort separates a trailing :port or :lo-hi.
func splitPort(s string) (host, port string, err error) {
	if strings.HasPrefix(s, "[") {
		end := strings.IndexByte(s, ']')
		if end < 0 {
			return "", "", errors.New("missing ']'")
		}
		host, rest := s[1:end], s[end+1:]
		if rest == "" {
			return host, "", nil
		}
		if !strings.HasPrefix(rest, ":") {
			return "", "", errors.New("unexpected text after ']'")
		}
		if !strings.Contains(host, ":") {
			return "", "", errors.New("brackets are only for IPv6")
		}
		return host, rest[1:], nil
	}
	switch strings.Count(s, ":") {
	case 0:
		return s, "", nil
	case 1:
		i := strings.IndexByte(s, ':')
		return s[:i], s[i+1:], nil
	default:
		return s, "", nil // bare IPv6 address or range; a port needs brackets
	}
}

func parsePortRange(s string) (PortRange, error) {
	lo, hi, isRange := strings.Cut(s, "-")
	l, err := parsePort(lo)
	if err != nil {
		return PortRange{}, err
	}
	if !isRange {
		return PortRange{l, l}, nil
	}
	h, err := parsePort(hi)
	if err != nil {
		return PortRange{}, err
	}
	if l > h {
		return PortRange{}, fmt.Errorf("port range %s is reversed", s)
	}
	return PortRange{l, h}, nil
}

func parsePort(s string) (uint16, error) {
	n, err := strconv.ParseUint(strings.TrimSpace(s), 10, 32)
	if err != nil || n < 1 || n > 65535 {
		return 0, fmt.Errorf("port %q is not in 1-65535", s)
	}
	return uint16(n), nil
}

// cleanErr drops netip's quoting of the whole input, which the caller prints already.
func cleanErr(err error) string {
	msg := err.Error()
	if i := strings.LastIndex(msg, ": "); i >= 0 {
		return msg[i+2:]
	}
	return msg
}
