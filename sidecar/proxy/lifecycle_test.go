package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

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

// At the connection cap a captured connection is reset (never an HTTP status written into
// what the app takes for a TLS, SSH or SMTP stream), and it gets its decision and close lines.
func TestTransparentAtTheCapIsResetAndLogged(t *testing.T) {
	f := startWith(t, loopPolicy, func(c *Config) {
		c.Tracker = tunnel.NewTracker(tunnel.Config{MaxConns: 1})
		c.Identity = "loop"
	})
	// One silent explicit client holds the only slot.
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
	expect(t, f.logs.one(t, mark, "decision"), "listener", "transparent", "action", "denied", "reason", "tunnel_limit", "status", "denied")
	expect(t, f.logs.one(t, mark, "close"), "listener", "transparent", "reason", "refused", "decision_reason", "tunnel_limit")
	if n := testutil.ToFloat64(f.metrics.TunnelsRejected); n != 1 {
		t.Fatalf("tunnel_limit_rejections_total = %v", n)
	}

	// The explicit listener answers 503 at the cap, with the same lines.
	mark = f.logs.mark()
	if code, _, _ := rawRequest(t, f.addr, connectReq("127.0.0.1:1", "")); code != http.StatusServiceUnavailable {
		t.Fatalf("explicit at the cap = %d, want 503", code)
	}
	expect(t, f.logs.one(t, mark, "decision"), "listener", "explicit", "action", "denied", "reason", "tunnel_limit")
	expect(t, f.logs.one(t, mark, "close"), "listener", "explicit", "reason", "refused")
}
