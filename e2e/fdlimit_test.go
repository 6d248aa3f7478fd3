package e2e

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/egress-guard/egress-guard/internal/netlab"
	"github.com/egress-guard/egress-guard/pkg/contract"
)

// The proxy's ports inside a namespace of its own (see ownNS): nothing else listens there.
const (
	nsProxyAddr   = "127.0.0.1:4750"
	nsMetricsAddr = "127.0.0.1:9090"
)

// loopbackPolicy lets the identity "soak" (API key "soak") reach loopback, where the tests'
// echo servers listen: loopback is internal, so the rule must name it.
func loopbackPolicy(extra string) string {
	return "identities:\n  soak:\n    api_keys: [\"soak\"]\n    allowed_destinations: [\"127.0.0.0/8\"" + extra + "]\n"
}

// ownNS creates a network namespace with only loopback in it, removed at the end of the test:
// the proxy's fixed ports and tens of thousands of loopback connections there collide with
// nothing else on the machine.
func ownNS(t testing.TB, prefix string) *netlab.NS {
	t.Helper()
	require(t, "prlimit")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ns, err := netlab.NewNS(ctx, fmt.Sprintf("%s%d", prefix, os.Getpid()%100000))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ns.Delete)
	return ns
}

// startLimited runs the gateway in ns under prlimit --nofile=nofile:nofile (exec all the way
// down, so the process keeps one PID) with the policy file path and extra environment, and
// waits until it is ready.
func startLimited(t testing.TB, ns *netlab.NS, nofile int, policyPath string, env ...string) *netlab.Process {
	t.Helper()
	bin := binary(t, "./cmd/egress-guard")
	wrapper := filepath.Join(t.TempDir(), "egress-guard-limited")
	script := fmt.Sprintf("#!/bin/sh\nexec prlimit --nofile=%d:%d -- %s\n", nofile, nofile, bin)
	if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	env = append([]string{
		"PROXY_PORT=4750", "METRICS_PORT=9090", "LISTEN_ADDR=127.0.0.1", "CONFIGMAP_PATH=" + policyPath,
		"LOG_LEVEL=INFO", "DIAL_TIMEOUT=5s",
	}, env...)
	p, err := netlab.Start(ns, wrapper, env, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.Stop(30 * time.Second)
		if t.Failed() {
			t.Logf("proxy log tail:\n%s", p.Tail(30))
		}
	})
	if err := netlab.WaitReady(context.Background(), ns, "http://"+nsMetricsAddr+"/ready", p, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/limits", p.PID())); !strings.Contains(string(b), fmt.Sprintf("Max open files            %-20d %-20d", nofile, nofile)) {
		t.Fatalf("the proxy (pid %d) does not run with nofile %d:\n%s", p.PID(), nofile, b)
	}
	return p
}

// echoListener serves an echo server on 127.0.0.1 in ns until the test ends. It reads and
// writes with a small buffer of its own: io.Copy between two TCP sockets would splice through
// a pipe, two more descriptors per connection.
func echoListener(t testing.TB, ns *netlab.NS) string {
	t.Helper()
	ln, err := ns.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 256)
				for {
					n, err := c.Read(buf)
					if n > 0 {
						if _, werr := c.Write(buf[:n]); werr != nil {
							return
						}
					}
					if err != nil {
						return
					}
				}
			}()
		}
	}()
	return ln.Addr().String()
}

// connectThrough opens a CONNECT tunnel to target through the proxy in ns as identity soak.
func connectThrough(ns *netlab.NS, target string, timeout time.Duration) (net.Conn, *bufio.Reader, error) {
	c, err := ns.Dial("tcp", nsProxyAddr, timeout)
	if err != nil {
		return nil, nil, err
	}
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\nProxy-Authorization: Basic %s\r\n\r\n", target, target, basicAuth("soak")); err != nil {
		c.Close()
		return nil, nil, err
	}
	br := bufio.NewReaderSize(c, 256)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		c.Close()
		return nil, nil, fmt.Errorf("CONNECT %s: %w", target, err)
	}
	if resp.StatusCode != http.StatusOK {
		c.Close()
		return nil, nil, fmt.Errorf("CONNECT %s: %s", target, resp.Status)
	}
	return c, br, nil
}

// TestFDExhaustion: the real binary with 64 descriptors. Silent connections take them all;
// the accept loop then fails with EMFILE, backs off and logs it once (not per attempt), while
// /health and /ready still answer (the admin listener's reserve). Once the connections close,
// a new one is served, and the recovery is logged once, with the count of failed accepts.
func TestFDExhaustion(t *testing.T) {
	ns := ownNS(t, "egfd")
	echo := echoListener(t, ns)
	policy := filepath.Join(t.TempDir(), "policy.yaml")
	os.WriteFile(policy, []byte(loopbackPolicy("")), 0o644)
	// Silent connections must stay (HEADER_TIMEOUT) and all be taken from one address
	// (MAX_PENDING_PER_CLIENT); the watcher must not need a descriptor during the test
	// (WATCH_INTERVAL): this test is about the accept loop.
	p := startLimited(t, ns, 64, policy, "HEADER_TIMEOUT=2m", "MAX_PENDING_PER_CLIENT=1000", "WATCH_INTERVAL=120")
	lg := from(p)

	const failing, recovered = "accept failing; backing off", "accepting again"
	// The kernel completes the handshakes into the listen backlog whether or not the proxy can
	// accept them: dial until the proxy says it is out of descriptors.
	var held []net.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	for len(p.RecordsAfter(lg.mark, failing)) == 0 {
		if len(held) >= 200 {
			t.Fatalf("200 connections held and no %q line:\n%s", failing, p.Tail(10))
		}
		for range 10 {
			c, err := ns.Dial("tcp", nsProxyAddr, 3*time.Second)
			if err != nil {
				t.Fatalf("dial %d: %v", len(held)+1, err)
			}
			held = append(held, c)
		}
		time.Sleep(100 * time.Millisecond)
	}
	// Stay exhausted long enough for several failed accepts (the backoff is 5ms doubling to
	// 1s: about ten within 3s): still one line.
	time.Sleep(3 * time.Second)
	ex := p.RecordsAfter(lg.mark, failing)
	if len(ex) != 1 {
		t.Fatalf("%d %q lines while exhausted, want 1: %v", len(ex), failing, ex)
	}
	if ex[0]["level"] != "WARN" || ex[0]["fd_exhausted"] != true || ex[0]["listener"] != "explicit" ||
		!strings.Contains(fmt.Sprint(ex[0]["err"]), "too many open files") {
		t.Fatalf("exhaustion line: %v", ex[0])
	}
	if r := p.RecordsAfter(lg.mark, recovered); len(r) != 0 {
		t.Fatalf("%q while still exhausted: %v", recovered, r)
	}
	t.Logf("exhausted with %d connections held: %s", len(held), mustJSONLine(p, lg.mark, failing))

	// The admin endpoints still answer, on the admin listener's reserved descriptors: else the
	// kubelet's liveness probe fails and the restart cuts every tunnel. A kept-alive
	// connection (a scraper's) holds one for 2s, longer than the proxy's accept backoff (1s):
	// meanwhile net/http's next Accept must not free a reserve descriptor before a connection
	// is queued, or the proxy's accept loop would take it. Then three rounds of probes, six
	// connections, more than the reserve (4): each one's descriptor is taken back when it
	// closes. None goes to the proxy's accept loop: it is still failing, in the same episode.
	keep, err := ns.Dial("tcp", nsMetricsAddr, 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer keep.Close()
	keepR := bufio.NewReader(keep)
	getKept := func(what string) {
		t.Helper()
		keep.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(keep, "GET /health HTTP/1.1\r\nHost: admin\r\n\r\n")
		resp, err := http.ReadResponse(keepR, nil)
		if err != nil {
			t.Fatalf("%s: kept-alive GET /health while out of descriptors: %v", what, err)
		}
		body, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusOK || string(body) != "ok\n" || resp.Close {
			t.Fatalf("%s: kept-alive GET /health: %s %q (close %v)", what, resp.Status, body, resp.Close)
		}
	}
	getKept("first")
	time.Sleep(2 * time.Second)
	for round := range 3 {
		for _, probe := range []struct{ path, body string }{{"/health", "ok"}, {"/ready", "ready"}} {
			code, body, err := netlab.HTTPGet(context.Background(), ns, "http://"+nsMetricsAddr+probe.path)
			if code != http.StatusOK || strings.TrimSpace(body) != probe.body {
				t.Fatalf("round %d: GET %s while out of descriptors: %d %q %v; want 200 %q", round, probe.path, code, body, err, probe.body)
			}
		}
	}
	getKept("second")
	keep.Close()
	t.Logf("while exhausted: /health and /ready answered 200, 3 times each, and twice on a kept-alive connection")
	if r := p.RecordsAfter(lg.mark, recovered); len(r) != 0 {
		t.Fatalf("%q after the admin probes, while still exhausted: %v", recovered, r)
	}
	if r := p.RecordsAfter(lg.mark, failing); len(r) != 1 {
		t.Fatalf("%d %q lines after the admin probes, want 1: %v", len(r), failing, r)
	}

	// The recovery line is written once an accept succeeds again: that can be one of the
	// connections still queued when the held ones close, before the new one below.
	freed := from(p)
	for _, c := range held {
		c.Close()
	}
	held = nil
	// A new connection is served: CONNECT, echo, close.
	lc := from(p)
	c, br, err := connectThrough(ns, echo, 10*time.Second)
	if err != nil {
		t.Fatalf("after the descriptors were freed: %v", err)
	}
	io.WriteString(c, "ping")
	b := make([]byte, 4)
	if _, err := io.ReadFull(br, b); err != nil || string(b) != "ping" {
		t.Fatalf("echo after recovery: %q %v", b, err)
	}
	c.Close()
	d := lc.decision(t, "method", "CONNECT", "identity", "soak", "target", echo, "action", "allowed", "reason", "rule")
	lc.closeOf(t, d, "reason", "closed")

	rec := freed.wait(t, recovered)
	time.Sleep(500 * time.Millisecond)
	if r := p.RecordsAfter(lg.mark, recovered); len(r) != 1 {
		t.Fatalf("%d %q lines, want 1: %v", len(r), recovered, r)
	}
	if r := p.RecordsAfter(lg.mark, failing); len(r) != 1 {
		t.Fatalf("%d %q lines after recovery, want 1: %v", len(r), failing, r)
	}
	if n, _ := rec["failed_accepts"].(float64); n < 2 || rec["level"] != "INFO" || rec["listener"] != "explicit" {
		t.Fatalf("recovery line: %v", rec)
	}
	t.Logf("recovered: %s", mustJSONLine(p, freed.mark, recovered))
	if code, body, err := netlab.HTTPGet(context.Background(), ns, "http://"+nsMetricsAddr+"/health"); code != http.StatusOK {
		t.Fatalf("GET /health after recovery: %d %q %v", code, body, err)
	}
}

// mustJSONLine returns the raw log line after mark whose msg is msg.
func mustJSONLine(p *netlab.Process, mark int, msg string) string {
	for _, l := range p.LinesAfter(mark) {
		if strings.Contains(l, `"msg":"`+msg+`"`) {
			return l
		}
	}
	return ""
}

// TestControlPlaneOutOfDescriptors: the real control plane with 96 descriptors, against a real
// API server. Connections to its policy port take them all (every sidecar holds one there):
// it must keep running, say so once, answer /health and /ready meanwhile (the kubelet's
// probes), and serve a sidecar's policy request once the connections close.
func TestControlPlaneOutOfDescriptors(t *testing.T) {
	require(t, "prlimit")
	e := startK8s(t)
	ca, err := netlab.NewCA()
	if err != nil {
		t.Fatal(err)
	}
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(caFile, ca.PEM, 0o644); err != nil {
		t.Fatal(err)
	}
	cp := newControlPlane(t, e, ca, caFile, "127.0.0.1")
	cp.nofile = 96
	cp.start(t)
	p := cp.proc
	lg := from(p)
	mark := lg.mark

	const failing, recovered = "accept failing; backing off", "accepting again"
	var held []net.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	for len(p.RecordsAfter(mark, failing)) == 0 {
		if p.Exited() {
			t.Fatalf("the control plane exited with %d connections held:\n%s", len(held), p.Tail(10))
		}
		if len(held) >= 300 {
			t.Fatalf("300 connections held and no %q line:\n%s", failing, p.Tail(10))
		}
		for range 10 {
			c, err := net.DialTimeout("tcp", cp.addr, 3*time.Second)
			if err != nil {
				time.Sleep(100 * time.Millisecond)
				if p.Exited() {
					t.Fatalf("the control plane exited with %d connections held (dial: %v):\n%s", len(held), err, p.Tail(10))
				}
				t.Fatalf("dial %d: %v", len(held)+1, err)
			}
			held = append(held, c)
		}
		time.Sleep(100 * time.Millisecond)
	}
	// Out of descriptors for a while (the backoff grows to 1 s): still running, one line.
	time.Sleep(2 * time.Second)
	if p.Exited() {
		t.Fatalf("the control plane exited while out of descriptors:\n%s", p.Tail(10))
	}
	if r := p.RecordsAfter(mark, failing); len(r) != 1 || r[0]["listener"] != "policy" || r[0]["fd_exhausted"] != true {
		t.Fatalf("%q lines while exhausted: %v, want 1 for the policy listener with fd_exhausted", failing, r)
	}
	admin := fmt.Sprintf("http://127.0.0.1:%d", cp.metrics)
	client := &http.Client{Timeout: 5 * time.Second}
	for _, path := range []string{"/health", "/ready"} {
		resp, err := client.Get(admin + path)
		if err != nil {
			t.Fatalf("GET %s while out of descriptors: %v", path, err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("GET %s while out of descriptors: %s", path, resp.Status)
		}
	}
	t.Logf("exhausted with %d connections held; /health and /ready answered", len(held))

	freed := from(p)
	for _, c := range held {
		c.Close()
	}
	held = nil
	// A sidecar's policy request is served again.
	deadline := time.Now().Add(10 * time.Second)
	for {
		code, body, hdr := cp.ask(t, e.token(t, "shop", "frontend", contract.TokenAudience, "app"))
		if code == http.StatusOK && hdr.Get(contract.IdentityHeader) == "shop" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("policy request after recovery: %d %s", code, body)
		}
		time.Sleep(200 * time.Millisecond)
	}
	rec := freed.wait(t, recovered, "listener", "policy")
	if n, _ := rec["failed_accepts"].(float64); n < 2 {
		t.Fatalf("recovery line: %v", rec)
	}
}
