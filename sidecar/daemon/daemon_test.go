package daemon

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/egress-guard/egress-guard/pkg/addrclass"
	"github.com/egress-guard/egress-guard/pkg/metrics"
)

// startAdmin serves the admin endpoints on a real loopback listener built as Run builds it.
func startAdmin(t *testing.T, lim AdminLimits) string {
	t.Helper()
	cfg := Config{Mode: ModeGateway, AdminAddr: "127.0.0.1", Admin: lim} // port 0: any
	ln, err := listenAdmin(cfg)
	if err != nil {
		t.Fatal(err)
	}
	srv := adminServer(cfg, metrics.AdminMux(metrics.New().Registry, func() bool { return true }, func() string { return "" }))
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}

func dialT(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// get sends GET path on c (kept alive) and returns the status and body.
func get(c net.Conn, br *bufio.Reader, path string, within time.Duration) (int, string, error) {
	c.SetDeadline(time.Now().Add(within))
	defer c.SetDeadline(time.Time{})
	if _, err := fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: admin\r\n\r\n", path); err != nil {
		return 0, "", err
	}
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// closedByServer waits for the server to close c (EOF or reset) within d.
func closedByServer(t *testing.T, c net.Conn, d time.Duration) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(d))
	_, err := io.Copy(io.Discard, c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("the server did not close an unused admin connection within %v", d)
	}
}

// The admin listener accepts at most MaxConns connections: connections that send nothing,
// or that went idle after a request, hold a slot only until their timeout closes them, and
// /health then answers the connection that was waiting.
func TestAdminListenerIsBounded(t *testing.T) {
	const n = 3
	lim := AdminLimits{
		ReadHeaderTimeout: 500 * time.Millisecond,
		ReadTimeout:       time.Second,
		WriteTimeout:      time.Second,
		IdleTimeout:       500 * time.Millisecond,
		MaxHeaderBytes:    1 << 10,
		MaxConns:          n,
	}
	for _, tc := range []struct {
		name string
		fill func(t *testing.T, addr string) net.Conn
	}{
		{"silent connections", func(t *testing.T, addr string) net.Conn {
			return dialT(t, addr) // sends nothing: ReadHeaderTimeout closes it
		}},
		{"idle kept-alive connections", func(t *testing.T, addr string) net.Conn {
			c := dialT(t, addr)
			if code, body, err := get(c, bufio.NewReader(c), "/health", 2*time.Second); err != nil || code != 200 || body != "ok\n" {
				t.Fatalf("GET /health: %d %q %v", code, body, err)
			}
			return c // then idle: IdleTimeout closes it
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addr := startAdmin(t, lim)
			var held []net.Conn
			for range n {
				held = append(held, tc.fill(t, addr))
			}
			time.Sleep(50 * time.Millisecond) // let the server accept them all

			// One more: the kernel completes the handshake, but the server does not take it
			// while the cap is held.
			extra := dialT(t, addr)
			br := bufio.NewReader(extra)
			start := time.Now()
			if code, body, err := get(extra, br, "/health", 200*time.Millisecond); err == nil {
				t.Fatalf("connection %d answered (%d %q) while %d connections held the cap", n+1, code, body, n)
			}
			// The held connections are closed by their timeout, and the waiting request is
			// then served (the request was already sent; read its response).
			for _, c := range held {
				closedByServer(t, c, 3*time.Second)
			}
			extra.SetReadDeadline(time.Now().Add(3 * time.Second))
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatalf("/health after the idle connections were closed: %v", err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 || string(body) != "ok\n" {
				t.Fatalf("/health: %d %q", resp.StatusCode, body)
			}
			if waited := time.Since(start); waited > 3*time.Second {
				t.Fatalf("waited %v for a slot", waited)
			}
			// The connection count is back under the cap: a fresh probe answers at once.
			c := dialT(t, addr)
			if code, _, err := get(c, bufio.NewReader(c), "/ready", time.Second); err != nil || code != 200 {
				t.Fatalf("GET /ready: %d %v", code, err)
			}
		})
	}

	t.Run("oversized request head", func(t *testing.T) {
		addr := startAdmin(t, lim)
		c := dialT(t, addr)
		c.SetDeadline(time.Now().Add(2 * time.Second))
		fmt.Fprintf(c, "GET /health HTTP/1.1\r\nHost: admin\r\nX-Pad: %s\r\n\r\n", strings.Repeat("a", 16<<10))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil || resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
			t.Fatalf("oversized head: %v %v", resp, err)
		}
	})
}

func TestAdminLimitsDefaults(t *testing.T) {
	got := AdminLimits{MaxConns: 7}.withDefaults()
	want := DefaultAdminLimits
	want.MaxConns = 7
	if got != want {
		t.Fatalf("withDefaults = %+v, want %+v", got, want)
	}
	d := DefaultAdminLimits
	if d.ReadHeaderTimeout <= 0 || d.ReadTimeout <= 0 || d.WriteTimeout <= 0 || d.IdleTimeout <= 0 || d.MaxHeaderBytes <= 0 || d.MaxConns <= 0 {
		t.Fatalf("an admin bound is unset by default: %+v", d)
	}
}

// The sidecar's explicit listener takes the pod's identity without credentials: it must
// stay on loopback whatever LISTEN_ADDR says.
func TestSidecarRejectsListenAddr(t *testing.T) {
	_, err := FromEnv(env(map[string]string{"MODE": "sidecar", "IDENTITY": "shop", "LISTEN_ADDR": "0.0.0.0"}))
	if err == nil || !strings.Contains(err.Error(), "LISTEN_ADDR") || !strings.Contains(err.Error(), "sidecar") {
		t.Fatalf("LISTEN_ADDR in sidecar mode: %v", err)
	}
	// The admin listener's address is its own setting.
	c, err := FromEnv(env(map[string]string{"MODE": "sidecar", "IDENTITY": "shop", "ADMIN_ADDR": "10.0.0.5"}))
	if err != nil || adminHost(c) != "10.0.0.5" || c.ListenAddr != "" {
		t.Fatalf("ADMIN_ADDR in sidecar mode: %+v %v", c, err)
	}
}

func TestAdminAddrDefaults(t *testing.T) {
	for _, tc := range []struct {
		env  map[string]string
		want string
	}{
		{map[string]string{}, ""},
		{map[string]string{"LISTEN_ADDR": "127.0.0.1"}, "127.0.0.1"},
		{map[string]string{"LISTEN_ADDR": "127.0.0.1", "ADMIN_ADDR": "0.0.0.0"}, "0.0.0.0"},
		{map[string]string{"MODE": "sidecar", "IDENTITY": "shop"}, ""},
		{map[string]string{"MODE": "sidecar", "IDENTITY": "shop", "ADMIN_ADDR": "::"}, "::"},
	} {
		c, err := FromEnv(env(tc.env))
		if err != nil {
			t.Fatal(err)
		}
		if got := adminHost(c); got != tc.want {
			t.Errorf("%v: admin address %q, want %q", tc.env, got, tc.want)
		}
	}
	if _, err := FromEnv(env(map[string]string{"ADMIN_ADDR": "localhost"})); err == nil || !strings.Contains(err.Error(), "ADMIN_ADDR") {
		t.Fatalf("bad ADMIN_ADDR: %v", err)
	}
}

// syncBuffer collects Run's log.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) started() map[string]any {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, line := range strings.Split(s.b.String(), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) == nil && m["msg"] == "egress-guard started" {
			return m
		}
	}
	return nil
}

// runSidecar runs the daemon in sidecar mode on free ports and returns its start line.
func runSidecar(t *testing.T, cfg Config) map[string]any {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var out syncBuffer
	done := make(chan error, 1)
	go func() { done <- Run(ctx, cfg, &out) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Error("Run did not return")
		}
	})
	deadline := time.Now().Add(5 * time.Second)
	for {
		if m := out.started(); m != nil {
			return m
		}
		select {
		case err := <-done:
			t.Fatalf("Run returned early: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("no start line")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func sidecarConfig(t *testing.T) Config {
	t.Helper()
	c, err := FromEnv(env(map[string]string{"MODE": "sidecar", "IDENTITY": "shop", "CONFIGMAP_PATH": t.TempDir() + "/absent.yaml", "DRAIN_TIMEOUT": "1s"}))
	if err != nil {
		t.Fatal(err)
	}
	c.ProxyPort, c.MetricsPort, c.TransparentPort = 0, 0, 0 // any free port
	c.AdminAddr = "127.0.0.1"
	return c
}

func addrsOf(t *testing.T, v any) []netip.AddrPort {
	t.Helper()
	list, _ := v.([]any)
	if len(list) == 0 {
		t.Fatalf("no listener addresses in %v", v)
	}
	var out []netip.AddrPort
	for _, a := range list {
		ap, err := netip.ParseAddrPort(fmt.Sprint(a))
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, ap)
	}
	return out
}

// Even a Config built without FromEnv (which refuses LISTEN_ADDR in sidecar mode) cannot
// move the sidecar's explicit listener off loopback.
func TestSidecarExplicitListenerIsLoopback(t *testing.T) {
	cfg := sidecarConfig(t)
	cfg.ListenAddr = "0.0.0.0"
	start := runSidecar(t, cfg)
	proxyAddrs := addrsOf(t, start["proxy"])
	for _, ap := range proxyAddrs {
		if !ap.Addr().IsLoopback() {
			t.Fatalf("sidecar explicit listener on %v", ap)
		}
	}
	if proxyAddrs[0].Addr() != netip.MustParseAddr("127.0.0.1") {
		t.Fatalf("no IPv4 loopback explicit listener: %v", proxyAddrs)
	}
	// And it is not reachable on another of this host's addresses.
	if other := nonLoopbackAddr(); other.IsValid() {
		c, err := net.DialTimeout("tcp", netip.AddrPortFrom(other, proxyAddrs[0].Port()).String(), time.Second)
		if err == nil {
			c.Close()
			t.Fatalf("explicit listener reachable on %v", other)
		}
	}
}

func nonLoopbackAddr() netip.Addr {
	addrs, _ := ownAddrs()
	for _, a := range addrs {
		if a.Is4() && !a.IsLoopback() {
			return a
		}
	}
	return netip.Addr{}
}

// A Multipath TCP client gets plain TCP from the proxy's listeners: the original destination
// of an MPTCP connection cannot be read, so the transparent listener must not accept MPTCP
// (and the explicit one does not need it).
func TestListenersRefuseMultipathTCP(t *testing.T) {
	b, err := os.ReadFile("/proc/sys/net/mptcp/enabled")
	if err != nil || strings.TrimSpace(string(b)) != "1" {
		t.Skipf("MPTCP is not enabled in this kernel (net.mptcp.enabled: %q %v)", strings.TrimSpace(string(b)), err)
	}
	log := slog.New(slog.DiscardHandler)
	cfg := sidecarConfig(t)
	explicit, err := listenExplicit(listenConfig(), log, cfg)
	if err != nil {
		t.Fatal(err)
	}
	transparent, err := listenTransparent(listenConfig(), log, 0)
	if err != nil {
		t.Fatal(err)
	}
	var d net.Dialer
	d.SetMultipathTCP(true)
	for _, ln := range append(explicit, transparent...) {
		defer ln.Close()
		accepted := make(chan net.Conn, 1)
		go func() {
			c, _ := ln.Accept()
			accepted <- c
		}()
		c, err := d.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatalf("%v: %v", ln.Addr(), err)
		}
		mp, err := c.(*net.TCPConn).MultipathTCP()
		c.Close()
		if err != nil {
			t.Fatal(err)
		}
		if mp {
			t.Errorf("listener %v accepted Multipath TCP", ln.Addr())
		}
		if sc := <-accepted; sc != nil {
			if smp, _ := sc.(*net.TCPConn).MultipathTCP(); smp {
				t.Errorf("listener %v: server side is Multipath TCP", ln.Addr())
			}
			sc.Close()
		}
	}
}

// The proxy's own addresses are refreshed while it runs: an address the host has is Self
// after a refresh even though the classifier started without it.
func TestRefreshOwnAddrs(t *testing.T) {
	own, err := ownAddrs()
	if err != nil {
		t.Fatal(err)
	}
	var addr netip.Addr
	for _, a := range own {
		if !a.IsLoopback() {
			addr = a
			break
		}
	}
	if !addr.IsValid() {
		t.Skip("this machine has no address but loopback")
	}
	c := addrclass.New(nil, nil)
	if class, _ := c.Classify(addr); class == addrclass.Self {
		t.Fatal("Self before any refresh")
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go refreshOwnAddrs(ctx, c, slog.New(slog.DiscardHandler), 10*time.Millisecond)
	deadline := time.Now().Add(5 * time.Second)
	for {
		if class, _ := c.Classify(addr); class == addrclass.Self {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never became Self", addr)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
