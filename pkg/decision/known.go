package decision

import (
	"context"
	"net/netip"
	"time"

	"github.com/egress-guard/egress-guard/pkg/dialer"
	"github.com/egress-guard/egress-guard/pkg/policy"
)

// KnownAddrs maps the addresses of one identity's exact-name rules, as the proxy resolved
// them, to those rules. A captured connection of a server-first protocol (SMTP, MySQL, SSH)
// names no host; its original address is allowed when it is one of these. It is immutable once
// built; the sidecar rebuilds it in the background and swaps it.
type KnownAddrs struct {
	Policy *policy.Policy // the policy it was built from
	byAddr map[netip.Addr][]*policy.Rule
}

// Lookup returns the exact-name rule whose resolved addresses include a and that allows port.
func (k *KnownAddrs) Lookup(a netip.Addr, port uint16) *policy.Rule {
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

// ResolveKnown resolves every exact-name rule of the identity, each lookup bounded by timeout.
// A name that fails to resolve is left out until the next round (it may not exist yet); the
// returned error count says how many did.
func ResolveKnown(ctx context.Context, r dialer.Resolver, pol *policy.Policy, id *policy.Identity, timeout time.Duration) (k *KnownAddrs, failed int) {
	k = &KnownAddrs{Policy: pol, byAddr: map[netip.Addr][]*policy.Rule{}}
	if id == nil {
		return k, 0
	}
	for _, rule := range id.Rules {
		if rule.Kind != policy.KindExact {
			continue
		}
		lctx, cancel := context.WithTimeout(ctx, timeout)
		addrs, err := dialer.Lookup(lctx, r, rule.Host)
		cancel()
		if err != nil {
			failed++
			continue
		}
		for _, a := range addrs {
			k.byAddr[a] = append(k.byAddr[a], rule)
		}
	}
	return k, failed
}
