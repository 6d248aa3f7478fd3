package policy

import (
	"strings"
	"testing"
)

// Names are validated by pkg/hostname both when loaded and when matched.
func TestNamesThroughHostname(t *testing.T) {
	p, err := Parse("x.yaml", []byte("identities:\n  a:\n    allowed_destinations: [api.example.com, \"*.svc.example.com\", Bücher.example]\n"), defaults)
	if err != nil {
		t.Fatal(err)
	}
	id := p.Identity("a")
	for host, want := range map[string]string{
		"api.example.com":            "api.example.com",
		"API.Example.COM.":           "api.example.com",
		"x.svc.example.com":          "svc.example.com",
		"_grpc._tcp.svc.example.com": "svc.example.com",
		"xn--bcher-kva.example":      "xn--bcher-kva.example",
		"bücher.example":             "", // the wire carries punycode only
		"x..svc.example.com":         "", // empty label: not a name, though it ends in the suffix
		"a b.svc.example.com":        "",
		"x.svc.example.com:443":      "",
		"svc.example.com":            "",
		"1.2.3.4":                    "",
		"::1":                        "",
		"":                           "",
		".":                          "",
		strings.Repeat("a", 64) + ".svc.example.com": "",
	} {
		r := id.MatchName(host, 443)
		if got := ""; r != nil {
			got = r.Host
			if got != want {
				t.Errorf("MatchName(%q) = %q, want %q", host, got, want)
			}
		} else if want != "" {
			t.Errorf("MatchName(%q) = nil, want %q", host, want)
		}
	}
	if n := testing.AllocsPerRun(100, func() { id.MatchName("a.b.svc.example.com", 443) }); n != 0 {
		t.Errorf("MatchName of a normal name: %v allocations", n)
	}

	long := strings.Repeat(strings.Repeat("a", 63)+".", 3) + strings.Repeat("b", 59) // 251 bytes
	for suffix, ok := range map[string]bool{long: true, long + "b": false, "foo.123": false, "a..b": false} {
		_, err := Parse("x.yaml", []byte("identities:\n  a:\n    allowed_destinations: [\"*."+suffix+"\"]\n"), defaults)
		if (err == nil) != ok {
			t.Errorf("*.%s (%d bytes): %v", suffix, len(suffix), err)
		}
	}
}
