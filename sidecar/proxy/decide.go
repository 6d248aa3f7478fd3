package proxy

import (
	"context"
	"errors"
	"net/netip"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/egress-guard/egress-guard/pkg/accesslog"
	"github.com/egress-guard/egress-guard/pkg/addrclass"
	"github.com/egress-guard/egress-guard/pkg/dialer"
	"github.com/egress-guard/egress-guard/pkg/metrics"
	"github.com/egress-guard/egress-guard/pkg/policy"
)

// Decision reasons (the reason field of decision lines and of the audit metric).
const (
	ReasonRule            = "rule"
	ReasonNoMatchingRule  = "no_matching_rule"
	ReasonInternal        = "internal_address"
	ReasonNoCredentials   = "no_credentials"
	ReasonUnknownKey      = "unknown_api_key"
	ReasonUnknownIdentity = "unknown_identity"
	ReasonNoOriginalDst   = "no_original_destination"
	ReasonProxyLoop       = "proxy_loop"
	ReasonNoPolicy        = "no_policy"
	ReasonResolveFailed   = "resolve_failed"
	ReasonNoSuchHost      = "no_such_host"
	ReasonMalformed       = "malformed_request"
	ReasonHeaderTooLarge  = "header_too_large"
	ReasonTunnelLimit     = "tunnel_limit"
	ReasonSNIMismatch     = "sni_mismatch"
	ReasonSNIMissing      = "sni_missing"
	ReasonNoClientHello   = "no_client_hello"
	ReasonDialFailed      = "dial_failed"
	ReasonDialTimeout     = "dial_timeout"
)

// target is a destination as the client named it.
type target struct {
	host string     // normalised name, or the IP's string form
	addr netip.Addr // valid when the client named an IP literal
	port uint16
}

func (t target) display() string {
	if t.addr.IsValid() {
		return netip.AddrPortFrom(t.addr, t.port).String()
	}
	return t.host + ":" + strconv.Itoa(int(t.port))
}

// parseTarget validates a host and port from a CONNECT authority or URL. Names are lowercased
// with one trailing dot removed; anything that is not an IP literal or an ASCII host name is
// rejected, so that a name that reaches policy matching and the resolver is the one that was
// logged.
func parseTarget(host, port string) (target, error) {
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil || p == 0 {
		return target{}, errors.New("invalid port")
	}
	h := strings.TrimSuffix(strings.TrimPrefix(host, "["), "]")
	if a, err := netip.ParseAddr(h); err == nil {
		if a.Zone() != "" {
			return target{}, errors.New("IPv6 zones are not allowed")
		}
		a = a.Unmap()
		return target{host: a.String(), addr: a, port: uint16(p)}, nil
	}
	if host != h {
		return target{}, errors.New("brackets around a non-IPv6 host")
	}
	h = strings.ToLower(strings.TrimSuffix(host, "."))
	if !validHostname(h) {
		return target{}, errors.New("invalid host name")
	}
	return target{host: h, port: uint16(p)}, nil
}

func validHostname(h string) bool {
	if len(h) == 0 || len(h) > 253 {
		return false
	}
	label := 0
	for i := 0; i < len(h); i++ {
		c := h[i]
		switch {
		case c == '.':
			if label == 0 {
				return false
			}
			label = 0
			continue
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9', c == '-', c == '_':
		default:
			return false
		}
		label++
		if label > 63 {
			return false
		}
	}
	return label > 0
}

// decision is the outcome of the policy and address checks for one destination.
type decision struct {
	allow  bool
	action string // accesslog.Action*
	reason string
	status string // metrics.Status*
	rule   *policy.Rule
	addrs  []netip.Addr // vetted addresses to dial, in preference order
}

func (d *decision) destination() string {
	if d.rule == nil {
		return "none"
	}
	return d.rule.Entry
}

func deny(reason string, rule *policy.Rule) decision {
	return decision{action: accesslog.ActionDenied, reason: reason, status: metrics.StatusDenied, rule: rule}
}

// decide applies the identity's rules to the target, then resolves it and keeps only the
// addresses the identity may reach. Nothing is dialed here: a denied destination never sees
// a packet.
//
// Audit mode relaxes only the rule match. The internal-address guard is never relaxed: audit
// is for rolling out a policy, not for opening the metadata endpoint while doing so.
//
// known, when not nil, maps addresses that the proxy itself resolved for the identity's exact
// names to their rules: the transparent listener uses it to allow a connection that named no
// host (a server-first protocol) to an address of an allowed exact name.
func (s *Server) decide(ctx context.Context, id *policy.Identity, t target, known *knownAddrs) decision {
	var rule *policy.Rule
	if t.addr.IsValid() {
		rule = id.MatchAddr(t.addr, t.port)
		if rule == nil {
			rule = known.lookup(t.addr, t.port)
		}
	} else {
		rule = id.MatchName(t.host, t.port)
	}
	d := decision{allow: true, action: accesslog.ActionAllowed, reason: ReasonRule, status: metrics.StatusAllowed, rule: rule}
	if rule == nil {
		if id.Mode != policy.ModeAudit {
			return deny(ReasonNoMatchingRule, nil)
		}
		d.action, d.reason = accesslog.ActionAudit, ReasonNoMatchingRule
	}

	var addrs []netip.Addr
	if t.addr.IsValid() {
		addrs = []netip.Addr{t.addr}
	} else {
		var err error
		addrs, err = dialer.Lookup(ctx, s.cfg.Resolver, t.host)
		if err != nil {
			d.allow = false
			d.status = metrics.StatusConnectionFailed
			d.reason = ReasonResolveFailed
			if errors.Is(err, dialer.ErrNoSuchHost) {
				d.reason = ReasonNoSuchHost
			}
			return d
		}
	}
	vetted := addrs[:0:0]
	for _, a := range addrs {
		if s.reachable(id, rule, a, t.port) {
			vetted = append(vetted, a)
		}
	}
	if len(vetted) == 0 {
		return deny(ReasonInternal, rule)
	}
	d.addrs = vetted
	return d
}

// reachable reports whether the identity may connect to a (resolved or literal) address.
// Public addresses are reachable once the destination was allowed. An internal address is
// reachable only through a rule that names it: an IP/CIDR rule of this identity that lies
// inside the address's internal range (so 0.0.0.0/0 never names 10/8), or a name rule with
// allow_internal for the private ranges. Loopback, link-local (metadata), the proxy's own
// addresses and the like are never reached through a name.
func (s *Server) reachable(id *policy.Identity, rule *policy.Rule, a netip.Addr, port uint16) bool {
	class, internal := s.cfg.Classifier.Classify(a)
	if !class.Internal() {
		return true
	}
	if r := id.MatchAddr(a, port); r != nil && addrclass.NamedBy(r.Prefix, a, internal) {
		return true
	}
	if rule != nil && rule.AllowInternal && (rule.Kind == policy.KindExact || rule.Kind == policy.KindSuffix) {
		switch class {
		case addrclass.Private, addrclass.CGNAT, addrclass.ULA, addrclass.Configured:
			return true
		}
	}
	return false
}

// knownAddrs maps the addresses of one identity's exact-name rules, as the proxy resolved
// them, to those rules. It is rebuilt in the background and replaced atomically.
type knownAddrs struct {
	policy *policy.Policy // the policy it was built from
	byAddr map[netip.Addr][]*policy.Rule
}

func (k *knownAddrs) lookup(a netip.Addr, port uint16) *policy.Rule {
	if k == nil {
		return nil
	}
	for _, r := range k.byAddr[a] {
		if r.AllowsPort(port) {
			return r
		}
	}
	return nil
}

// knownAddrsRefresher keeps a knownAddrs current for the sidecar's identity.
type knownAddrsRefresher struct {
	cur atomic.Pointer[knownAddrs]
}

// refresh resolves every exact-name rule of the identity. Resolution failures leave that
// name out until the next round; they are not fatal (the name may not exist yet).
func (s *Server) refreshKnown(ctx context.Context, pol *policy.Policy) *knownAddrs {
	k := &knownAddrs{policy: pol, byAddr: map[netip.Addr][]*policy.Rule{}}
	id := pol.Identity(s.cfg.Identity)
	if id == nil {
		return k
	}
	for _, r := range id.Rules {
		if r.Kind != policy.KindExact {
			continue
		}
		lctx, cancel := context.WithTimeout(ctx, s.cfg.DialTimeout)
		addrs, err := dialer.Lookup(lctx, s.cfg.Resolver, r.Host)
		cancel()
		if err != nil {
			s.cfg.Log.Debug("resolve exact-name rule", "rule", r.Entry, "err", err)
			continue
		}
		for _, a := range addrs {
			k.byAddr[a] = append(k.byAddr[a], r)
		}
	}
	return k
}

// RunKnownAddrs keeps the addresses of the sidecar identity's exact names current: it
// resolves them at once when the policy changes and again every interval.
func (s *Server) RunKnownAddrs(ctx context.Context, interval time.Duration) {
	if s.cfg.Identity == "" {
		return
	}
	check := time.NewTicker(time.Second)
	defer check.Stop()
	var last time.Time
	for {
		pol := s.cfg.Policy()
		cur := s.known.cur.Load()
		if pol != nil && (cur == nil || cur.policy != pol || time.Since(last) >= interval) {
			s.known.cur.Store(s.refreshKnown(ctx, pol))
			last = time.Now()
		}
		select {
		case <-ctx.Done():
			return
		case <-check.C:
		}
	}
}
