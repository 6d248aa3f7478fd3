package hostname_test

import (
	"strings"
	"testing"

	"gopkg.in/yaml.v3"

	"github.com/egress-guard/egress-guard/pkg/hostname"
	"github.com/egress-guard/egress-guard/pkg/peek"
	"github.com/egress-guard/egress-guard/pkg/policy"
)

// sharedInputs are names as they may arrive on the wire or be written in a policy.
var sharedInputs = []string{
	"api.example.com", "API.Example.COM", "api.example.com.", "api.example.com..", "a", "A.",
	"_sip._tcp.example.com", "my_svc.ns.svc.cluster.local", "-a-.example.com", "xn--bcher-kva.example",
	"123.foo", "1.2.3.com", "foo.1a",
	"foo.123", "foo.123.", "123", "1.2", "10.0.0.300", "198.18.1.10", "198.18.1.10.", "0.0.0.0",
	"::1", "2001:db8::1", "::ffff:10.0.0.1",
	".", "..", ".a", "a..b", "a b.com", "a\x00.com", "a\r.com", "a/b.com",
	"bücher.example", "b\xffcher.example", // (yaml.Marshal writes invalid UTF-8 as !!binary, which the loader rejects)
	strings.Repeat("a", 63) + ".com", strings.Repeat("a", 64) + ".com",
	strings.Repeat(strings.Repeat("a", 63)+".", 3) + strings.Repeat("b", 61),
	strings.Repeat(strings.Repeat("a", 63)+".", 3) + strings.Repeat("b", 61) + ".",
	strings.Repeat(strings.Repeat("a", 63)+".", 3) + strings.Repeat("b", 62),
}

// TestAgreement: the policy loader, the policy matcher, the SNI and Host peeks and Normalize
// accept the same names and normalise them alike.
func TestAgreement(t *testing.T) {
	for _, in := range sharedInputs {
		want, werr := hostname.Normalize(in)
		if werr != nil {
			want = ""
		}

		// Policy loader: a name rule with the normal name, or no name rule at all.
		got := policyName(t, in)
		if !isASCII(in) {
			if p, err := hostname.NormalizePolicy(in); (err == nil) != (got != "") || p != got {
				t.Errorf("policy %q: rule name %q, NormalizePolicy %q, %v", in, got, p, err)
			}
		} else if got != want {
			t.Errorf("policy %q: rule name %q, Normalize %q (%v)", in, got, want, werr)
		}

		// Policy matcher: a name matches the exact rule of its normal form.
		if werr == nil {
			id := identityWith(t, want)
			if r := id.MatchName(in, 443); r == nil || r.Host != want {
				t.Errorf("MatchName(%q) = %+v, want the rule for %q", in, r, want)
			}
		}

		// SNI.
		h, err := peek.ParseClientHello(clientHello(in))
		if err != nil {
			t.Errorf("ClientHello with SNI %q: %v", in, err)
		} else if h.ServerName != want || h.RawServerName != in {
			t.Errorf("SNI %q: name %q (raw %q), want %q", in, h.ServerName, h.RawServerName, want)
		}

		// Host header, with and without a port.
		for _, host := range []string{in, in + ":8080"} {
			if strings.Contains(in, ":") && host == in {
				continue // a bare IPv6 address reads as host:port
			}
			req, err := peek.ParseHTTPRequestHead([]byte("GET / HTTP/1.1\r\nHost: "+host+"\r\n\r\n"), 4096)
			switch {
			case err != nil && strings.ContainsAny(in, "\x00\r\n"):
				// not a header value at all
			case err != nil:
				t.Errorf("Host %q: %v", host, err)
			case req.Name != want:
				t.Errorf("Host %q: name %q, want %q", host, req.Name, want)
			}
		}
	}
}

// policyName loads a policy with in as its only destination and returns the name of the
// resulting exact rule, or "" when the loader rejects it or makes an address rule of it.
func policyName(t *testing.T, in string) string {
	doc := map[string]any{"identities": map[string]any{"a": map[string]any{"allowed_destinations": []string{in}}}}
	data, err := yaml.Marshal(doc)
	if err != nil {
		t.Fatal(err)
	}
	p, err := policy.Parse("agree.yaml", data, policy.Options{})
	if err != nil {
		return ""
	}
	rules := p.Identity("a").Rules
	if len(rules) != 1 || rules[0].Kind != policy.KindExact {
		return ""
	}
	return rules[0].Host
}

func identityWith(t *testing.T, name string) *policy.Identity {
	data, _ := yaml.Marshal(map[string]any{"identities": map[string]any{"a": map[string]any{"allowed_destinations": []string{name}}}})
	p, err := policy.Parse("agree.yaml", data, policy.Options{})
	if err != nil {
		t.Fatalf("normal name %q rejected by the policy: %v", name, err)
	}
	return p.Identity("a")
}

// clientHello builds a minimal one-record TLS 1.2-style ClientHello with one host_name.
func clientHello(sni string) []byte {
	u16 := func(n int) []byte { return []byte{byte(n >> 8), byte(n)} }
	entry := append(append([]byte{0}, u16(len(sni))...), sni...)
	list := append(u16(len(entry)), entry...)
	ext := append(append([]byte{0, 0}, u16(len(list))...), list...)
	body := []byte{3, 3}
	body = append(body, make([]byte, 32)...) // random
	body = append(body, 0)                   // session id
	body = append(body, 0, 2, 0x13, 0x01)    // cipher suites
	body = append(body, 1, 0)                // compression methods
	body = append(body, u16(len(ext))...)    // extensions
	body = append(body, ext...)
	msg := append([]byte{1, byte(len(body) >> 16), byte(len(body) >> 8), byte(len(body))}, body...)
	return append(append([]byte{22, 3, 1}, u16(len(msg))...), msg...)
}

func isASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			return false
		}
	}
	return true
}
