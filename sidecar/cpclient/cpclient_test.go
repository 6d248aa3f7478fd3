package cpclient

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/egress-guard/egress-guard/controller/policyserver"
	"github.com/egress-guard/egress-guard/pkg/policy"
	"github.com/egress-guard/egress-guard/pkg/tokenreview"
)

type tokenAuth struct{ seen atomic.Value }

func (a *tokenAuth) Authenticate(_ context.Context, token string) tokenreview.Result {
	a.seen.Store(token)
	if strings.HasPrefix(token, "shop-") {
		return tokenreview.Result{Namespace: "shop", ServiceAccount: "frontend"}
	}
	return tokenreview.Result{Failure: tokenreview.FailureInvalid}
}

const pol = `
identities:
  shop:
    api_keys: ["shop-secret-key"]
    service_accounts: ["shop/frontend"]
    allowed_destinations: ["api.example.com"]
  other:
    allowed_destinations: ["evil.test"]
`

// endpoint is the control plane's policy server on a TLS listener with httptest's
// certificate.
type endpoint struct {
	URL  string
	ln   net.Listener
	cert []byte
}

func setup(t *testing.T) (*policyserver.Server, *endpoint, *tokenAuth, string, string) {
	t.Helper()
	a := &tokenAuth{}
	ps := &policyserver.Server{Auth: a, Metrics: policyserver.NewMetrics(prometheus.NewRegistry(), nil)}
	donor := httptest.NewTLSServer(nil) // only for its certificate
	donor.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go ps.Serve(tls.NewListener(ln, donor.TLS))
	t.Cleanup(func() { ln.Close(); ps.Stop() })
	hs := &endpoint{URL: "https://" + ln.Addr().String(), ln: ln, cert: donor.Certificate().Raw}
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca.crt")
	os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: hs.cert}), 0o600)
	tok := filepath.Join(dir, "token")
	os.WriteFile(tok, []byte("shop-token-1\n"), 0o600)
	return ps, hs, a, ca, tok
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for i := 0; i < 500; i++ {
		if cond() {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("%s: not within 5s", what)
}

func TestClientFollowsTheControlPlane(t *testing.T) {
	ps, hs, a, ca, tok := setup(t)
	c, err := New(hs.URL, tok, ca)
	if err != nil {
		t.Fatal(err)
	}
	c.Wait = 5 * time.Second
	var mu sync.Mutex
	var states []bool
	c.OnState = func(up bool) { mu.Lock(); states = append(states, up); mu.Unlock() }
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go c.Run(ctx)

	// No policy on the server yet: none here either, and the outage shows.
	time.Sleep(300 * time.Millisecond)
	if c.Current() != nil {
		t.Fatal("a policy before the control plane had one")
	}
	if up, _, lastErr := c.Status(); up || !strings.Contains(lastErr, "503") {
		t.Fatalf("status %v %q", up, lastErr)
	}
	p, _ := policy.Parse("p", []byte(pol), policy.Options{})
	ps.SetPolicy(p)
	waitFor(t, "first policy", func() bool { return c.Current() != nil })
	ids := c.Current().Identities()
	if len(ids) != 1 || ids[0].Name != "shop" || ids[0].MatchName("api.example.com", 443) == nil || len(ids[0].APIKeys) != 0 {
		t.Fatalf("received %+v", ids)
	}

	// An edit arrives through the long-poll; the rotated token is used.
	os.WriteFile(tok, []byte("shop-token-2"), 0o600)
	p2, _ := policy.Parse("p", []byte(strings.Replace(pol, `["api.example.com"]`, `["api.example.com", "new.example.com"]`, 1)), policy.Options{})
	edited := time.Now()
	ps.SetPolicy(p2)
	waitFor(t, "edit", func() bool { return c.Current().Identities()[0].MatchName("new.example.com", 443) != nil })
	if d := time.Since(edited); d > time.Second {
		t.Fatalf("the edit took %v", d)
	}
	waitFor(t, "rotated token", func() bool { return a.seen.Load() == "shop-token-2" })

	// The control plane goes away: the last good policy stays, the outage is reported.
	hs.ln.Close()
	ps.Stop()
	waitFor(t, "outage noticed", func() bool { up, _, _ := c.Status(); return !up })
	if c.Current() == nil || c.Current().Identities()[0].MatchName("new.example.com", 443) == nil {
		t.Fatal("the last good policy was dropped during an outage")
	}
	mu.Lock()
	defer mu.Unlock()
	if len(states) < 3 || states[len(states)-1] {
		t.Fatalf("state transitions %v", states)
	}
}

func TestClientRefusesABadCA(t *testing.T) {
	_, hs, _, _, tok := setup(t)
	dir := t.TempDir()
	if _, err := New(hs.URL, tok, filepath.Join(dir, "none")); err == nil {
		t.Fatal("missing CA accepted")
	}
	// A server whose certificate is not from the CA is never trusted.
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "other CA"}, IsCA: true,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, _ := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	ca := filepath.Join(dir, "other.crt")
	os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	c, _ := New(hs.URL, tok, ca)
	if err := c.poll(context.Background()); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("untrusted control plane: %v", err)
	}
}
