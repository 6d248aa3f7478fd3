package tunnel

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/egress-guard/egress-guard/pkg/outcome"
)

// pair returns the two ends of a loopback TCP connection.
func pair(t *testing.T) (a, b *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ch := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		ch <- c
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s := <-ch
	if s == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

// setup builds app <-> [client | proxy | upstream] <-> server and returns the app's and the
// server's ends plus the tracked connection.
func setup(t *testing.T, tr *Tracker) (app, server *net.TCPConn, c *Conn) {
	app, proxyClient := pair(t)
	proxyUp, server := pair(t)
	c, err := tr.Add(proxyClient)
	if err != nil {
		t.Fatal(err)
	}
	if !c.SetUpstream(proxyUp) {
		t.Fatal("SetUpstream refused")
	}
	return app, server, c
}

type relayResult struct {
	up, down int64
	reason   outcome.CloseReason
}

// relay starts c's relay; its result arrives on the channel once it ended (and c is done).
func relay(c *Conn, prefix []byte) chan relayResult {
	ch := make(chan relayResult, 1)
	c.Start(prefix, func(up, down int64, reason outcome.CloseReason) {
		c.Done()
		ch <- relayResult{up, down, reason}
	})
	return ch
}

func wait(t *testing.T, ch chan relayResult) relayResult {
	t.Helper()
	select {
	case r := <-ch:
		return r
	case <-time.After(10 * time.Second):
		t.Fatal("relay did not end")
		return relayResult{}
	}
}

func TestRelayHalfCloseAndCounts(t *testing.T) {
	// Both ways of copying: the first bytes through user space, then splice (the default), and
	// splice from the first byte.
	for _, plain := range []int64{plainFirst, 0} {
		t.Run(fmt.Sprintf("plainFirst=%d", plain), func(t *testing.T) {
			defer func(old int64) { plainFirst = old }(plainFirst)
			plainFirst = plain
			testRelayHalfCloseAndCounts(t)
		})
	}
}

func testRelayHalfCloseAndCounts(t *testing.T) {
	tr := NewTracker(Config{})
	app, server, c := setup(t, tr)
	done := relay(c, []byte("pre"))

	if _, err := app.Write([]byte("request")); err != nil {
		t.Fatal(err)
	}
	// The app closes its sending side; the server must see EOF after the bytes, and must still
	// be able to answer (half-close, not close).
	app.CloseWrite()
	got, err := io.ReadAll(server)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != "prerequest" {
		t.Fatalf("server read %q, want %q", got, "prerequest")
	}
	resp := bytes.Repeat([]byte("x"), 1<<20)
	if _, err := server.Write(resp); err != nil {
		t.Fatal(err)
	}
	server.CloseWrite()
	back, err := io.ReadAll(app)
	if err != nil {
		t.Fatal(err)
	}
	if len(back) != len(resp) {
		t.Fatalf("app read %d bytes, want %d", len(back), len(resp))
	}
	r := wait(t, done)
	if r.up != int64(len("prerequest")) || r.down != int64(len(resp)) || r.reason != outcome.Closed {
		t.Fatalf("relay = %+v, want up=10 down=%d reason=closed", r, len(resp))
	}
	if tr.Len() != 0 {
		t.Fatalf("tracker still holds %d connections", tr.Len())
	}
}

func TestRelayResetClosesBothSides(t *testing.T) {
	tr := NewTracker(Config{})
	app, server, c := setup(t, tr)
	done := relay(c, nil)
	server.SetLinger(0)
	server.Close() // RST towards the proxy
	app.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadAll(app); err != nil && errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatal(err)
	}
	r := wait(t, done)
	if r.reason != outcome.Reset {
		t.Fatalf("reason = %s, want reset", r.reason)
	}
	// The app's side was closed too, not left open.
	if _, err := app.Write([]byte("x")); err == nil {
		app.SetReadDeadline(time.Now().Add(2 * time.Second))
		if n, err := app.Read(make([]byte, 1)); err == nil {
			t.Fatalf("app side still open after the upstream reset (read %d bytes)", n)
		}
	}
}

func TestIdleTimeoutClosesSilentTunnel(t *testing.T) {
	// The idle timeout is long against the 100 ms between bytes so that a loaded CI machine
	// (race detector, packages tested in parallel) does not starve the traffic into idleness.
	tr := NewTracker(Config{IdleTimeout: time.Second, Tick: 50 * time.Millisecond})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go tr.Run(ctx)
	app, server, c := setup(t, tr)
	done := relay(c, nil)

	// Traffic keeps it alive past the idle timeout...
	buf := make([]byte, 1)
	for i := 0; i < 15; i++ {
		app.Write([]byte("a"))
		if _, err := io.ReadFull(server, buf); err != nil {
			t.Fatalf("tunnel closed while active (round %d): %v", i, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	// ...silence closes it.
	r := wait(t, done)
	if r.reason != outcome.IdleTimeout {
		t.Fatalf("reason = %s, want %s", r.reason, outcome.IdleTimeout)
	}
	if r.up != 15 {
		t.Fatalf("up = %d, want 15", r.up)
	}
}

// Only admitted (decided) connections count toward MaxConns: undecided ones have their own
// budgets, in all and per client, so silent clients cannot take the cap from decided ones.
func TestLimits(t *testing.T) {
	tr := NewTracker(Config{MaxConns: 1, MaxPending: 3, MaxPendingPerClient: 2, MaxPerIdentity: 1})
	conns := make([]*net.TCPConn, 4)
	for i := range conns {
		conns[i], _ = pair(t)
	}
	a, err := tr.Add(conns[0])
	if err != nil {
		t.Fatal(err)
	}
	b, err := tr.Add(conns[1])
	if err != nil {
		t.Fatal(err)
	}
	// All from 127.0.0.1: the per-client budget of 2 is spent.
	if _, err := tr.Add(conns[2]); !errors.Is(err, ErrClientLimit) {
		t.Fatalf("third pending from one client: %v, want ErrClientLimit", err)
	}
	if err := a.Admit("x"); err != nil {
		t.Fatal(err)
	}
	// a no longer counts as pending.
	c, err := tr.Add(conns[2])
	if err != nil {
		t.Fatalf("pending after an admit: %v", err)
	}
	if err := b.Admit("y"); !errors.Is(err, ErrLimit) {
		t.Fatalf("second admit at MaxConns 1: %v, want ErrLimit", err)
	}
	a.Done()
	if err := b.Admit("x"); err != nil {
		t.Fatalf("admit after Done: %v", err)
	}
	if err := b.Admit("x"); err != nil {
		t.Fatalf("admitting twice: %v", err)
	}
	tr.cfg.MaxConns = 0
	if err := c.Admit("x"); !errors.Is(err, ErrIdentityLimit) {
		t.Fatalf("second connection of identity x: %v, want ErrIdentityLimit", err)
	}
	if err := c.Admit("z"); err != nil {
		t.Fatal(err)
	}
	b.Done()
	c.Done()
	if tr.pending != 0 || tr.admitted != 0 || len(tr.perClient) != 0 || len(tr.perIdentity) != 0 || tr.Len() != 0 {
		t.Fatalf("counts not back to zero: pending %d admitted %d clients %v identities %v", tr.pending, tr.admitted, tr.perClient, tr.perIdentity)
	}
	tr2 := NewTracker(Config{MaxPending: 1})
	d, _ := tr2.Add(conns[3])
	if _, err := tr2.Add(conns[0]); !errors.Is(err, ErrPendingLimit) {
		t.Fatalf("pending over MaxPending: %v", err)
	}
	d.Done()
}

func TestRevalidateClosesWhatThePolicyNoLongerAllows(t *testing.T) {
	tr := NewTracker(Config{})
	app1, server1, keep := setup(t, tr)
	_, server2, revoke := setup(t, tr)
	keep.SetStillAllowed(func() bool { return true })
	revoke.SetStillAllowed(func() bool { return false })
	r1, r2 := relay(keep, nil), relay(revoke, nil)
	if n := tr.Revalidate(); n != 1 {
		t.Fatalf("Revalidate closed %d, want 1", n)
	}
	if r := wait(t, r2); r.reason != outcome.PolicyRevoked {
		t.Fatalf("revoked tunnel ended with %s, want policy_revoked", r.reason)
	}
	server2.Close()
	select {
	case r := <-r1:
		t.Fatalf("allowed tunnel ended: %+v", r)
	case <-time.After(100 * time.Millisecond):
	}
	server1.Close()
	app1.Close()
	wait(t, r1)
}

func TestDrainWaitsThenCloses(t *testing.T) {
	tr := NewTracker(Config{IdleTimeout: time.Hour, Tick: 20 * time.Millisecond})
	app, server, c := setup(t, tr)
	done := relay(c, nil)

	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	drained := make(chan struct{})
	go func() { tr.Drain(ctx); close(drained) }()

	// While draining, the live tunnel keeps working and new connections are refused.
	time.Sleep(50 * time.Millisecond)
	app.Write([]byte("z"))
	buf := make([]byte, 1)
	server.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := io.ReadFull(server, buf); err != nil {
		t.Fatalf("tunnel broke during drain: %v", err)
	}
	x, _ := pair(t)
	if _, err := tr.Add(x); !errors.Is(err, ErrDraining) {
		t.Fatalf("Add while draining: %v, want ErrDraining", err)
	}
	select {
	case <-drained:
		t.Fatal("Drain returned before its budget with a live tunnel")
	case <-time.After(200 * time.Millisecond):
	}
	r := wait(t, done)
	<-drained
	if r.reason != outcome.Drain {
		t.Fatalf("reason = %s, want drain", r.reason)
	}
}

func TestDrainClosesIdleEarly(t *testing.T) {
	tr := NewTracker(Config{IdleTimeout: time.Hour, DrainIdleTimeout: 200 * time.Millisecond, Tick: 20 * time.Millisecond})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go tr.Run(ctx)
	_, _, c := setup(t, tr)
	done := relay(c, nil)
	dctx, dcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer dcancel()
	start := time.Now()
	tr.Drain(dctx)
	if el := time.Since(start); el > 5*time.Second {
		t.Fatalf("idle tunnel held drain for %v", el)
	}
	if r := wait(t, done); r.reason != outcome.Drain {
		t.Fatalf("reason = %s, want drain", r.reason)
	}
}

// The reaper must not hold the tracker lock while it reads socket counters: at 10,000 tunnels
// that is 10,000 getsockopt calls that accepts and closes would wait for.
func TestReaperProbesOutsideTheLock(t *testing.T) {
	tr := NewTracker(Config{IdleTimeout: time.Hour})
	a, _ := pair(t)
	if _, err := tr.Add(a); err != nil {
		t.Fatal(err)
	}
	probing := make(chan struct{})
	release := make(chan struct{})
	tr.probe = func(*net.TCPConn) (uint64, bool) {
		close(probing)
		<-release
		return 0, true
	}
	reaped := make(chan struct{})
	go func() { tr.reap(time.Now()); close(reaped) }()
	<-probing
	b, _ := pair(t)
	added := make(chan error, 1)
	go func() {
		c, err := tr.Add(b)
		if err == nil {
			c.Done()
		}
		added <- err
	}()
	select {
	case err := <-added:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(2 * time.Second):
		close(release)
		t.Fatal("Add waited for the reaper's socket probe")
	}
	close(release)
	<-reaped
}
