package decision

import (
	"context"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/egress-guard/egress-guard/pkg/addrclass"
	"github.com/egress-guard/egress-guard/pkg/outcome"
	"github.com/egress-guard/egress-guard/pkg/policy"
)

// fakeResolver answers from a map of absolute names; a name it lacks does not exist, and
// "servfail." fails otherwise.
type fakeResolver map[string][]string

func (f fakeResolver) LookupNetIP(_ context.Context, _, host string) ([]netip.Addr, error) {
	if host == "servfail.wild.test." {
		return nil, &net.DNSError{Err: "server misbehaving", Name: host, IsTemporary: true}
	}
	list, ok := f[host]
	if !ok {
		return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
	}
	var out []netip.Addr
	for _, s := range list {
		out = append(out, netip.MustParseAddr(s))
	}
	return out, nil
}

// One address of every internal class, and a public one.
var classAddrs = map[string]string{
	"public":      "198.18.1.10",
	"private":     "10.1.2.3",
	"cgnat":       "100.64.1.1",
	"ula":         "fd12::1",
	"loopback":    "127.0.0.1",
	"link_local":  "169.254.169.254",
	"self":        "198.19.0.1",
	"self_ula":    "fd12::7",  // a pod IPv6 address: ULA and also the proxy's own
	"self_pod":    "10.0.0.7", // a pod IP: RFC 1918 and also the proxy's own
	"platform":    "168.63.129.16",
	"configured":  "203.0.113.5",
	"multicast":   "224.0.0.1",
	"unspecified": "0.0.0.0",
	"reserved":    "240.0.0.1",
	"mapped_meta": "::ffff:169.254.169.254",
}

const testPolicy = `
identities:
  exact:
    allowed_destinations: ["to.test"]
  suffix:
    allowed_destinations: ["*.wild.test"]
  exact-internal:
    allowed_destinations:
      - destination: "to.test"
        allow_internal: true
  suffix-internal:
    allowed_destinations:
      - destination: "*.wild.test"
        allow_internal: true
  cidr-broad:
    allowed_destinations: ["0.0.0.0/0", "::/0"]
  cidr-private:
    allowed_destinations: ["10.0.0.0/8", "100.64.0.0/10", "fd00::/8", "127.0.0.0/8", "169.254.169.254", "203.0.113.0/24", "198.19.0.1"]
  cidr-exact:
    allowed_destinations: ["10.0.0.7", "fd12::7", "168.63.129.16"]
  cidr-covering:
    allowed_destinations: ["10.0.0.0/24", "fd12::/64", "168.63.129.0/24"]
  internal-domain:
    allowed_destinations: ["db.internal"]
  ports:
    allowed_destinations: ["to.test:443", "198.18.1.0/24:8000-8100"]
  audit:
    mode: audit
    allowed_destinations: ["other.test"]
`

func setup(t *testing.T, class string) (*Decider, *policy.Policy) {
	t.Helper()
	pol, err := policy.Parse("test.yaml", []byte(testPolicy), policy.Options{InternalDomains: policy.DefaultInternalDomains})
	if err != nil {
		t.Fatal(err)
	}
	addr := classAddrs[class]
	r := fakeResolver{"to.test.": {addr}, "a.wild.test.": {addr}, "other.test.": {addr}, "db.internal.": {addr}}
	self := []netip.Addr{netip.MustParseAddr("198.19.0.1"), netip.MustParseAddr("10.0.0.7"), netip.MustParseAddr("fd12::7")}
	d := &Decider{
		Resolver:   r,
		Classifier: addrclass.New([]netip.Prefix{netip.MustParsePrefix("203.0.113.0/24")}, self),
	}
	return d, pol
}

// The full matrix: every rule kind × every address class × enforce and audit. Names resolve
// to the class's address; address rules are asked with the literal.
//
// The proxy's own addresses and the cloud platform endpoints are named only by an IP rule for
// exactly that address: the proxy's pod IP is RFC 1918 (or ULA) and 168.63.129.16 is public
// space, yet neither a name with allow_internal (or under INTERNAL_DOMAINS) nor a rule for a
// range around them (10.0.0.0/8, 10.0.0.0/24, fd00::/8, 168.63.129.0/24) reaches them.
func TestDecideMatrix(t *testing.T) {
	private := map[string]bool{"private": true, "cgnat": true, "ula": true, "configured": true}
	namedByNarrowRule := map[string]bool{"private": true, "cgnat": true, "ula": true, "loopback": true, "link_local": true, "configured": true, "self": true}
	namedOnlyExactly := map[string]bool{"self_pod": true, "self_ula": true, "platform": true}
	for class := range classAddrs {
		internal := class != "public"
		type tc struct {
			identity string
			target   Target
			action   outcome.Action
			reason   outcome.Reason
		}
		name := func(h string) Target { return Target{Host: h, Port: 443} }
		lit := Target{Addr: netip.MustParseAddr(classAddrs[class]).Unmap(), Port: 443}
		want := func(ok bool) (outcome.Action, outcome.Reason) {
			if ok {
				return outcome.Allowed, outcome.Rule
			}
			return outcome.Denied, outcome.InternalAddress
		}
		var cases []tc
		add := func(id string, t Target, ok bool) {
			a, r := want(ok)
			cases = append(cases, tc{id, t, a, r})
		}
		add("exact", name("to.test"), !internal)
		add("suffix", name("a.wild.test"), !internal)
		add("exact-internal", name("to.test"), !internal || private[class])
		add("suffix-internal", name("a.wild.test"), !internal || private[class])
		add("internal-domain", name("db.internal"), !internal || private[class])
		add("cidr-broad", lit, !internal)
		if namedByNarrowRule[class] {
			add("cidr-private", lit, true)
		}
		if namedOnlyExactly[class] {
			add("cidr-exact", lit, true)
			add("cidr-covering", lit, false)
			if class != "platform" {
				add("cidr-private", lit, false) // 10.0.0.0/8, fd00::/8 contain the pod IP but do not name it
			}
		}
		// Audit relaxes the rule match, never the internal-address guard.
		if internal {
			cases = append(cases, tc{"audit", name("to.test"), outcome.Denied, outcome.InternalAddress})
		} else {
			cases = append(cases, tc{"audit", name("to.test"), outcome.Audit, outcome.NoMatchingRule})
		}
		for _, c := range cases {
			d, pol := setup(t, class)
			v := d.Decide(context.Background(), pol.Identity(c.identity), c.target, nil)
			if v.Action != c.action || v.Reason != c.reason {
				t.Errorf("%s: identity %s, %s: got %s/%s, want %s/%s", class, c.identity, c.target, v.Action, v.Reason, c.action, c.reason)
			}
			if v.Proceeds() != (len(v.Addrs) > 0) {
				t.Errorf("%s: %s: proceeds=%v with %d addresses", class, c.identity, v.Proceeds(), len(v.Addrs))
			}
		}
	}
}

func TestDecideRulesAndPorts(t *testing.T) {
	d, pol := setup(t, "public")
	ctx := context.Background()
	cases := []struct {
		identity string
		target   Target
		action   outcome.Action
		reason   outcome.Reason
		entry    string
	}{
		{"exact", Target{Host: "to.test", Port: 1}, outcome.Allowed, outcome.Rule, "to.test"},
		{"exact", Target{Host: "a.wild.test", Port: 443}, outcome.Denied, outcome.NoMatchingRule, "none"},
		{"suffix", Target{Host: "wild.test", Port: 443}, outcome.Denied, outcome.NoMatchingRule, "none"},
		{"ports", Target{Host: "to.test", Port: 443}, outcome.Allowed, outcome.Rule, "to.test:443"},
		{"ports", Target{Host: "to.test", Port: 80}, outcome.Denied, outcome.NoMatchingRule, "none"},
		{"ports", Target{Addr: netip.MustParseAddr("198.18.1.7"), Port: 8050}, outcome.Allowed, outcome.Rule, "198.18.1.0/24:8000-8100"},
		{"ports", Target{Addr: netip.MustParseAddr("198.18.1.7"), Port: 8101}, outcome.Denied, outcome.NoMatchingRule, "none"},
		// An IP literal never matches a name rule, even when the name resolves to it.
		{"exact", Target{Addr: netip.MustParseAddr("198.18.1.10"), Port: 443}, outcome.Denied, outcome.NoMatchingRule, "none"},
		{"audit", Target{Host: "nothing.test", Port: 443}, outcome.Failed, outcome.NoSuchHost, "none"},
		{"exact", Target{Host: "to.test", Port: 443}, outcome.Allowed, outcome.Rule, "to.test"},
	}
	for _, c := range cases {
		v := d.Decide(ctx, pol.Identity(c.identity), c.target, nil)
		if v.Action != c.action || v.Reason != c.reason || v.Destination() != c.entry {
			t.Errorf("%s %s: got %s/%s/%s, want %s/%s/%s", c.identity, c.target, v.Action, v.Reason, v.Destination(), c.action, c.reason, c.entry)
		}
	}
}

// A DNS failure is one event with one wording: action failed, status connection_failed, and
// the rule that allowed it kept for the log line.
func TestDecideResolutionFailures(t *testing.T) {
	d, _ := setup(t, "public")
	pol, err := policy.Parse("p.yaml", []byte("identities:\n  x:\n    allowed_destinations: [\"*.wild.test\"]\n"), policy.Options{})
	if err != nil {
		t.Fatal(err)
	}
	id := pol.Identity("x")
	v := d.Decide(context.Background(), id, Target{Host: "missing.wild.test", Port: 443}, nil)
	if v.Action != outcome.Failed || v.Reason != outcome.NoSuchHost || v.Status() != outcome.StatusConnectionFailed || v.Destination() != "*.wild.test" {
		t.Fatalf("no such host: %+v status %s", v, v.Status())
	}
	v = d.Decide(context.Background(), id, Target{Host: "servfail.wild.test", Port: 443}, nil)
	if v.Action != outcome.Failed || v.Reason != outcome.ResolveFailed || v.Proceeds() {
		t.Fatalf("servfail: %+v", v)
	}
}

// A mix of public and internal answers: only the vetted addresses are dialed, in order.
func TestDecideKeepsOnlyVettedAddresses(t *testing.T) {
	pol, err := policy.Parse("p.yaml", []byte("identities:\n  x:\n    allowed_destinations: [\"mix.test\"]\n"), policy.Options{})
	if err != nil {
		t.Fatal(err)
	}
	d := &Decider{
		Resolver:   fakeResolver{"mix.test.": {"169.254.169.254", "198.18.1.10", "10.0.0.1", "fd00:18:1::10"}},
		Classifier: addrclass.New(nil, nil),
	}
	v := d.Decide(context.Background(), pol.Identity("x"), Target{Host: "mix.test", Port: 443}, nil)
	got := []string{}
	for _, a := range v.Addrs {
		got = append(got, a.String())
	}
	if v.Action != outcome.Allowed || strings.Join(got, ",") != "198.18.1.10" {
		t.Fatalf("got %s %v (fd00::/8 is ULA, internal)", v.Action, got)
	}
}

// The proxy's own addresses may change at run time (the daemon refreshes them): a decision
// uses the set current when it classifies.
func TestDecideSelfUpdatedAtRunTime(t *testing.T) {
	pol, err := policy.Parse("p.yaml", []byte("identities:\n  x:\n    allowed_destinations:\n      - destination: \"db.test\"\n        allow_internal: true\n"), policy.Options{})
	if err != nil {
		t.Fatal(err)
	}
	d := &Decider{Resolver: fakeResolver{"db.test.": {"10.0.0.9"}}, Classifier: addrclass.New(nil, nil)}
	id, target := pol.Identity("x"), Target{Host: "db.test", Port: 5432}
	if v := d.Decide(context.Background(), id, target, nil); v.Action != outcome.Allowed {
		t.Fatalf("private address through allow_internal: %s %s", v.Action, v.Reason)
	}
	d.Classifier.SetSelf([]netip.Addr{netip.MustParseAddr("10.0.0.9")})
	if v := d.Decide(context.Background(), id, target, nil); v.Action != outcome.Denied || v.Reason != outcome.InternalAddress {
		t.Fatalf("the proxy's new own address through allow_internal: %s %s", v.Action, v.Reason)
	}
	d.Classifier.SetSelf(nil)
	if v := d.Decide(context.Background(), id, target, nil); v.Action != outcome.Allowed {
		t.Fatalf("after the address left: %s %s", v.Action, v.Reason)
	}
}

func TestKnownAddrsAllowServerFirst(t *testing.T) {
	pol, err := policy.Parse("p.yaml", []byte("identities:\n  x:\n    allowed_destinations: [\"smtp.test:25\", \"*.wild.test\"]\n"), policy.Options{})
	if err != nil {
		t.Fatal(err)
	}
	r := fakeResolver{"smtp.test.": {"198.18.1.25"}}
	d := &Decider{Resolver: r, Classifier: addrclass.New(nil, nil)}
	id := pol.Identity("x")
	known, failed := ResolveKnown(context.Background(), r, pol, id, 0)
	if failed != 0 || known.Policy != pol {
		t.Fatalf("ResolveKnown: failed=%d", failed)
	}
	addr := netip.MustParseAddr("198.18.1.25")
	if v := d.Decide(context.Background(), id, Target{Addr: addr, Port: 25}, known); v.Action != outcome.Allowed || v.Destination() != "smtp.test:25" {
		t.Fatalf("server-first to a known address: %s %s", v.Action, v.Destination())
	}
	if v := d.Decide(context.Background(), id, Target{Addr: addr, Port: 26}, known); v.Action != outcome.Denied {
		t.Fatalf("known address on another port: %s", v.Action)
	}
	if v := d.Decide(context.Background(), id, Target{Addr: addr, Port: 25}, nil); v.Action != outcome.Denied || v.Reason != outcome.NoMatchingRule {
		t.Fatalf("without known addresses: %s %s", v.Action, v.Reason)
	}
}

func TestCheckSNI(t *testing.T) {
	allowed := Verdict{Action: outcome.Allowed, Reason: outcome.Rule, Addrs: []netip.Addr{netip.MustParseAddr("198.18.1.10")}}
	if v := CheckSNI(allowed, policy.ModeEnforce, 0); v.Action != outcome.Allowed {
		t.Fatal("matching SNI changed the verdict")
	}
	v := CheckSNI(allowed, policy.ModeEnforce, outcome.SNIMismatch)
	if v.Action != outcome.Denied || v.Reason != outcome.SNIMismatch || v.Proceeds() || v.Status() != outcome.StatusSNIMismatch || len(v.Addrs) != 0 {
		t.Fatalf("enforce mismatch: %+v", v)
	}
	v = CheckSNI(allowed, policy.ModeAudit, outcome.NoClientHello)
	if v.Action != outcome.Audit || v.Reason != outcome.NoClientHello || !v.Proceeds() || v.Status() != outcome.StatusAllowed {
		t.Fatalf("audit mismatch: %+v", v)
	}
	denied := Refuse(outcome.NoMatchingRule)
	if v := CheckSNI(denied, policy.ModeAudit, outcome.SNIMismatch); v.Action != denied.Action || v.Reason != denied.Reason {
		t.Fatal("a denied verdict must stay denied")
	}
	if Refuse(outcome.NoCredentials).Status() != outcome.StatusAuthRequired {
		t.Fatal("Refuse status")
	}
}
