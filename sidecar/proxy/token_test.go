package proxy

import (
	"context"
	"encoding/base64"
	"errors"
	"net/http"
	"strings"
	"testing"

	"github.com/egress-guard/egress-guard/pkg/tokenreview"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

const tokenPolicy = `
identities:
  frontend:
    api_keys: ["fe-key"]
    service_accounts: ["shop/frontend"]
    allowed_destinations: ["127.0.0.0/8"]
`

// Tokens in tests: any three-part string; the reviewer decides what it proves.
const (
	goodToken     = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJmcm9udGVuZCJ9.c2lnLWdvb2Q"
	unmappedToken = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJvdGhlciJ9.c2lnLW90aGVy"
	badToken      = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJiYWQifQ.c2lnLWJhZA"
)

type mapReviewer struct {
	down bool
}

func (m mapReviewer) Review(_ context.Context, token string, _ []string) (bool, string, error) {
	if m.down {
		return false, "", errors.New("connection refused")
	}
	switch token {
	case goodToken:
		return true, "system:serviceaccount:shop:frontend", nil
	case unmappedToken:
		return true, "system:serviceaccount:other:app", nil
	}
	return false, "", nil
}

func TestServiceAccountTokens(t *testing.T) {
	cache := &tokenreview.Cache{Reviewer: mapReviewer{}}
	f := startWith(t, tokenPolicy, func(c *Config) { c.Tokens = cache })
	port, _ := echoServer(t)
	target := "127.0.0.1:" + port
	basicToken := func(tok string) string {
		return "Basic " + base64.StdEncoding.EncodeToString([]byte(TokenUser+":"+tok))
	}
	cases := []struct {
		name, auth, identity, reason string
		code                         int
	}{
		{"Bearer", "Bearer " + goodToken, "frontend", "rule", 200},
		{"Basic with the token as password", basicToken(goodToken), "frontend", "rule", 200},
		{"API key of the same identity", basic("fe-key"), "frontend", "rule", 200},
		{"invalid token", "Bearer " + badToken, "unknown", "invalid_token", 407},
		{"invalid token in Basic", basicToken(badToken), "unknown", "invalid_token", 407},
		{"ServiceAccount no identity selects", "Bearer " + unmappedToken, "unknown", "unknown_service_account", 407},
		{"garbage bearer", "Bearer not-a-jwt", "unknown", "invalid_token", 407},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			mark := f.logs.mark()
			if code, _, _ := rawRequest(t, f.addr, connectReq(target, c.auth)); code != c.code {
				t.Fatalf("status %d, want %d", code, c.code)
			}
			expect(t, f.logs.one(t, mark, "decision"), "identity", c.identity, "reason", c.reason)
		})
	}
	for _, tok := range []string{goodToken, badToken, unmappedToken} {
		if strings.Contains(f.logs.String(), tok) {
			t.Fatal("a token was logged")
		}
	}
	if n := testutil.ToFloat64(f.metrics.Requests.WithLabelValues("unknown", "none", "auth_required")); n != 4 {
		t.Fatalf("auth_required = %v, want 4", n)
	}
	// Two uses of each token: one review each.
	if reviews, _ := cache.Stats(); reviews != 3 {
		t.Fatalf("%d TokenReviews, want 3 (one per distinct JWT-shaped token)", reviews)
	}

	// The API server unreachable: 503, nothing cached.
	f2 := startWith(t, tokenPolicy, func(c *Config) { c.Tokens = &tokenreview.Cache{Reviewer: mapReviewer{down: true}} })
	mark := f2.logs.mark()
	if code, _, _ := rawRequest(t, f2.addr, connectReq(target, "Bearer "+goodToken)); code != http.StatusServiceUnavailable {
		t.Fatalf("review unavailable: %d, want 503", code)
	}
	expect(t, f2.logs.one(t, mark, "decision"), "reason", "auth_unavailable", "status", "auth_required")

	// Without a token reviewer, a Bearer header is no credential at all.
	f3 := start(t, tokenPolicy)
	mark = f3.logs.mark()
	if code, _, _ := rawRequest(t, f3.addr, connectReq(target, "Bearer "+goodToken)); code != 407 {
		t.Fatalf("no reviewer: %d, want 407", code)
	}
	expect(t, f3.logs.one(t, mark, "decision"), "reason", "no_credentials", "identity", "none")
}
