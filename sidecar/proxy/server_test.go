package proxy

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/egress-guard/egress-guard/pkg/accesslog"
	"github.com/egress-guard/egress-guard/pkg/addrclass"
	"github.com/egress-guard/egress-guard/pkg/metrics"
	"github.com/egress-guard/egress-guard/pkg/policy"
	"github.com/egress-guard/egress-guard/sidecar/tunnel"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// logBuffer collects log output safely across goroutines.
type logBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// mark is the length of the log so far: records(mark, ...) reads only what came after.
func (l *logBuffer) mark() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Len()
}

// records returns the JSON lines with that msg written after mark.
func (l *logBuffer) records(mark int, msg string) []map[string]any {
	var out []map[string]any
	for _, line := range strings.Split(l.String()[mark:], "\n") {
		var r map[string]any
		if json.Unmarshal([]byte(line), &r) == nil && r["msg"] == msg {
			out = append(out, r)
		}
	}
	return out
}

// one waits for exactly one line with that msg after mark and returns it.
func (l *logBuffer) one(t *testing.T, mark int, msg string) map[string]any {
	t.Helper()
	waitFor(t, func() bool { return len(l.records(mark, msg)) > 0 })
	time.Sleep(20 * time.Millisecond) // a second line, if any, would be written by now
	recs := l.records(mark, msg)
	if len(recs) != 1 {
		t.Fatalf("%d %q lines after the mark, want 1: %v", len(recs), msg, recs)
	}
	return recs[0]
}

// expect fails unless r has exactly these field values.
func expect(t *testing.T, r map[string]any, kv ...any) {
	t.Helper()
	for i := 0; i < len(kv); i += 2 {
		if got := r[kv[i].(string)]; fmt.Sprint(got) != fmt.Sprint(kv[i+1]) {
			t.Errorf("%s line: %s = %v, want %v (line %v)", r["msg"], kv[i], got, kv[i+1], r)
		}
	}
}

type fixture struct {
	addr    string
	metrics *metrics.Metrics
	logs    *logBuffer
	server  *Server
	tracker *tunnel.Tracker
}

// start runs a proxy on 127.0.0.1 with the given policy. Loopback is internal, so tests that
// reach loopback upstreams need a rule naming 127.0.0.0/8, exactly as in production.
func start(t testing.TB, policyYAML string, tlsPorts ...uint16) *fixture {
	t.Helper()
	return startWith(t, policyYAML, func(*Config) {}, tlsPorts...)
}

// startWith is start with a hook that may change the configuration before New.
func startWith(t testing.TB, policyYAML string, adjust func(*Config), tlsPorts ...uint16) *fixture {
	t.Helper()
	pol, err := policy.Parse("test.yaml", []byte(policyYAML), policy.Options{InternalDomains: policy.DefaultInternalDomains})
	if err != nil {
		t.Fatal(err)
	}
	logs := &logBuffer{}
	m := metrics.New()
	tp := map[uint16]bool{}
	for _, p := range tlsPorts {
		tp[p] = true
	}
	tr := tunnel.NewTracker(tunnel.Config{IdleTimeout: time.Minute})
	cfg := Config{
		Policy:         func() *policy.Policy { return pol },
		Classifier:     addrclass.New(nil, nil),
		Resolver:       net.DefaultResolver,
		Dialer:         &net.Dialer{},
		Tracker:        tr,
		AccessLog:      accesslog.New(slog.New(slog.NewJSONHandler(logs, nil))),
		Metrics:        m,
		Log:            slog.New(slog.NewJSONHandler(logs, nil)),
		TLSPorts:       tp,
		HeaderTimeout:  2 * time.Second,
		MaxHeaderBytes: 4096,
		PeekTimeout:    2 * time.Second,
		DialTimeout:    2 * time.Second,
	}
	adjust(&cfg)
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve(ln)
	t.Cleanup(func() {
		s.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		tr.Drain(ctx)
	})
	return &fixture{addr: ln.Addr().String(), metrics: m, logs: logs, server: s, tracker: tr}
}

func basic(key string) string {
	return "Basic " + base64.StdEncoding.EncodeToString([]byte(key+":anything"))
}

// rawRequest sends text and returns the response status code and the connection's reader.
func rawRequest(t testing.TB, addr, text string) (int, *bufio.Reader, net.Conn) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, text); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("reading response to %q: %v", strings.SplitN(text, "\r\n", 2)[0], err)
	}
	// A 200 to CONNECT has no body: what follows is the tunnel.
	if resp.StatusCode != http.StatusOK {
		io.Copy(io.Discard, resp.Body)
	}
	if resp.StatusCode == http.StatusProxyAuthRequired && resp.Header.Get("Proxy-Authenticate") == "" {
		t.Error("407 without Proxy-Authenticate")
	}
	return resp.StatusCode, br, c
}

func connectReq(target, auth string) string {
	s := "CONNECT " + target + " HTTP/1.1\r\nHost: " + target + "\r\n"
	if auth != "" {
		s += "Proxy-Authorization: " + auth + "\r\n"
	}
	return s + "\r\n"
}

// echoServer counts accepted connections and echoes.
func echoServer(t testing.TB) (port string, accepted *atomic.Int64) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	accepted = new(atomic.Int64)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	_, port, _ = net.SplitHostPort(ln.Addr().String())
	return port, accepted
}

const loopPolicy = `
identities:
  loop:
    api_keys: ["k1"]
    allowed_destinations: ["127.0.0.0/8", "localhost"]
  names-only:
    api_keys: ["k2"]
    allowed_destinations: ["localhost", "*.example.com"]
  watcher:
    mode: audit
    api_keys: ["k3"]
    allowed_destinations: ["api.example.com"]
`

func TestConnectTunnelsAndCounts(t *testing.T) {
	f := start(t, loopPolicy)
	port, _ := echoServer(t)
	code, br, c := rawRequest(t, f.addr, connectReq("127.0.0.1:"+port, basic("k1")))
	if code != http.StatusOK {
		t.Fatalf("CONNECT = %d", code)
	}
	io.WriteString(c, "ping")
	buf := make([]byte, 4)
	if _, err := io.ReadFull(br, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("echo through tunnel: %q %v", buf, err)
	}
	c.Close()
	waitFor(t, func() bool { return strings.Contains(f.logs.String(), `"msg":"close"`) })
	if n := testutil.ToFloat64(f.metrics.Requests.WithLabelValues("loop", "127.0.0.0/8", "allowed")); n != 1 {
		t.Fatalf("requests_total{loop,127.0.0.0/8,allowed} = %v", n)
	}
	logs := f.logs.String()
	for _, want := range []string{`"msg":"decision"`, `"identity":"loop"`, `"destination":"127.0.0.0/8"`, `"bytes_up":4`, `"bytes_down":4`} {
		if !strings.Contains(logs, want) {
			t.Errorf("logs lack %s:\n%s", want, logs)
		}
	}
}

func TestNameResolvingToLoopbackIsInternal(t *testing.T) {
	f := start(t, loopPolicy)
	port, accepted := echoServer(t)
	// "localhost" is allowed by name for k2, but it resolves to loopback and no rule of k2
	// names loopback: denied before any connection.
	if code, _, _ := rawRequest(t, f.addr, connectReq("localhost:"+port, basic("k2"))); code != http.StatusForbidden {
		t.Fatalf("CONNECT localhost as names-only = %d, want 403", code)
	}
	if accepted.Load() != 0 {
		t.Fatal("denied destination received a connection")
	}
	if !strings.Contains(f.logs.String(), `"reason":"internal_address"`) {
		t.Fatalf("no internal_address reason in logs:\n%s", f.logs.String())
	}
	// k1 names 127.0.0.0/8, so the same name is reachable.
	if code, _, _ := rawRequest(t, f.addr, connectReq("localhost:"+port, basic("k1"))); code != http.StatusOK {
		t.Fatalf("CONNECT localhost as loop = %d, want 200", code)
	}
}

func TestAuthAndMalformed(t *testing.T) {
	f := start(t, loopPolicy)
	port, _ := echoServer(t)
	cases := []struct {
		name, req string
		want      int
	}{
		{"no credentials", connectReq("127.0.0.1:"+port, ""), 407},
		{"unknown key", connectReq("127.0.0.1:"+port, basic("secret-unknown-key")), 407},
		{"bearer not configured", connectReq("127.0.0.1:"+port, "Bearer abc"), 407},
		{"not in policy", connectReq("198.18.7.7:443", basic("k2")), 403},
		{"no port", "CONNECT 127.0.0.1 HTTP/1.1\r\nHost: x\r\n\r\n", 400},
		{"garbage", "GARBAGE\r\n\r\n", 400},
		{"origin-form GET", "GET / HTTP/1.1\r\nHost: example.com\r\n\r\n", 400},
		{"https in GET", "GET https://api.example.com/ HTTP/1.1\r\nHost: api.example.com\r\n\r\n", 400},
		{"bad host", connectReq("exa mple.com:443", basic("k1")), 400},
		{"huge head", "GET http://a.example.com/ HTTP/1.1\r\nX: " + strings.Repeat("a", 8000) + "\r\n\r\n", 431},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if code, _, _ := rawRequest(t, f.addr, tc.req); code != tc.want {
				t.Fatalf("status %d, want %d", code, tc.want)
			}
		})
	}
	if strings.Contains(f.logs.String(), "secret-unknown-key") {
		t.Fatal("an unknown API key was logged")
	}
	if n := testutil.ToFloat64(f.metrics.Requests.WithLabelValues("unknown", "none", "auth_required")); n != 1 {
		t.Fatalf("requests_total{unknown,none,auth_required} = %v", n)
	}
	if n := testutil.ToFloat64(f.metrics.Requests.WithLabelValues("none", "none", "bad_request")); n < 5 {
		t.Fatalf("bad_request count = %v", n)
	}
}

func TestAuditModeAllowsAndCounts(t *testing.T) {
	f := start(t, loopPolicy+`
  audit-loop:
    mode: audit
    api_keys: ["k4"]
    allowed_destinations: ["127.0.0.0/8"]
`)
	port, _ := echoServer(t)
	// "localhost" matches no rule of audit-loop, but audit mode lets it through; it resolves
	// to loopback, which the identity's 127.0.0.0/8 rule names, so the internal guard passes.
	if code, _, _ := rawRequest(t, f.addr, connectReq("localhost:"+port, basic("k4"))); code != http.StatusOK {
		t.Fatalf("audit CONNECT = %d, want 200", code)
	}
	if n := testutil.ToFloat64(f.metrics.AuditWouldDeny.WithLabelValues("audit-loop", "no_matching_rule")); n != 1 {
		t.Fatalf("audit_would_deny = %v", n)
	}
	if !strings.Contains(f.logs.String(), `"action":"audit"`) {
		t.Fatal("no audit action logged")
	}
	// Audit mode never opens internal addresses: k3's rules name no loopback address.
	if code, _, _ := rawRequest(t, f.addr, connectReq("localhost:"+port, basic("k3"))); code != http.StatusForbidden {
		t.Fatalf("audit identity to loopback = %d, want 403", code)
	}
	if code, _, _ := rawRequest(t, f.addr, connectReq("127.0.0.1:"+port, basic("k3"))); code != http.StatusForbidden {
		t.Fatalf("audit identity to 127.0.0.1 = %d, want 403", code)
	}
}

func TestPlainHTTPForwardStripsProxyHeaders(t *testing.T) {
	f := start(t, loopPolicy)
	var sawAuth, sawConn atomic.Value
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sawAuth.Store(r.Header.Get("Proxy-Authorization"))
		sawConn.Store(r.Header.Get("X-Hop"))
		fmt.Fprintf(w, "hello %s", r.URL.Path)
	}))
	defer up.Close()
	req := "GET " + up.URL + "/path HTTP/1.1\r\nHost: ignored\r\nProxy-Authorization: " + basic("k1") +
		"\r\nConnection: X-Hop\r\nX-Hop: secret\r\n\r\n"
	c, err := net.Dial("tcp", f.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(c, req)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || string(body) != "hello /path" {
		t.Fatalf("got %d %q", resp.StatusCode, body)
	}
	if sawAuth.Load() != "" || sawConn.Load() != "" {
		t.Fatalf("hop-by-hop headers reached the upstream: auth=%q hop=%q", sawAuth.Load(), sawConn.Load())
	}
}

// tlsUpstream serves TLS for "localhost" and counts connections.
func tlsUpstream(t *testing.T) (port uint16, accepted *atomic.Int64) {
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "tls ok")
	}))
	accepted = new(atomic.Int64)
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			accepted.Add(1)
		}
	}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	p, _ := strconv.Atoi(srv.URL[strings.LastIndex(srv.URL, ":")+1:])
	return uint16(p), accepted
}

func TestSNIMustMatchConnectHost(t *testing.T) {
	port, accepted := tlsUpstream(t)
	f := start(t, loopPolicy, port)
	target := net.JoinHostPort("localhost", strconv.Itoa(int(port)))

	handshake := func(sni string) error {
		code, br, c := rawRequest(t, f.addr, connectReq(target, basic("k1")))
		if code != 200 {
			return fmt.Errorf("CONNECT = %d", code)
		}
		tc := tls.Client(&bufConn{Conn: c, r: br}, &tls.Config{ServerName: sni, InsecureSkipVerify: true})
		tc.SetDeadline(time.Now().Add(5 * time.Second))
		return tc.Handshake()
	}
	if err := handshake("evil.test"); err == nil {
		t.Fatal("TLS handshake with a mismatched SNI succeeded")
	}
	if n := accepted.Load(); n != 0 {
		t.Fatalf("upstream saw %d connections for a mismatched SNI", n)
	}
	if n := testutil.ToFloat64(f.metrics.Requests.WithLabelValues("loop", "localhost", "sni_mismatch")); n != 1 {
		t.Fatalf("sni_mismatch = %v", n)
	}
	if err := handshake("localhost"); err != nil {
		t.Fatalf("matching SNI: %v", err)
	}
	if accepted.Load() != 1 {
		t.Fatalf("upstream connections = %d, want 1", accepted.Load())
	}
}

type bufConn struct {
	net.Conn
	r *bufio.Reader
}

func (b *bufConn) Read(p []byte) (int, error) { return b.r.Read(p) }

func TestParseTarget(t *testing.T) {
	for _, tc := range []struct{ host, port, want string }{
		{"API.Example.com.", "443", "api.example.com:443"},
		{"[2001:db8::1]", "443", "[2001:db8::1]:443"},
		{"[::ffff:10.0.0.1]", "80", "10.0.0.1:80"},
		{"10.0.0.1", "5432", "10.0.0.1:5432"},
	} {
		got, err := parseTarget(tc.host, tc.port)
		if err != nil || got.String() != tc.want {
			t.Errorf("parseTarget(%q,%q) = %q, %v; want %q", tc.host, tc.port, got, err, tc.want)
		}
	}
	// foo.123 has a numeric last label: an IPv4-like literal, which the policy never matches
	// as a name either (one definition of a host name, pkg/hostname).
	for _, bad := range [][2]string{{"a..b", "1"}, {"x", "0"}, {"x", "65536"}, {"[a.com]", "1"}, {"fe80::1%eth0", "1"}, {"bü.com", "1"}, {"", "1"}, {"foo.123", "1"}, {"1.2.3.999", "1"}} {
		if _, err := parseTarget(bad[0], bad[1]); err == nil {
			t.Errorf("parseTarget(%q,%q) accepted", bad[0], bad[1])
		}
	}
	if _, err := parseTarget(strings.Repeat("a", 64)+".com", "1"); err == nil {
		t.Error("64-byte label accepted")
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for i := 0; i < 200; i++ {
		if cond() {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatal("condition not met within 4s")
}
