package policy

import (
	"reflect"
	"strings"
	"testing"
)

const saPolicy = `
identities:
  frontend:
    api_keys: ["fe-key"]
    service_accounts: ["shop/frontend"]
    allowed_destinations: ["api.example.com"]
  shop-default:
    service_accounts: ["shop/*", "billing/worker"]
    allowed_destinations: ["*.cdn.example.com"]
`

func TestServiceAccountSelectors(t *testing.T) {
	p, err := Parse("sa.yaml", []byte(saPolicy), Options{})
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct{ ns, name, want string }{
		{"shop", "frontend", "frontend"},    // namespace/name beats namespace/*
		{"shop", "backend", "shop-default"}, // namespace/*
		{"billing", "worker", "shop-default"},
		{"billing", "other", ""},
		{"other", "frontend", ""},
	}
	for _, c := range cases {
		got := ""
		if id := p.IdentityForServiceAccount(c.ns, c.name); id != nil {
			got = id.Name
		}
		if got != c.want {
			t.Errorf("%s/%s -> %q, want %q", c.ns, c.name, got, c.want)
		}
	}
	if id := p.IdentityByAPIKey("fe-key"); id == nil || id.Name != "frontend" {
		t.Fatal("an identity selected by both API keys and ServiceAccounts lost its key")
	}
}

func TestServiceAccountSelectorErrors(t *testing.T) {
	for _, c := range []struct{ yaml, want string }{
		{"identities:\n  a:\n    service_accounts: [\"shop/x\"]\n    allowed_destinations: []\n  b:\n    service_accounts: [\"shop/x\"]\n    allowed_destinations: []\n",
			`bad.yaml:6: identity "b": "shop/x": ServiceAccount selector already claimed by identity "a" at line 3`},
		{"identities:\n  a:\n    service_accounts: [\"shop\"]\n    allowed_destinations: []\n", `bad.yaml:3: identity "a": "shop": a ServiceAccount selector`},
		{"identities:\n  a:\n    service_accounts: [\"Shop/x\"]\n    allowed_destinations: []\n", `namespace "Shop"`},
		{"identities:\n  a:\n    service_accounts: [\"shop/*x\"]\n    allowed_destinations: []\n", `ServiceAccount name "*x"`},
		{"identities:\n  a:\n    service_accounts: [\"*/x\"]\n    allowed_destinations: []\n", `namespace "*"`},
	} {
		_, err := Parse("bad.yaml", []byte(c.yaml), Options{})
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("want error containing %q, got %v", c.want, err)
		}
	}
}

func TestServiceAccountFromUsername(t *testing.T) {
	for _, c := range []struct {
		user, ns, name string
		ok             bool
	}{
		{"system:serviceaccount:shop:frontend", "shop", "frontend", true},
		{"system:serviceaccount:shop:a.b", "shop", "a.b", true},
		{"system:serviceaccount:shop", "", "", false},
		{"system:serviceaccount::x", "", "", false},
		{"system:serviceaccount:shop:x:y", "", "", false},
		{"admin", "", "", false},
		{"system:serviceaccounts:shop:x", "", "", false},
	} {
		ns, name, ok := ServiceAccountFromUsername(c.user)
		if ns != c.ns || name != c.name || ok != c.ok {
			t.Errorf("%q -> %q %q %v", c.user, ns, name, ok)
		}
	}
}

// The document served to a sidecar reads back into the same rules, and carries nothing but
// its identity's mode and rules.
func TestDocumentRoundTrip(t *testing.T) {
	src := `
identities:
  shop:
    mode: audit
    api_keys: ["secret-key"]
    service_accounts: ["shop/*"]
    allowed_destinations:
      - "api.example.com"
      - "*.cdn.example.com:443"
      - "web.example.com:8000-8100"
      - "10.0.0.0/24:5432"
      - "[2001:db8::1]:443"
      - "2001:db8:1::/48"
      - "bücher.example"
      - "db.internal"
      - destination: "*.svc.cluster.local"
        ports: [443, "8000-8100"]
        allow_internal: true
      - destination: "git.example.com"
        tls: optional
        ech: allow
  other:
    api_keys: ["other-key"]
    allowed_destinations: ["evil.test"]
`
	p, err := Parse("src.yaml", []byte(src), Options{InternalDomains: DefaultInternalDomains})
	if err != nil {
		t.Fatal(err)
	}
	doc, err := p.Document("shop")
	if err != nil {
		t.Fatal(err)
	}
	for _, leak := range []string{"secret-key", "other-key", "evil.test", "other", "service_accounts", "api_keys"} {
		if strings.Contains(string(doc), leak) {
			t.Fatalf("document leaks %q: %s", leak, doc)
		}
	}
	back, err := Parse("served", doc, Options{}) // the reader's own INTERNAL_DOMAINS play no part
	if err != nil {
		t.Fatalf("%v\n%s", err, doc)
	}
	a, b := p.Identity("shop"), back.Identity("shop")
	if b == nil || b.Mode != ModeAudit || len(back.Identities()) != 1 {
		t.Fatalf("read back %+v", back.Identities())
	}
	if len(a.Rules) != len(b.Rules) {
		t.Fatalf("%d rules, read back %d", len(a.Rules), len(b.Rules))
	}
	for i := range a.Rules {
		x, y := *a.Rules[i], *b.Rules[i]
		x.Line, y.Line = 0, 0
		if !reflect.DeepEqual(x, y) {
			t.Errorf("rule %d: %+v\nread back as %+v", i, x, y)
		}
	}
	again, _ := p.Document("shop")
	if string(again) != string(doc) {
		t.Fatal("Document is not deterministic")
	}
	if _, err := p.Document("nobody"); err == nil {
		t.Fatal("Document of an unknown identity")
	}
}
