package policy

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

var defaults = Options{InternalDomains: DefaultInternalDomains}

func loadExample(t *testing.T) *Policy {
	t.Helper()
	p, err := Load(filepath.Join("..", "..", "..", "shared", "seeds", "egress-policy.example.yaml"), defaults)
	if err != nil {
		// The example is copied into testdata so the test runs without shared/ too.
		p, err = Load(filepath.Join("testdata", "egress-policy.example.yaml"), defaults)
	}
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestOriginalExampleKeepsItsMeaning(t *testing.T) {
	p := loadExample(t)
	fe := p.IdentityByAPIKey("frontend-pod-2")
	if fe == nil || fe.Name != "frontend-services" || fe.Mode != ModeEnforce {
		t.Fatalf("frontend-pod-2 -> %+v", fe)
	}
	if p.IdentityByAPIKey("frontend-services") != nil || p.IdentityByAPIKey("unknown") != nil {
		t.Fatal("identity names or unknown strings must not authenticate")
	}
	names := []struct {
		key, host string
		want      string // matched entry, "" for no match
	}{
		{"frontend-pod-1", "api.example.com", "api.example.com"},
		{"frontend-pod-1", "API.Example.COM.", "api.example.com"},
		{"frontend-pod-1", "a.cdn.example.com", "*.cdn.example.com"},
		{"frontend-pod-1", "a.b.cdn.example.com", "*.cdn.example.com"},
		{"frontend-pod-1", "cdn.example.com", ""},
		{"frontend-pod-1", "xcdn.example.com", ""},
		{"frontend-pod-1", "api.example.com.evil.test", ""},
		{"frontend-pod-1", "storage.googleapis.com", ""},
		{"backend-worker-2", "storage.googleapis.com", "*.googleapis.com"},
		{"backend-worker-1", "db.internal.svc.cluster.local", "db.internal.svc.cluster.local"},
		{"prometheus", "prometheus.internal", "prometheus.internal"},
	}
	for _, tc := range names {
		r := p.IdentityByAPIKey(tc.key).MatchName(tc.host, 443)
		got := ""
		if r != nil {
			got = r.Entry
		}
		if got != tc.want {
			t.Errorf("%s: MatchName(%q) = %q, want %q", tc.key, tc.host, got, tc.want)
		}
	}
	addrs := []struct {
		key, addr, want string
	}{
		{"backend-worker-1", "10.0.0.7", "10.0.0.0/24"},
		{"backend-worker-1", "10.0.1.7", ""},
		{"alertmanager", "192.168.1.100", "192.168.1.100"},
		{"alertmanager", "::ffff:192.168.1.100", "192.168.1.100"},
		{"alertmanager", "192.168.1.101", ""},
		{"frontend-pod-1", "10.0.0.7", ""},
	}
	for _, tc := range addrs {
		r := p.IdentityByAPIKey(tc.key).MatchAddr(netip.MustParseAddr(tc.addr), 5432)
		got := ""
		if r != nil {
			got = r.Entry
		}
		if got != tc.want {
			t.Errorf("%s: MatchAddr(%s) = %q, want %q", tc.key, tc.addr, got, tc.want)
		}
	}
	// Names in private-use namespaces keep reaching in-cluster services; public names and
	// wildcards do not get that implicitly.
	be := p.Identity("backend-services")
	if !be.MatchName("db.internal.svc.cluster.local", 5432).AllowInternal {
		t.Error("db.internal.svc.cluster.local should be implicitly allow_internal")
	}
	if be.MatchName("x.googleapis.com", 443).AllowInternal || fe.MatchName("api.example.com", 443).AllowInternal {
		t.Error("public names and wildcards must not be allow_internal")
	}
	if len(p.Identities()) != 3 || p.Identities()[0].Name != "backend-services" {
		t.Errorf("Identities() = %v", p.Identities())
	}
	if len(p.Hash) != 16 {
		t.Errorf("hash %q", p.Hash)
	}
}

func TestExtensions(t *testing.T) {
	p, err := Parse("ext.yaml", []byte(`
identities:
  svc:
    mode: audit
    api_keys: [k]
    allowed_destinations:
      - "api.example.com:443"
      - "web.example.com:8000-8100"
      - "10.0.0.0/24:5432"
      - "[2001:db8::1]:443"
      - "2001:db8:1::/48"
      - "bücher.example"
      - "api.example.com:443"
      - destination: "*.svc.cluster.local"
        ports: [443, "8000-8100"]
        allow_internal: true
      - destination: "2001:db8:2::/48"
        ports: [22]
`), defaults)
	if err != nil {
		t.Fatal(err)
	}
	id := p.Identity("svc")
	if id.Mode != ModeAudit {
		t.Errorf("mode %q", id.Mode)
	}
	if len(id.Rules) != 8 {
		t.Errorf("%d rules after dedupe, want 8", len(id.Rules))
	}
	check := func(name string, got *Rule, want string) {
		t.Helper()
		e := ""
		if got != nil {
			e = got.Entry
		}
		if e != want {
			t.Errorf("%s: got %q, want %q", name, e, want)
		}
	}
	check("443", id.MatchName("api.example.com", 443), "api.example.com:443")
	check("8443", id.MatchName("api.example.com", 8443), "")
	check("range lo", id.MatchName("web.example.com", 8000), "web.example.com:8000-8100")
	check("range hi", id.MatchName("web.example.com", 8101), "")
	check("cidr port", id.MatchAddr(netip.MustParseAddr("10.0.0.9"), 5432), "10.0.0.0/24:5432")
	check("cidr other port", id.MatchAddr(netip.MustParseAddr("10.0.0.9"), 80), "")
	check("v6", id.MatchAddr(netip.MustParseAddr("2001:db8::1"), 443), "[2001:db8::1]:443")
	check("v6 cidr", id.MatchAddr(netip.MustParseAddr("2001:db8:1::5"), 1), "2001:db8:1::/48")
	check("v6 object", id.MatchAddr(netip.MustParseAddr("2001:db8:2::5"), 22), "[2001:db8:2::/48]:22")
	check("idna", id.MatchName("xn--bcher-kva.example", 443), "bücher.example")
	r := id.MatchName("db.ns.svc.cluster.local", 8080)
	check("object", r, "*.svc.cluster.local:443,8000-8100")
	if r == nil || !r.AllowInternal || r.Line == 0 {
		t.Errorf("object rule: %+v", r)
	}
	check("object port", id.MatchName("db.ns.svc.cluster.local", 80), "")
	check("ip literal never matches names", id.MatchName("10.0.0.9", 5432), "")
}

func TestMostSpecificPrefixWins(t *testing.T) {
	p, err := Parse("p.yaml", []byte(`
identities:
  a:
    api_keys: [k]
    allowed_destinations: ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.3"]
`), Options{})
	if err != nil {
		t.Fatal(err)
	}
	id := p.Identity("a")
	for addr, want := range map[string]string{"10.1.2.3": "10.1.2.3", "10.1.2.4": "10.1.0.0/16", "10.2.0.1": "10.0.0.0/8"} {
		if r := id.MatchAddr(netip.MustParseAddr(addr), 1); r == nil || r.Entry != want {
			t.Errorf("MatchAddr(%s) = %v, want %s", addr, r, want)
		}
	}
}

func TestRejections(t *testing.T) {
	for _, tc := range []struct {
		name, yaml string
		want       []string // substrings of the error
	}{
		{"bare star", "identities:\n  a:\n    allowed_destinations: [\"*\"]\n", []string{"x.yaml:3:", `identity "a"`, `"*"`, "bare wildcard"}},
		{"star dot", "identities:\n  a:\n    allowed_destinations:\n      - \"*.\"\n", []string{"x.yaml:4:", "bare wildcard"}},
		{"double star", "identities:\n  a:\n    allowed_destinations: [\"**\"]\n", []string{"bare wildcard"}},
		{"mid wildcard", "identities:\n  a:\n    allowed_destinations: [\"foo.*.com\"]\n", []string{"leading"}},
		{"glued wildcard", "identities:\n  a:\n    allowed_destinations: [\"*foo.com\"]\n", []string{"leading"}},
		{"tld wildcard", "identities:\n  a:\n    allowed_destinations: [\"*.com\"]\n", []string{"top-level"}},
		{"bad cidr", "identities:\n  a:\n    allowed_destinations: [\"10.0.0.0/33\"]\n", []string{"malformed CIDR"}},
		{"host bits", "identities:\n  a:\n    allowed_destinations: [\"10.0.0.1/24\"]\n", []string{"10.0.0.0/24"}},
		{"bad ip", "identities:\n  a:\n    allowed_destinations: [\"10.0.0.300\"]\n", []string{"malformed IP"}},
		{"bad port", "identities:\n  a:\n    allowed_destinations: [\"a.com:0\"]\n", []string{"1-65535"}},
		{"reversed range", "identities:\n  a:\n    allowed_destinations: [\"a.com:9-1\"]\n", []string{"reversed"}},
		{"bad char", "identities:\n  a:\n    allowed_destinations: [\"a b.com\"]\n", []string{"invalid character"}},
		{"empty dest", "identities:\n  a:\n    allowed_destinations: [\"\"]\n", []string{"empty destination"}},
		{"empty identity", "identities:\n  \"\":\n    api_keys: [k]\n", []string{"empty identity name"}},
		{"dup key", "identities:\n  a:\n    api_keys: [secret-k]\n  b:\n    api_keys: [secret-k]\n", []string{"x.yaml:5:", `identity "b"`, `belongs to identity "a"`}},
		{"dup identity", "identities:\n  a:\n    api_keys: [k1]\n  a:\n    api_keys: [k2]\n", []string{"x.yaml:4:", "duplicate key"}},
		{"dup field", "identities:\n  a:\n    api_keys: [k1]\n    api_keys: [k2]\n", []string{"duplicate key"}},
		{"unknown field", "identities:\n  a:\n    allowed_destination: [a.com]\n", []string{"x.yaml:3:", "unknown field", "allowed_destination"}},
		{"unknown top", "identity:\n  a: {}\n", []string{"unknown field"}},
		{"bad mode", "identities:\n  a:\n    mode: permissive\n", []string{"enforce or audit"}},
		{"empty file", "", []string{"empty policy"}},
		{"no identities", "identities: {}\n", []string{"no identities"}},
		{"not yaml", "identities: [\n", []string{"x.yaml"}},
		{"ports twice", "identities:\n  a:\n    allowed_destinations:\n      - destination: a.com:443\n        ports: [80]\n", []string{"both"}},
		{"numeric tld", "identities:\n  a:\n    allowed_destinations: [\"*.1.2\"]\n", []string{"numeric"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("x.yaml", []byte(tc.yaml), defaults)
			if err == nil {
				t.Fatal("accepted")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
			if strings.Contains(err.Error(), "secret-k") {
				t.Errorf("an API key appears in the error: %v", err)
			}
		})
	}
}

func write(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

type reports struct {
	mu   sync.Mutex
	good int
	bad  []error
}

func (r *reports) add(p *Policy, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err != nil {
		r.bad = append(r.bad, err)
	} else {
		r.good++
	}
}

func (r *reports) counts() (int, int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.good, len(r.bad)
}

const goodA = "identities:\n  a:\n    api_keys: [k]\n    allowed_destinations: [a.example.com]\n"
const goodB = "identities:\n  a:\n    api_keys: [k]\n    allowed_destinations: [b.example.com]\n"

func TestWatcherKeepsLastGood(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "policy.yaml")
	write(t, path, goodA)
	var rep reports
	w := NewWatcher(path, time.Hour, defaults, rep.add)
	if err := w.Load(); err != nil {
		t.Fatal(err)
	}
	first := w.Current()
	write(t, path, "identities:\n  a:\n    allowed_destinations: [\"*\"]\n")
	if err := w.Load(); err == nil || !strings.Contains(err.Error(), "policy.yaml:3") {
		t.Fatalf("bad file: %v", err)
	}
	if w.Current() != first {
		t.Fatal("a bad file replaced the good policy")
	}
	w.Load() // unchanged bad content: not reported again
	if g, b := rep.counts(); g != 1 || b != 1 {
		t.Fatalf("reports good=%d bad=%d, want 1 and 1", g, b)
	}
	write(t, path, goodB)
	if err := w.Load(); err != nil {
		t.Fatal(err)
	}
	if w.Current().Identity("a").MatchName("b.example.com", 1) == nil {
		t.Fatal("fixed file not active")
	}
	w.Load() // unchanged good content: not reported again
	if g, b := rep.counts(); g != 2 || b != 1 {
		t.Fatalf("reports good=%d bad=%d, want 2 and 1", g, b)
	}
}

// A ConfigMap volume: the file is a symlink through ..data to a timestamped directory, and
// an update swaps ..data atomically.
func TestWatcherSeesConfigMapSwap(t *testing.T) {
	dir := t.TempDir()
	v1, v2 := filepath.Join(dir, "..2026_01"), filepath.Join(dir, "..2026_02")
	os.Mkdir(v1, 0o755)
	os.Mkdir(v2, 0o755)
	write(t, filepath.Join(v1, "policy.yaml"), goodA)
	write(t, filepath.Join(v2, "policy.yaml"), goodB)
	if err := os.Symlink("..2026_01", filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "policy.yaml")
	os.Symlink("..data/policy.yaml", path)

	var rep reports
	w := NewWatcher(path, 20*time.Millisecond, defaults, rep.add)
	if err := w.Load(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go w.Run(ctx)
	tmp := filepath.Join(dir, "..data_tmp")
	os.Symlink("..2026_02", tmp)
	if err := os.Rename(tmp, filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for w.Current().Identity("a").MatchName("b.example.com", 1) == nil {
		if time.Now().After(deadline) {
			t.Fatal("symlink swap not picked up")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestWatcherMissingFile(t *testing.T) {
	var rep reports
	w := NewWatcher(filepath.Join(t.TempDir(), "absent.yaml"), time.Hour, defaults, rep.add)
	if err := w.Load(); err == nil || w.Current() != nil {
		t.Fatal("missing file loaded")
	}
	w.Load()
	if _, b := rep.counts(); b != 1 {
		t.Fatalf("missing file reported %d times, want once", b)
	}
}

// A file that cannot be read for a while (a process out of descriptors, a file put back)
// says nothing about the policy: the same content readable again is not a new policy, so it
// is neither reported nor applied again (which would re-check every open tunnel).
func TestWatcherUnreadableThenSameContentIsNotANewPolicy(t *testing.T) {
	path := filepath.Join(t.TempDir(), "policy.yaml")
	doc := []byte("identities:\n  a:\n    api_keys: [\"k\"]\n    allowed_destinations: [\"example.com\"]\n")
	if err := os.WriteFile(path, doc, 0o644); err != nil {
		t.Fatal(err)
	}
	var rep reports
	w := NewWatcher(path, time.Hour, defaults, rep.add)
	w.settle = 0
	if err := w.Load(); err != nil {
		t.Fatal(err)
	}
	first := w.Current()
	os.Rename(path, path+".away")
	if err := w.Load(); err == nil {
		t.Fatal("an unreadable file loaded")
	}
	w.Load()
	os.Rename(path+".away", path)
	if err := w.Load(); err != nil {
		t.Fatalf("the same content again: %v", err)
	}
	if good, bad := rep.counts(); good != 1 || bad != 1 {
		t.Fatalf("reports: %d policies, %d errors; want 1 policy (the first load) and 1 error (the read)", good, bad)
	}
	if w.Current() != first {
		t.Fatal("the same content was applied again")
	}
	// New content after the episode is applied as usual.
	os.WriteFile(path, append(doc, []byte("# edited\n")...), 0o644)
	if err := w.Load(); err != nil || w.Current() == first {
		t.Fatalf("new content not applied: %v", err)
	}
}

// bigPolicy builds a policy with identities × perIdentity destinations.
func bigPolicy(identities, perIdentity int) []byte {
	var b strings.Builder
	b.WriteString("identities:\n")
	for i := 0; i < identities; i++ {
		fmt.Fprintf(&b, "  id-%d:\n    api_keys: [\"key-%d\"]\n    allowed_destinations:\n", i, i)
		for j := 0; j < perIdentity; j++ {
			switch j % 3 {
			case 0:
				fmt.Fprintf(&b, "      - \"svc-%d.team-%d.example.com\"\n", j, i)
			case 1:
				fmt.Fprintf(&b, "      - \"*.zone-%d.team-%d.example.net\"\n", j, i)
			default:
				fmt.Fprintf(&b, "      - \"10.%d.%d.0/24\"\n", i%250, j%250)
			}
		}
	}
	return []byte(b.String())
}

var (
	bigOnce sync.Once
	big     *Policy
)

func bigP(b *testing.B) *Policy {
	bigOnce.Do(func() {
		p, err := Parse("big.yaml", bigPolicy(10000, 10), Options{})
		if err != nil {
			b.Fatal(err)
		}
		big = p
	})
	return big
}

func BenchmarkMatchName(b *testing.B) {
	id := bigP(b).IdentityByAPIKey("key-4242")
	hosts := []string{"svc-9.team-4242.example.com", "a.b.zone-7.team-4242.example.net", "miss.example.org"}
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		id.MatchName(hosts[i%len(hosts)], 443)
	}
}

func BenchmarkMatchAddr(b *testing.B) {
	id := bigP(b).IdentityByAPIKey("key-4242")
	addrs := []netip.Addr{netip.MustParseAddr("10.242.2.7"), netip.MustParseAddr("192.0.2.1")}
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		id.MatchAddr(addrs[i%len(addrs)], 443)
	}
}

func BenchmarkAPIKeyLookup(b *testing.B) {
	p := bigP(b)
	b.ReportAllocs()
	for b.Loop() {
		p.IdentityByAPIKey("key-9999")
	}
}

func BenchmarkMatchName_Small(b *testing.B) {
	p, err := Parse("small.yaml", bigPolicy(1, 10), Options{})
	if err != nil {
		b.Fatal(err)
	}
	id := p.Identity("id-0")
	hosts := []string{"svc-9.team-0.example.com", "a.b.zone-7.team-0.example.net", "miss.example.org"}
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		id.MatchName(hosts[i%len(hosts)], 443)
	}
}

func BenchmarkParse100kDestinations(b *testing.B) {
	data := bigPolicy(10000, 10)
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		if _, err := Parse("big.yaml", data, Options{}); err != nil {
			b.Fatal(err)
		}
	}
}

func TestRuleOptionsTLSAndECH(t *testing.T) {
	p, err := Parse("opts.yaml", []byte(`
identities:
  a:
    allowed_destinations:
      - destination: "git.example.com"
        ports: [443]
        tls: optional
      - destination: "cdn.example.com"
        ech: allow
      - destination: "plain.example.com"
        tls: required
        ech: deny
`), Options{})
	if err != nil {
		t.Fatal(err)
	}
	id := p.Identity("a")
	if r := id.MatchName("git.example.com", 443); r == nil || !r.TLSOptional || r.AllowECH {
		t.Fatalf("tls: optional: %+v", r)
	}
	if r := id.MatchName("cdn.example.com", 443); r == nil || r.TLSOptional || !r.AllowECH {
		t.Fatalf("ech: allow: %+v", r)
	}
	if r := id.MatchName("plain.example.com", 443); r == nil || r.TLSOptional || r.AllowECH {
		t.Fatalf("defaults: %+v", r)
	}
	for _, bad := range []string{"tls: maybe", "ech: yes", "tls: [optional]"} {
		_, err := Parse("bad.yaml", []byte("identities:\n  a:\n    allowed_destinations:\n      - destination: \"x.example.com\"\n        "+bad+"\n"), Options{})
		if err == nil || !strings.Contains(err.Error(), "bad.yaml:5") {
			t.Errorf("%q: %v", bad, err)
		}
	}
}
