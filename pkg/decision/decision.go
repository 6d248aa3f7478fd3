// Package decision is egress-guard's decision, free of sockets: an identity and a target go
// in, with a resolver and an address classifier; a verdict comes out — allowed, audited,
// denied or failed, the reason, the rule, and the vetted addresses that may be dialed. Every
// listener (explicit, transparent) calls the same function, and so will the control plane and
// an explain command.
//
// Nothing is dialed here: a denied destination never sees a packet. Names are resolved by the
// proxy itself, as absolute names (a pod's search list must not let a search-domain record
// answer for an allowed name), and every answer is classified: a public name or a wildcard
// never becomes a path to an internal address.
package decision

import (
	"context"
	"errors"
	"net/netip"
	"strconv"

	"github.com/egress-guard/egress-guard/pkg/addrclass"
	"github.com/egress-guard/egress-guard/pkg/dialer"
	"github.com/egress-guard/egress-guard/pkg/outcome"
	"github.com/egress-guard/egress-guard/pkg/policy"
)

// Target is a destination as the client named it.
type Target struct {
	Host string     // normalised host name; "" when the client named an address only
	Addr netip.Addr // the IP literal (or, captured without a name, the original destination)
	Port uint16
}

// IsName reports whether the client named a host rather than an address.
func (t Target) IsName() bool { return t.Host != "" }

// String is host:port, or addr:port with IPv6 in brackets.
func (t Target) String() string {
	if t.Host == "" {
		return netip.AddrPortFrom(t.Addr, t.Port).String()
	}
	return t.Host + ":" + strconv.Itoa(int(t.Port))
}

// Verdict is the outcome of a decision. Action and Reason are never contradictory: a verdict
// is built only by this package's functions.
type Verdict struct {
	Action outcome.Action
	Reason outcome.Reason
	Rule   *policy.Rule // the rule that matched, if any
	Addrs  []netip.Addr // when the action proceeds: the vetted addresses, in preference order
}

// Refuse is the verdict for a connection refused before any policy rule applies (no
// credentials, malformed request, no policy, the connection cap ...).
func Refuse(r outcome.Reason) Verdict { return Verdict{Action: outcome.ActionOf(r), Reason: r} }

// Proceeds reports whether the connection is dialed.
func (v Verdict) Proceeds() bool { return v.Action.Proceeds() }

// Status is the request status the connection is counted with.
func (v Verdict) Status() outcome.Status {
	if v.Proceeds() {
		return outcome.StatusAllowed
	}
	return outcome.StatusOf(v.Reason)
}

// Destination is the matched policy entry, or "none": a bounded metric label.
func (v Verdict) Destination() string {
	if v.Rule == nil {
		return "none"
	}
	return v.Rule.Entry
}

// Decider holds what a decision needs besides its inputs.
type Decider struct {
	Resolver   dialer.Resolver
	Classifier *addrclass.Classifier
}

// Decide applies the identity's rules to the target, then resolves it and keeps only the
// addresses the identity may reach.
//
// Audit mode relaxes only the rule match. The internal-address guard is never relaxed: audit
// is for rolling out a policy, not for opening the metadata endpoint while doing so.
//
// known, when not nil, maps addresses the proxy itself resolved for the identity's exact names
// to their rules: a captured connection that named no host (a server-first protocol) to such
// an address is allowed by that rule.
func (d *Decider) Decide(ctx context.Context, id *policy.Identity, t Target, known *KnownAddrs) Verdict {
	rule := match(id, t, known)
	v := Verdict{Action: outcome.Allowed, Reason: outcome.Rule, Rule: rule}
	if rule == nil {
		if id.Mode != policy.ModeAudit {
			return Refuse(outcome.NoMatchingRule)
		}
		v.Action, v.Reason = outcome.Audit, outcome.NoMatchingRule
	}

	addrs := []netip.Addr{t.Addr}
	if t.IsName() {
		var err error
		addrs, err = dialer.Lookup(ctx, d.Resolver, t.Host)
		if err != nil {
			r := outcome.ResolveFailed
			if errors.Is(err, dialer.ErrNoSuchHost) {
				r = outcome.NoSuchHost
			}
			return Verdict{Action: outcome.Failed, Reason: r, Rule: rule}
		}
	}
	vetted := addrs[:0:0]
	for _, a := range addrs {
		if d.reachable(id, rule, a, t.Port) {
			vetted = append(vetted, a)
		}
	}
	if len(vetted) == 0 {
		return Verdict{Action: outcome.Denied, Reason: outcome.InternalAddress, Rule: rule}
	}
	v.Addrs = vetted
	return v
}

// reachable reports whether the identity may connect to a (resolved or literal) address.
// Public addresses are reachable once the destination was allowed. An internal address is
// reachable only through a rule that names it: an IP/CIDR rule of this identity that lies
// inside the address's internal range (so 0.0.0.0/0 never names 10/8), or a name rule with
// allow_internal for the private ranges. Loopback, link-local (metadata), the proxy's own
// addresses and the like are never reached through a name.
func (d *Decider) reachable(id *policy.Identity, rule *policy.Rule, a netip.Addr, port uint16) bool {
	class, internal := d.Classifier.Classify(a)
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

// match is the identity's rule for the target: a name rule for a name; for an address, an
// address rule, else an exact name the proxy resolved to that address.
func match(id *policy.Identity, t Target, known *KnownAddrs) *policy.Rule {
	if t.IsName() {
		return id.MatchName(t.Host, t.Port)
	}
	if r := id.MatchAddr(t.Addr, t.Port); r != nil {
		return r
	}
	return known.Lookup(t.Addr, t.Port)
}

// StillAllows re-checks an established connection against a (new) policy: the identity's
// rules must still match the target (audit mode still lets anything through), and the address
// the connection went to must still be reachable for the identity. Nothing is resolved.
func (d *Decider) StillAllows(id *policy.Identity, t Target, upstream netip.Addr, known *KnownAddrs) bool {
	rule := match(id, t, known)
	if rule == nil && id.Mode != policy.ModeAudit {
		return false
	}
	return !upstream.IsValid() || d.reachable(id, rule, upstream, t.Port)
}

// CheckSNI applies the result of a CONNECT tunnel's ClientHello check to an allowed verdict:
// reason is 0 when the ClientHello named the CONNECT host, else SNIMismatch, SNIMissing or
// NoClientHello. An audit-mode identity is let through and the would-be denial recorded.
func CheckSNI(v Verdict, mode policy.Mode, reason outcome.Reason) Verdict {
	if reason == 0 || !v.Proceeds() {
		return v
	}
	if mode == policy.ModeAudit {
		v.Action, v.Reason = outcome.Audit, reason
		return v
	}
	return Verdict{Action: outcome.Denied, Reason: reason, Rule: v.Rule}
}

// CheckECH applies the ECH setting to an allowed verdict. A ClientHello with
// encrypted_client_hello names only its outer (public) name in the SNI: behind a CDN that name
// decides for every site the CDN serves. With denyECH, such a ClientHello is refused unless the
// matched rule opts in (ech: allow); an audit-mode identity is let through and recorded.
func CheckECH(v Verdict, mode policy.Mode, ech, denyECH bool) Verdict {
	if !ech || !denyECH || !v.Proceeds() || (v.Rule != nil && v.Rule.AllowECH) {
		return v
	}
	if mode == policy.ModeAudit {
		v.Action, v.Reason = outcome.Audit, outcome.ECHNotAllowed
		return v
	}
	return Verdict{Action: outcome.Denied, Reason: outcome.ECHNotAllowed, Rule: v.Rule}
}
