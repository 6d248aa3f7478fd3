package policyserver

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/egress-guard/egress-guard/pkg/policy"
	"github.com/egress-guard/egress-guard/pkg/tokenreview"
)

// fakeAuth maps tokens to ServiceAccounts.
type fakeAuth map[string]tokenreview.Result

func (f fakeAuth) Authenticate(_ context.Context, token string) tokenreview.Result {
	if r, ok := f[token]; ok {
		return r
	}
	return tokenreview.Result{Failure: tokenreview.FailureInvalid}
}

var auth = fakeAuth{
	"shop-token":  {Namespace: "shop", ServiceAccount: "frontend"},
	"other-token": {Namespace: "other", ServiceAccount: "x"},
	"down-token":  {Failure: tokenreview.FailureUnavailable},
}

func parse(t testing.TB, y string) *policy.Policy {
	t.Helper()
	p, err := policy.Parse("p.yaml", []byte(y), policy.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

const v1 = `
identities:
  shop:
    api_keys: ["shop-secret-key"]
    service_accounts: ["shop/*"]
    allowed_destinations: ["api.example.com"]
  billing:
    service_accounts: ["billing/*"]
    allowed_destinations: ["payments.example.com"]
`

// endpoint is a running policy server on loopback (plain TCP: TLS is the listener's job).
type endpoint struct{ URL string }

func newServer(t testing.TB) (*Server, *endpoint) {
	s := &Server{Auth: auth, Metrics: NewMetrics(prometheus.NewRegistry(), nil)}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve(ln)
	t.Cleanup(func() { ln.Close(); s.Stop() })
	return s, &endpoint{URL: "http://" + ln.Addr().String()}
}

func get(t testing.TB, url, token, etag string) (*http.Response, string) {
	t.Helper()
	req, _ := http.NewRequest("GET", url, nil)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	if etag != "" {
		req.Header.Set("If-None-Match", etag)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp, string(b)
}

func TestServesOnlyTheIdentitysOwnRules(t *testing.T) {
	s, hs := newServer(t)
	resp, _ := get(t, hs.URL+Path, "shop-token", "")
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("before a policy: %d, want 503", resp.StatusCode)
	}
	s.SetPolicy(parse(t, v1))
	resp, body := get(t, hs.URL+Path, "shop-token", "")
	if resp.StatusCode != 200 || resp.Header.Get(IdentityHeader) != "shop" || resp.Header.Get("ETag") == "" {
		t.Fatalf("%d %v %s", resp.StatusCode, resp.Header, body)
	}
	for _, leak := range []string{"shop-secret-key", "payments.example.com", "billing", "service_accounts"} {
		if strings.Contains(body, leak) {
			t.Fatalf("served document leaks %q: %s", leak, body)
		}
	}
	if p, err := policy.Parse("served", []byte(body), policy.Options{}); err != nil || p.Identity("shop").MatchName("api.example.com", 443) == nil {
		t.Fatalf("served document: %v", err)
	}
	// Current: 304 at once without wait.
	resp2, _ := get(t, hs.URL+Path, "shop-token", resp.Header.Get("ETag"))
	if resp2.StatusCode != http.StatusNotModified {
		t.Fatalf("current sidecar: %d, want 304", resp2.StatusCode)
	}
	for _, c := range []struct {
		token  string
		code   int
		reason string
	}{
		{"", 401, "missing_token"},
		{"forged", 401, "invalid"},
		{"other-token", 403, "unmapped_service_account"},
		{"down-token", 503, "unavailable"},
	} {
		resp, body := get(t, hs.URL+Path, c.token, "")
		if resp.StatusCode != c.code || !strings.Contains(body, "("+c.reason+")") {
			t.Errorf("token %q: %d %q, want %d (%s)", c.token, resp.StatusCode, body, c.code, c.reason)
		}
	}
	if n := testutil.ToFloat64(s.Metrics.AuthFailures.WithLabelValues("unmapped_service_account")); n != 1 {
		t.Fatalf("auth failures{unmapped} = %v", n)
	}
}

// A waiting sidecar is answered as soon as its identity's rules change, and only then.
func TestLongPollReturnsOnChange(t *testing.T) {
	s, hs := newServer(t)
	s.SetPolicy(parse(t, v1))
	first, _ := get(t, hs.URL+Path, "shop-token", "")
	etag := first.Header.Get("ETag")

	type answer struct {
		code int
		body string
		at   time.Time
	}
	done := make(chan answer, 1)
	go func() {
		resp, body := get(t, hs.URL+Path+"?wait=10s", "shop-token", etag)
		done <- answer{resp.StatusCode, body, time.Now()}
	}()
	waitFor(t, func() bool { return testutil.ToFloat64(s.Metrics.Waiting) == 1 })
	// Another identity's change does not wake it with a new document.
	s.SetPolicy(parse(t, strings.Replace(v1, "payments.example.com", "pay2.example.com", 1)))
	select {
	case a := <-done:
		t.Fatalf("answered on another identity's change: %d", a.code)
	case <-time.After(200 * time.Millisecond):
	}
	changed := time.Now()
	s.SetPolicy(parse(t, strings.Replace(v1, `["api.example.com"]`, `["api.example.com", "new.example.com"]`, 1)))
	select {
	case a := <-done:
		if a.code != 200 || !strings.Contains(a.body, "new.example.com") {
			t.Fatalf("after the change: %d %s", a.code, a.body)
		}
		if d := a.at.Sub(changed); d > time.Second {
			t.Fatalf("the change took %v to reach the sidecar", d)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the waiting sidecar was not answered after its rules changed")
	}
	if testutil.ToFloat64(s.Metrics.Waiting) != 0 {
		t.Fatal("waiting gauge not back to 0")
	}
	// No change within the wait: 304.
	resp, _ := get(t, hs.URL+Path+"?wait=100ms", "shop-token", mustEtag(t, hs))
	if resp.StatusCode != http.StatusNotModified {
		t.Fatalf("wait without change: %d", resp.StatusCode)
	}
}

func mustEtag(t *testing.T, hs *endpoint) string {
	resp, _ := get(t, hs.URL+Path, "shop-token", "")
	return resp.Header.Get("ETag")
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for i := 0; i < 200; i++ {
		if cond() {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatal("condition not met")
}

func TestStopAnswersWaitingSidecars(t *testing.T) {
	s, hs := newServer(t)
	s.SetPolicy(parse(t, v1))
	etag := mustEtag(t, hs)
	done := make(chan int, 1)
	go func() {
		resp, _ := get(t, hs.URL+Path+"?wait=30s", "shop-token", etag)
		done <- resp.StatusCode
	}()
	waitFor(t, func() bool { return testutil.ToFloat64(s.Metrics.Waiting) == 1 })
	s.Stop()
	select {
	case code := <-done:
		if code != http.StatusServiceUnavailable {
			t.Fatalf("status %d, want 503", code)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("a waiting sidecar was held through Stop")
	}
}

// A sidecar that keeps its connection gets several answers on it, and a parked connection
// costs no goroutine.
func TestKeepAliveAndParkedConnections(t *testing.T) {
	s, hs := newServer(t)
	s.SetPolicy(parse(t, v1))
	tr := &http.Transport{MaxConnsPerHost: 1}
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr}
	etag := ""
	for i := 0; i < 3; i++ {
		req, _ := http.NewRequest("GET", hs.URL+Path+"?wait=100ms", nil)
		req.Header.Set("Authorization", "Bearer shop-token")
		if etag != "" {
			req.Header.Set("If-None-Match", etag)
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.ReadAll(resp.Body)
		resp.Body.Close()
		want := http.StatusNotModified
		if i == 0 {
			want = http.StatusOK
		}
		if resp.StatusCode != want {
			t.Fatalf("request %d: %d, want %d", i, resp.StatusCode, want)
		}
		etag = resp.Header.Get("ETag")
	}
	before := runtime.NumGoroutine()
	var conns []net.Conn
	for i := 0; i < 50; i++ {
		conn, err := net.Dial("tcp", strings.TrimPrefix(hs.URL, "http://"))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.Write([]byte("GET " + Path + "?wait=30s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer shop-token\r\nIf-None-Match: " + etag + "\r\n\r\n"))
		conns = append(conns, conn)
	}
	waitFor(t, func() bool { return testutil.ToFloat64(s.Metrics.Waiting) == 50 })
	time.Sleep(50 * time.Millisecond)
	if n := runtime.NumGoroutine() - before; n > 5 {
		t.Fatalf("50 parked sidecars hold %d goroutines", n)
	}
}

// A refused token ends its connection: one connection cannot send request after request,
// each a TokenReview against the API server.
func TestUnauthorizedClosesTheConnection(t *testing.T) {
	s, hs := newServer(t)
	s.SetPolicy(parse(t, v1))
	for _, token := range []string{"forged", ""} {
		conn, err := net.Dial("tcp", strings.TrimPrefix(hs.URL, "http://"))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		auth := ""
		if token != "" {
			auth = "Authorization: Bearer " + token + "\r\n"
		}
		conn.Write([]byte("GET " + Path + " HTTP/1.1\r\nHost: x\r\n" + auth + "\r\n"))
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		br := bufio.NewReader(conn)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusUnauthorized || !resp.Close {
			t.Fatalf("token %q: %d, Connection: %q; want 401 and Connection: close", token, resp.StatusCode, resp.Header.Get("Connection"))
		}
		if _, err := br.ReadByte(); err != io.EOF {
			t.Fatalf("token %q: after a 401 the connection is still open (read: %v), want EOF", token, err)
		}
	}
}
