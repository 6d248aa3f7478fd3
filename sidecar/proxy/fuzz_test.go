package proxy

import (
	"bufio"
	"bytes"
	"context"
	"net/http"
	"net/netip"
	"testing"

	"github.com/egress-guard/egress-guard/pkg/hostname"
	"github.com/egress-guard/egress-guard/pkg/policy"
	"github.com/egress-guard/egress-guard/pkg/tokenreview"
)

// FuzzRequestPath runs untrusted request heads through what the explicit listener does
// before deciding: parse the head, extract the target, authenticate. It must never panic, and
// a target it accepts is either an IP literal or a valid host name with a non-zero port, so
// nothing malformed reaches the policy matcher, the resolver or the logs.
func FuzzRequestPath(f *testing.F) {
	pol, err := policy.Parse("fuzz.yaml", []byte("identities:\n  a:\n    api_keys: [k1]\n    allowed_destinations: [api.example.com]\n"), policy.Options{})
	if err != nil {
		f.Fatal(err)
	}
	f.Add([]byte("CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\nProxy-Authorization: Basic azE6eA==\r\n\r\n"))
	f.Add([]byte("GET http://api.example.com/x?y=1 HTTP/1.1\r\nHost: api.example.com\r\nProxy-Authorization: Basic azE6\r\n\r\n"))
	f.Add([]byte("CONNECT [2001:db8::1]:443 HTTP/1.1\r\nHost: x\r\n\r\n"))
	f.Add([]byte("CONNECT [::ffff:10.0.0.1]:80 HTTP/1.1\r\n\r\n"))
	f.Add([]byte("GET http://[fe80::1%25eth0]/ HTTP/1.1\r\nHost: x\r\n\r\n"))
	f.Add([]byte("GET http://user@api.example.com:0/ HTTP/1.0\r\n\r\n"))
	f.Add([]byte("CONNECT api.example.com.:65536 HTTP/1.1\r\nProxy-Authorization: Bearer x\r\n\r\n"))
	f.Add([]byte("CONNECT api.example.com:443 HTTP/1.1\r\nProxy-Authorization: Bearer eyJhbGciOiJSUzI1NiJ9.eyJleHAiOjF9.c2ln\r\n\r\n"))
	f.Add([]byte("CONNECT api.example.com:443 HTTP/1.1\r\nProxy-Authorization: Basic dG9rZW46YS5iLmM=\r\n\r\n"))
	f.Add([]byte("CONNECT api.example.com:443 HTTP/1.1\r\nProxy-Authorization: basic  Og==\r\n\r\n"))
	srv := &Server{cfg: Config{Tokens: &tokenreview.Cache{Reviewer: refusingReviewer{}}}}
	f.Fuzz(func(t *testing.T, data []byte) {
		req, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(data)))
		if err != nil {
			return
		}
		srv.identify(context.Background(), pol, req.Header.Get("Proxy-Authorization"))
		tgt, err := requestTarget(req)
		if err != nil {
			return
		}
		if tgt.Port == 0 {
			t.Fatalf("accepted port 0 from %q", data)
		}
		if !tgt.IsName() {
			if !tgt.Addr.IsValid() || tgt.Addr.Zone() != "" || tgt.Addr.Is4In6() {
				t.Fatalf("accepted address %v from %q", tgt.Addr, data)
			}
			return
		}
		if tgt.Addr.IsValid() {
			t.Fatalf("target %q has both a name and an address", tgt)
		}
		if n, err := hostname.Normalize(tgt.Host); err != nil || n != tgt.Host {
			t.Fatalf("accepted host %q from %q (%v)", tgt.Host, data, err)
		}
		if _, err := netip.ParseAddr(tgt.Host); err == nil {
			t.Fatalf("IP literal %q treated as a name", tgt.Host)
		}
	})
}

// refusingReviewer authenticates no token, without any network.
type refusingReviewer struct{}

func (refusingReviewer) Review(context.Context, string, []string) (bool, string, error) {
	return false, "", nil
}
