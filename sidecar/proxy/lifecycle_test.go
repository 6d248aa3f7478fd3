package proxy

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/egress-guard/egress-guard/internal/tlstest"
	"github.com/egress-guard/egress-guard/pkg/accesslog"
	"github.com/egress-guard/egress-guard/pkg/addrclass"
	"github.com/egress-guard/egress-guard/pkg/metrics"
	"github.com/egress-guard/egress-guard/pkg/policy"
	"github.com/egress-guard/egress-guard/sidecar/tunnel"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// fakeResolver answers "localhost" with loopback and says every other name does not exist,
// so that no test depends on (or sends queries to) the machine's DNS.
type fakeResolver struct{}

func (fakeResolver) LookupNetIP(_ context.Context, _, host string) ([]netip.Addr, error) {
	if host == "localhost" {
		return []netip.Addr{netip.MustParseAddr("127.0.0.1")}, nil
	}
	return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
}

// A name that does not exist is one event with one wording: action failed, reason
// no_such_host, status connection_failed, and a 502 that says so.
func TestNoSuchHostIsFailedNotDenied(t *testing.T) {
	f := startWith(t, loopPolicy, func(c *Config) { c.Resolver = fakeResolver{} })
	mark := f.logs.mark()
	c, err := net.Dial("tcp", f.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, connectReq("missing.example.com:443", basic("k2")))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(string(resp), "HTTP/1.1 502 ") || !strings.Contains(string(resp), "egress-guard: destination name does not exist (no_such_host)") {
		t.Fatalf("answer %q", resp)
	}
	d := f.logs.one(t, mark, "decision")
	expect(t, d, "action", "failed", "reason", "no_such_host", "status", "connection_failed", "destination", "*.example.com", "identity", "names-only")
	cl := f.logs.one(t, mark, "close")
	expect(t, cl, "reason", "refused", "decision_reason", "no_such_host", "status", "connection_failed")
	if n := testutil.ToFloat64(f.metrics.Requests.WithLabelValues("names-only", "*.example.com", "connection_failed")); n != 1 {
		t.Fatalf("requests_total{connection_failed} = %v", n)
	}
}

// A dial failure keeps the decision's reason on the close line: the close line says why the
// connection ended, the decision line why it was allowed.
func TestDialFailureKeepsTheDecisionReason(t *testing.T) {
	f := start(t, loopPolicy)
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := ln.Addr().String()
	ln.Close()
	mark := f.logs.mark()
	if code, _, _ := rawRequest(t, f.addr, connectReq(addr, basic("k1"))); code != http.StatusBadGateway {
		t.Fatalf("status %d, want 502", code)
	}
	expect(t, f.logs.one(t, mark, "decision"), "action", "allowed", "reason", "rule", "status", "allowed")
	expect(t, f.logs.one(t, mark, "close"), "reason", "dial_failed", "decision_reason", "rule", "status", "connection_failed")
	if n := testutil.ToFloat64(f.metrics.Requests.WithLabelValues("loop", "127.0.0.0/8", "connection_failed")); n != 1 {
		t.Fatalf("requests_total{connection_failed} = %v", n)
	}
}

// The wait for a ClientHello is not taken out of the dial budget: a client that takes longer
// than DIAL_TIMEOUT to send its hello (but less than PEEK_TIMEOUT) still gets its tunnel.
func TestPeekAndDialHaveTheirOwnBudgets(t *testing.T) {
	port, accepted := tlsUpstream(t)
	f := startWith(t, loopPolicy, func(c *Config) {
		c.DialTimeout = 300 * time.Millisecond
		c.PeekTimeout = 5 * time.Second
	}, port)
	target := net.JoinHostPort("localhost", strconv.Itoa(int(port)))
	code, br, c := rawRequest(t, f.addr, connectReq(target, basic("k1")))
	if code != 200 {
		t.Fatalf("CONNECT = %d", code)
	}
	time.Sleep(600 * time.Millisecond) // twice the dial budget
	tc := tls.Client(&bufConn{Conn: c, r: br}, &tls.Config{ServerName: "localhost", InsecureSkipVerify: true})
	tc.SetDeadline(time.Now().Add(5 * time.Second))
	if err := tc.Handshake(); err != nil {
		t.Fatalf("handshake after a slow ClientHello: %v", err)
	}
	if accepted.Load() != 1 {
		t.Fatalf("upstream connections = %d, want 1", accepted.Load())
	}
}

// Zero limits mean the documented defaults; a zero Config used to drop every request.
func TestNewFillsDefaultsAndRejectsMissingParts(t *testing.T) {
	if _, err := New(Config{}); err == nil || !strings.Contains(err.Error(), "Policy") {
		t.Fatalf("New(Config{}) = %v, want an error naming the missing parts", err)
	}
	if _, err := New(Config{Policy: func() *policy.Policy { return nil }, Classifier: addrclass.New(nil, nil), Resolver: fakeResolver{},
		Tracker: tunnel.NewTracker(tunnel.Config{}), AccessLog: accesslog.New(slog.New(slog.DiscardHandler)), Metrics: metrics.New(),
		HeaderTimeout: -time.Second}); err == nil {
		t.Fatal("negative HeaderTimeout accepted")
	}
	f := startWith(t, loopPolicy, func(c *Config) {
		c.HeaderTimeout, c.MaxHeaderBytes, c.PeekTimeout, c.DialTimeout, c.Dialer, c.Log = 0, 0, 0, 0, nil, nil
	})
	if f.server.cfg.HeaderTimeout != DefaultHeaderTimeout || f.server.cfg.MaxHeaderBytes != DefaultMaxHeaderBytes ||
		f.server.cfg.DialTimeout != DefaultDialTimeout || f.server.cfg.PeekTimeout != DefaultPeekTimeout {
		t.Fatalf("defaults not applied: %+v", f.server.cfg)
	}
	port, _ := echoServer(t)
	if code, _, _ := rawRequest(t, f.addr, connectReq("127.0.0.1:"+port, basic("k1"))); code != http.StatusOK {
		t.Fatalf("CONNECT with a zero-limit Config = %d", code)
	}
}

// When the tracker refuses a captured connection (here: the budget of undecided connections
// is spent) it is reset (never an HTTP status written into what the app takes for a TLS, SSH
// or SMTP stream), and it gets its decision and close lines.
func TestTransparentRefusedAtAcceptIsResetAndLogged(t *testing.T) {
	f := startWith(t, loopPolicy, func(c *Config) {
		c.Tracker = tunnel.NewTracker(tunnel.Config{MaxPending: 1})
		c.Identity = IdentityNamed("loop")
	})
	// One silent explicit client holds the only undecided slot.
	hold, err := net.Dial("tcp", f.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer hold.Close()
	waitFor(t, func() bool { return f.server.cfg.Tracker.Len() == 1 })

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go f.server.ServeTransparent(ln)
	mark := f.logs.mark()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err == nil {
		// The reset may come before connect returns (then Dial reports it) or after.
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		var got []byte
		got, err = io.ReadAll(c)
		if len(got) != 0 {
			t.Fatalf("captured client received %q; want nothing but a reset", got)
		}
	}
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("error %v, want a reset", err)
	}
	expect(t, f.logs.one(t, mark, "decision"), "listener", "transparent", "action", "denied", "reason", "pending_limit", "status", "denied")
	expect(t, f.logs.one(t, mark, "close"), "listener", "transparent", "reason", "refused", "decision_reason", "pending_limit")
	if n := testutil.ToFloat64(f.metrics.Refusals.WithLabelValues("pending_limit")); n != 1 {
		t.Fatalf("refusals_total{pending_limit} = %v", n)
	}

	// The explicit listener answers 503, with the same lines.
	mark = f.logs.mark()
	if code, _, _ := rawRequest(t, f.addr, connectReq("127.0.0.1:1", "")); code != http.StatusServiceUnavailable {
		t.Fatalf("explicit at the pending budget = %d, want 503", code)
	}
	expect(t, f.logs.one(t, mark, "decision"), "listener", "explicit", "action", "denied", "reason", "pending_limit")
	expect(t, f.logs.one(t, mark, "close"), "listener", "explicit", "reason", "refused")
}

// Clients that never authenticate cannot take the tunnel cap: it counts decided connections
// only. At the cap, an allowed connection is refused with 503 tunnel_limit; an identity's own
// limit is refused the same way, for that identity only.
func TestSilentClientsDoNotTakeTheCap(t *testing.T) {
	f := startWith(t, `
identities:
  a: {api_keys: [ka], allowed_destinations: ["127.0.0.0/8"]}
  b: {api_keys: [kb], allowed_destinations: ["127.0.0.0/8"]}
  c: {api_keys: [kc], allowed_destinations: ["127.0.0.0/8"]}
`, func(c *Config) {
		c.Tracker = tunnel.NewTracker(tunnel.Config{MaxConns: 2, MaxPending: 50, MaxPendingPerClient: 20, MaxPerIdentity: 1})
	})
	for i := 0; i < 10; i++ {
		silent, err := net.Dial("tcp", f.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer silent.Close()
	}
	waitFor(t, func() bool { return f.server.cfg.Tracker.Len() == 10 })
	port, _ := echoServer(t)
	target := "127.0.0.1:" + port
	if code, _, _ := rawRequest(t, f.addr, connectReq(target, basic("ka"))); code != http.StatusOK {
		t.Fatalf("CONNECT with 10 silent clients open = %d, want 200", code)
	}
	mark := f.logs.mark()
	if code, _, _ := rawRequest(t, f.addr, connectReq(target, basic("ka"))); code != http.StatusServiceUnavailable {
		t.Fatalf("second tunnel of identity a = %d, want 503 (identity limit 1)", code)
	}
	expect(t, f.logs.one(t, mark, "decision"), "identity", "a", "action", "denied", "reason", "identity_limit")
	if code, _, _ := rawRequest(t, f.addr, connectReq(target, basic("kb"))); code != http.StatusOK {
		t.Fatalf("identity b = %d, want 200", code)
	}
	mark = f.logs.mark()
	if code, _, _ := rawRequest(t, f.addr, connectReq(target, basic("kc"))); code != http.StatusServiceUnavailable {
		t.Fatalf("third tunnel at MaxConns 2 = %d, want 503", code)
	}
	expect(t, f.logs.one(t, mark, "decision"), "identity", "c", "action", "denied", "reason", "tunnel_limit")
	if n := testutil.ToFloat64(f.metrics.TunnelsRejected); n != 1 {
		t.Fatalf("tunnel_limit_rejections_total = %v", n)
	}
}

// A tunnel whose API key is removed from the policy is closed (policy_revoked), with its close
// line; a tunnel the new policy still allows goes on.
func TestPolicyChangeRevokesOpenTunnels(t *testing.T) {
	before := mustParse(t, "identities:\n  a: {api_keys: [ka], allowed_destinations: [\"127.0.0.0/8\"]}\n  b: {api_keys: [kb], allowed_destinations: [\"127.0.0.0/8\"]}\n")
	after := mustParse(t, "identities:\n  b: {api_keys: [kb], allowed_destinations: [\"127.0.0.0/8\"]}\n")
	var cur atomic.Pointer[policy.Policy]
	cur.Store(before)
	f := startWith(t, loopPolicy, func(c *Config) { c.Policy = cur.Load })
	port, _ := echoServer(t)
	target := "127.0.0.1:" + port
	_, brA, ca := rawRequest(t, f.addr, connectReq(target, basic("ka")))
	_, brB, cb := rawRequest(t, f.addr, connectReq(target, basic("kb")))
	for _, c := range []net.Conn{ca, cb} {
		io.WriteString(c, "x")
	}
	one := make([]byte, 1)
	io.ReadFull(brA, one)
	io.ReadFull(brB, one)
	mark := f.logs.mark()
	cur.Store(after)
	ca.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := brA.ReadByte(); err == nil {
		t.Fatal("the revoked key's tunnel still delivers")
	}
	expect(t, f.logs.one(t, mark, "close"), "identity", "a", "reason", "policy_revoked", "decision_reason", "rule")
	io.WriteString(cb, "y")
	cb.SetReadDeadline(time.Now().Add(5 * time.Second))
	if b, err := brB.ReadByte(); err != nil || b != 'y' {
		t.Fatalf("the still-allowed tunnel broke: %q %v", b, err)
	}
}

// ssh over 443: a rule with tls: optional lets a CONNECT tunnel to a TLS port carry another
// protocol; without it the tunnel is reset; with it, a ClientHello must still name the host.
func TestTLSOptionalRule(t *testing.T) {
	port, accepted := echoServer(t)
	p, _ := strconv.Atoi(port)
	f := start(t, `
identities:
  git:
    api_keys: ["kg"]
    allowed_destinations:
      - "127.0.0.0/8"
      - destination: "localhost"
        tls: optional
  strict:
    api_keys: ["ks"]
    allowed_destinations: ["127.0.0.0/8", "localhost"]
`, uint16(p))
	target := "localhost:" + port

	mark := f.logs.mark()
	code, br, c := rawRequest(t, f.addr, connectReq(target, basic("kg")))
	if code != 200 {
		t.Fatalf("CONNECT = %d", code)
	}
	io.WriteString(c, "SSH-2.0-OpenSSH_9.6\r\n")
	line := make([]byte, len("SSH-2.0-OpenSSH_9.6\r\n"))
	if _, err := io.ReadFull(br, line); err != nil || string(line) != "SSH-2.0-OpenSSH_9.6\r\n" {
		t.Fatalf("ssh banner through a tls: optional tunnel: %q %v", line, err)
	}
	expect(t, f.logs.one(t, mark, "decision"), "action", "allowed", "reason", "rule", "destination", "localhost", "protocol", "tcp")
	c.Close()

	// The same bytes under a rule without the option: reset, never dialed.
	before := accepted.Load()
	_, br, c = rawRequest(t, f.addr, connectReq(target, basic("ks")))
	io.WriteString(c, "SSH-2.0-OpenSSH_9.6\r\n")
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := br.ReadByte(); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("non-TLS bytes on a TLS port without tls: optional: %v, want a reset", err)
	}
	if accepted.Load() != before {
		t.Fatal("the upstream was dialed for a refused tunnel")
	}

	// tls: optional does not relax the SNI check of a TLS client.
	mark = f.logs.mark()
	_, br, c = rawRequest(t, f.addr, connectReq(target, basic("kg")))
	c.Write(tlstest.CaptureHello(t, &tls.Config{ServerName: "evil.test"}))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := br.ReadByte(); err == nil {
		t.Fatal("a mismatched SNI got an answer")
	}
	expect(t, f.logs.one(t, mark, "decision"), "action", "denied", "reason", "sni_mismatch", "sni", "evil.test")
}

// A ClientHello with encrypted_client_hello names only the outer host: it is logged, and with
// DenyECH refused unless the rule opts in (ech: allow).
func TestECHLoggedAndDeniedUnlessARuleOptsIn(t *testing.T) {
	port, accepted := echoServer(t)
	p, _ := strconv.Atoi(port)
	policyYAML := `
identities:
  plain:
    api_keys: ["kp"]
    allowed_destinations: ["127.0.0.0/8", "localhost"]
  cdn:
    api_keys: ["kc"]
    allowed_destinations:
      - "127.0.0.0/8"
      - destination: "localhost"
        ech: allow
`
	hello := tlstest.WithExtension(tlstest.CaptureHello(t, &tls.Config{ServerName: "localhost"}), tlstest.ExtECH, []byte{0, 1, 2, 3})
	send := func(f *fixture, key string) (map[string]any, bool) {
		mark := f.logs.mark()
		_, br, c := rawRequest(t, f.addr, connectReq("localhost:"+port, basic(key)))
		c.Write(hello)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		echo := make([]byte, len(hello))
		_, err := io.ReadFull(br, echo)
		return f.logs.one(t, mark, "decision"), err == nil
	}

	f := start(t, policyYAML, uint16(p))
	d, ok := send(f, "kp")
	expect(t, d, "action", "allowed", "ech", true)
	if !ok {
		t.Fatal("ECH tunnel refused without DenyECH")
	}

	f = startWith(t, policyYAML, func(c *Config) { c.DenyECH = true }, uint16(p))
	before := accepted.Load()
	d, ok = send(f, "kp")
	expect(t, d, "action", "denied", "reason", "ech_not_allowed", "ech", true, "status", "sni_mismatch")
	if ok || accepted.Load() != before {
		t.Fatal("an ECH ClientHello reached the upstream with DenyECH")
	}
	d, ok = send(f, "kc")
	expect(t, d, "action", "allowed", "destination", "localhost", "ech", true)
	if !ok {
		t.Fatal("ech: allow did not let the ECH ClientHello through")
	}
}

// Plain HTTP keeps the client connection alive: each request is authenticated, decided and
// logged on its own (same connection number, request 1, 2, ...), and the upstream connection
// is reused for the identity.
func TestPlainHTTPKeepAlive(t *testing.T) {
	var upstreamConns atomic.Int64
	up := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "hello "+r.URL.Path)
	}))
	up.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			upstreamConns.Add(1)
		}
	}
	up.Start()
	defer up.Close()
	f := start(t, loopPolicy)
	c, err := net.Dial("tcp", f.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(c)
	mark := f.logs.mark()
	get := func(path, auth string) (int, string) {
		fmt.Fprintf(c, "GET %s%s HTTP/1.1\r\nHost: x\r\nProxy-Authorization: %s\r\n\r\n", up.URL, path, auth)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := get("/one", basic("k1")); code != 200 || body != "hello /one" {
		t.Fatalf("first request: %d %q", code, body)
	}
	if code, body := get("/two", basic("k1")); code != 200 || body != "hello /two" {
		t.Fatalf("second request on the same connection: %d %q", code, body)
	}
	if n := upstreamConns.Load(); n != 1 {
		t.Fatalf("upstream connections = %d, want 1 (reused)", n)
	}
	// The third request's credentials are checked on their own.
	if code, _ := get("/three", basic("nobody")); code != http.StatusProxyAuthRequired {
		t.Fatalf("third request with an unknown key = %d, want 407", code)
	}
	waitFor(t, func() bool { return len(f.logs.records(mark, "close")) == 3 })
	ds := f.logs.records(mark, "decision")
	if len(ds) != 3 {
		t.Fatalf("%d decision lines, want 3", len(ds))
	}
	expect(t, ds[0], "request", 1, "method", "GET", "identity", "loop", "action", "allowed")
	expect(t, ds[1], "request", 2, "conn", ds[0]["conn"], "identity", "loop", "action", "allowed")
	expect(t, ds[2], "request", 3, "conn", ds[0]["conn"], "identity", "unknown", "reason", "unknown_api_key")
	cs := f.logs.records(mark, "close")
	expect(t, cs[0], "request", 1, "reason", "closed", "bytes_down", cs[0]["bytes_down"])
	if cs[0]["bytes_down"].(float64) <= 0 {
		t.Fatalf("close line without response bytes: %v", cs[0])
	}
}

// Expect: 100-continue (curl -T, large POSTs): the upstream's 100 Continue is relayed, the
// client then sends its body, and the final response follows.
func TestExpectContinueIsRelayed(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		fmt.Fprintf(w, "got %d bytes: %s", len(b), b)
	}))
	defer up.Close()
	f := start(t, loopPolicy)
	c, err := net.Dial("tcp", f.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(c, "POST %s/upload HTTP/1.1\r\nHost: x\r\nProxy-Authorization: %s\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n", up.URL, basic("k1"))
	br := bufio.NewReader(c)
	interim, err := http.ReadResponse(br, nil)
	if err != nil || interim.StatusCode != http.StatusContinue {
		t.Fatalf("want 100 Continue before sending the body, got %v %v", interim, err)
	}
	io.WriteString(c, "hello")
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || string(b) != "got 5 bytes: hello" {
		t.Fatalf("final response %d %q", resp.StatusCode, b)
	}
}

// A keep-alive client connection that stays idle between requests is closed after
// KEEPALIVE_TIMEOUT, and writes no line (there was no request to log).
func TestKeepAliveTimeoutClosesIdleClients(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }))
	defer up.Close()
	f := startWith(t, loopPolicy, func(c *Config) { c.KeepAliveTimeout = 200 * time.Millisecond })
	c, err := net.Dial("tcp", f.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	mark := f.logs.mark()
	fmt.Fprintf(c, "GET %s/ HTTP/1.1\r\nHost: x\r\nProxy-Authorization: %s\r\n\r\n", up.URL, basic("k1"))
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("%v %v", resp, err)
	}
	io.ReadAll(resp.Body)
	start := time.Now()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := br.ReadByte(); err != io.EOF {
		t.Fatalf("idle keep-alive connection: %v, want EOF", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("closed after %v, want about 200ms", d)
	}
	time.Sleep(50 * time.Millisecond)
	if n := len(f.logs.records(mark, "decision")); n != 1 {
		t.Fatalf("%d decision lines, want 1 (the one request)", n)
	}
	if n := len(f.logs.records(mark, "close")); n != 1 {
		t.Fatalf("%d close lines, want 1", n)
	}
}

// A plain-HTTP response still streaming when the policy stops allowing its upstream address is
// cut like a tunnel: the new policy is asked about the address the request was dialed to.
func TestPolicyChangeCutsStreamingPlainHTTP(t *testing.T) {
	// localhost resolves to 127.0.0.1, internal: only the 127.0.0.0/8 rule names it.
	before := mustParse(t, "identities:\n  a: {api_keys: [ka], allowed_destinations: [localhost, \"127.0.0.0/8\"]}\n")
	after := mustParse(t, "identities:\n  a: {api_keys: [ka], allowed_destinations: [localhost]}\n")
	var cur atomic.Pointer[policy.Policy]
	cur.Store(before)
	release := make(chan struct{})
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "first\n")
		w.(http.Flusher).Flush()
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	defer up.Close()
	defer close(release) // before up.Close, which waits for the handler
	f := startWith(t, loopPolicy, func(c *Config) { c.Policy = cur.Load })
	c, err := net.Dial("tcp", f.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	_, port, _ := net.SplitHostPort(up.Listener.Addr().String())
	fmt.Fprintf(c, "GET http://localhost:%s/stream HTTP/1.1\r\nHost: localhost\r\nProxy-Authorization: %s\r\n\r\n", port, basic("ka"))
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("response %v %v", resp, err)
	}
	if line, err := bufio.NewReader(resp.Body).ReadString('\n'); err != nil || line != "first\n" {
		t.Fatalf("first chunk %q %v", line, err)
	}
	mark := f.logs.mark()
	cur.Store(after)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadAll(resp.Body); err == nil {
		t.Fatal("the response the new policy refuses ended normally")
	} else if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatal("the response the new policy refuses was not cut")
	}
	expect(t, f.logs.one(t, mark, "close"), "identity", "a", "reason", "policy_revoked")
}

// Drain ends a plain-HTTP request waiting on an upstream that accepted and never answers: at
// the deadline the tracker closes the client, the request is cancelled, its close line says
// drain, and Drain returns.
func TestDrainEndsARequestWaitingOnASilentUpstream(t *testing.T) {
	accepted := make(chan struct{})
	up := oneConnUpstream(t, func(c net.Conn) {
		close(accepted)
		io.Copy(io.Discard, c) // silent until the proxy gives up on it
	})
	f := start(t, loopPolicy)
	mark := f.logs.mark()
	plainGet(t, f.addr, up)
	select {
	case <-accepted:
	case <-time.After(5 * time.Second):
		t.Fatal("the request never reached the upstream")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	done := make(chan struct{})
	go func() { f.tracker.Drain(ctx); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Drain did not return: the request still waits on the silent upstream")
	}
	expect(t, f.logs.one(t, mark, "close"), "identity", "loop", "reason", "drain")
}

// A response whose body only the upstream's close delimits (no Content-Length, not chunked)
// ends with the client connection's close, at once, not after the keep-alive timeout.
func TestCloseDelimitedResponseClosesTheClient(t *testing.T) {
	up := oneConnUpstream(t, func(c net.Conn) {
		http.ReadRequest(bufio.NewReader(c))
		io.WriteString(c, "HTTP/1.1 200 OK\r\n\r\nhello-body")
	})
	f := start(t, loopPolicy) // KeepAliveTimeout: the default 30 s
	c := plainGet(t, f.addr, up)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	if err != nil || string(body) != "hello-body" {
		t.Fatalf("body %q, %v; want hello-body and EOF (the connection closed)", body, err)
	}
}

// A request with both Content-Length and a chunked body (request smuggling through a front end
// that frames by Content-Length) is answered, and then the connection is closed: what follows
// the chunked body is never read as another request.
func TestChunkedRequestClosesTheConnection(t *testing.T) {
	var paths []string
	var mu sync.Mutex
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		paths = append(paths, r.Method+" "+r.URL.Path)
		mu.Unlock()
		io.WriteString(w, "ok")
	}))
	defer up.Close()
	f := start(t, loopPolicy)
	c, err := net.Dial("tcp", f.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	auth := "Proxy-Authorization: " + basic("k1") + "\r\n"
	io.WriteString(c, "POST "+up.URL+"/a HTTP/1.1\r\nHost: a\r\n"+auth+"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"+
		"GET "+up.URL+"/smuggled HTTP/1.1\r\nHost: a\r\n"+auth+"\r\n")
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != 200 || !resp.Close {
		t.Fatalf("response %v (close %v), %v; want 200 with Connection: close", resp, resp != nil && resp.Close, err)
	}
	io.ReadAll(resp.Body)
	if rest, err := io.ReadAll(br); err != nil || len(rest) != 0 {
		t.Fatalf("after the response: %q, %v; want the connection closed", rest, err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(paths) != 1 || paths[0] != "POST /a" {
		t.Fatalf("the upstream got %v, want only POST /a", paths)
	}
}

// oneConnUpstream serves its first connection with serve, then closes it; it returns its
// address.
func oneConnUpstream(t *testing.T, serve func(net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		if c, err := ln.Accept(); err == nil {
			defer c.Close()
			serve(c)
		}
	}()
	return ln.Addr().String()
}

// plainGet sends a plain-HTTP GET for http://upstream/ through the proxy at addr, with the
// loop policy's key, and returns the client connection.
func plainGet(t *testing.T, addr, upstream string) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	fmt.Fprintf(c, "GET http://%s/ HTTP/1.1\r\nHost: x\r\nProxy-Authorization: %s\r\n\r\n", upstream, basic("k1"))
	return c
}

// mustParse parses a policy document of a test.
func mustParse(t *testing.T, y string) *policy.Policy {
	t.Helper()
	p, err := policy.Parse("p.yaml", []byte(y), policy.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return p
}
