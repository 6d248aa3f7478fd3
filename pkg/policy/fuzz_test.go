package policy

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// FuzzParse: the loader never panics, and whatever it accepts is internally consistent: every
// rule is found by the matcher for an address or name it covers and a port it allows.
func FuzzParse(f *testing.F) {
	if data, err := os.ReadFile(filepath.Join("testdata", "egress-policy.example.yaml")); err == nil {
		f.Add(data)
	}
	f.Add([]byte(goodA))
	f.Add([]byte("identities:\n  a:\n    mode: audit\n    api_keys: [k]\n    allowed_destinations:\n      - \"[2001:db8::1]:443\"\n      - \"*.x.example:1-9\"\n      - {destination: \"10.0.0.0/8\", ports: [5432], allow_internal: true}\n"))
	f.Add([]byte("identities:\n  a:\n    allowed_destinations: [\"*\", \"10.0.0.1/24\", \"a..b\"]\n"))
	f.Add([]byte("identities: &a\n  b: *a\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := Parse("fuzz.yaml", data, defaults)
		if err != nil {
			return
		}
		for _, id := range p.Identities() {
			if p.Identity(id.Name) != id {
				t.Fatalf("identity %q not found by name", id.Name)
			}
			for _, k := range id.APIKeys {
				if p.IdentityByAPIKey(k) != id {
					t.Fatalf("key of %q resolves elsewhere", id.Name)
				}
			}
			for _, r := range id.Rules {
				port := uint16(1)
				if len(r.Ports) > 0 {
					port = r.Ports[0].Lo
				}
				var got *Rule
				switch r.Kind {
				case KindExact:
					got = id.MatchName(r.Host, port)
				case KindSuffix:
					got = id.MatchName("f."+r.Host, port) // a one-byte label: any suffix the loader accepts leaves room
				case KindIP, KindCIDR:
					got = id.MatchAddr(r.Prefix.Addr(), port)
				}
				if got == nil {
					t.Fatalf("rule %q (%+v) does not match its own destination", r.Entry, r)
				}
			}
		}
	})
}

// FuzzServiceAccountSelector: a selector that parses is in normal form (parsing it again
// gives itself) and names a namespace and a name or "*" that are valid Kubernetes names; a
// username that parses round-trips.
func FuzzServiceAccountSelector(f *testing.F) {
	for _, s := range []string{"shop/frontend", "shop/*", " shop/a.b ", "Shop/x", "shop/", "/x", "a/b/c", "shop/*x", "system:serviceaccount:shop:frontend", "x-/y"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if sel, err := ParseServiceAccountSelector(s); err == nil {
			again, err := ParseServiceAccountSelector(sel)
			if err != nil || again != sel {
				t.Fatalf("%q -> %q -> %q, %v", s, sel, again, err)
			}
			ns, name, _ := strings.Cut(sel, "/")
			if validLabel(ns) != nil || (name != "*" && validSubdomain(name) != nil) {
				t.Fatalf("%q accepted as %q", s, sel)
			}
		}
		if ns, name, ok := ServiceAccountFromUsername(s); ok {
			if "system:serviceaccount:"+ns+":"+name != s {
				t.Fatalf("%q -> %q %q", s, ns, name)
			}
		}
	})
}
