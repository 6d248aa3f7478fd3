package dialer

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// fakeDialer plays the network: an address is blackholed (the attempt hangs until cancelled),
// refused at once, or connects (to a real listener on 127.0.0.1, so the result is a
// *net.TCPConn). It records every address it was asked to dial, and when.
type fakeDialer struct {
	ok, refused map[netip.Addr]bool // anything else is a blackhole
	target      string              // the real listener

	mu        sync.Mutex
	start     time.Time
	attempts  []netip.Addr
	at        []time.Duration
	cancelled int
}

func newFakeDialer(t *testing.T, ok, refused []string) *fakeDialer {
	t.Helper()
	_, port := listen(t)
	f := &fakeDialer{ok: map[netip.Addr]bool{}, refused: map[netip.Addr]bool{}, target: netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port).String(), start: time.Now()}
	for _, a := range ok {
		f.ok[netip.MustParseAddr(a)] = true
	}
	for _, a := range refused {
		f.refused[netip.MustParseAddr(a)] = true
	}
	return f
}

func (f *fakeDialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	ap := netip.MustParseAddrPort(address)
	f.mu.Lock()
	f.attempts = append(f.attempts, ap.Addr())
	f.at = append(f.at, time.Since(f.start))
	f.mu.Unlock()
	switch {
	case f.ok[ap.Addr()]:
		var d net.Dialer
		return d.DialContext(ctx, network, f.target)
	case f.refused[ap.Addr()]:
		return nil, &net.OpError{Op: "dial", Net: network, Err: syscall.ECONNREFUSED}
	}
	<-ctx.Done()
	f.mu.Lock()
	f.cancelled++
	f.mu.Unlock()
	return nil, &net.OpError{Op: "dial", Net: network, Err: ctx.Err()}
}

func (f *fakeDialer) tried() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]string, len(f.attempts))
	for i, a := range f.attempts {
		out[i] = a.String()
	}
	return out
}

func addrs(s ...string) []netip.Addr {
	out := make([]netip.Addr, len(s))
	for i, a := range s {
		out[i] = netip.MustParseAddr(a)
	}
	return out
}

// IPv6 is blackholed, IPv4 works: the IPv4 attempt starts after the connection attempt delay,
// not after a per-address timeout, and wins; the IPv6 attempt is cancelled.
func TestHappyEyeballsBlackholedIPv6(t *testing.T) {
	f := newFakeDialer(t, []string{"198.18.1.10"}, nil)
	start := time.Now()
	c, used, err := Dial(context.Background(), f, addrs("fd00:18:1::10", "198.18.1.10"), 443, 10*time.Second)
	took := time.Since(start)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if used.Addr().String() != "198.18.1.10" {
		t.Fatalf("used %v", used)
	}
	if took < AttemptDelay || took > AttemptDelay+750*time.Millisecond {
		t.Fatalf("took %v, want about %v", took, AttemptDelay)
	}
	if got := f.tried(); !slices.Equal(got, []string{"fd00:18:1::10", "198.18.1.10"}) {
		t.Fatalf("tried %v", got)
	}
	deadline := time.Now().Add(2 * time.Second)
	for {
		f.mu.Lock()
		n := f.cancelled
		f.mu.Unlock()
		if n == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the losing attempt was not cancelled")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Families alternate, starting with the first address's; only the given addresses are dialed.
func TestHappyEyeballsInterleavesFamilies(t *testing.T) {
	f := newFakeDialer(t, []string{"198.18.1.11"}, nil)
	c, used, err := Dial(context.Background(), f, addrs("fd00::1", "fd00::2", "fd00::3", "198.18.1.10", "198.18.1.11"), 80, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if used.Addr().String() != "198.18.1.11" {
		t.Fatalf("used %v", used)
	}
	if got := f.tried(); !slices.Equal(got, []string{"fd00::1", "198.18.1.10", "fd00::2", "198.18.1.11"}) {
		t.Fatalf("tried %v, want the families interleaved", got)
	}
	f.mu.Lock()
	at := slices.Clone(f.at)
	f.mu.Unlock()
	for i := 1; i < len(at); i++ {
		if gap := at[i] - at[i-1]; gap < AttemptDelay-20*time.Millisecond {
			t.Fatalf("attempt %d started %v after the previous one, want the attempt delay (%v)", i+1, gap, at)
		}
	}
	if got := interleave(addrs("198.18.1.1", "fd00::1", "198.18.1.2")); fmtAddrs(got) != "198.18.1.1 fd00::1 198.18.1.2" {
		t.Fatalf("interleave starting with IPv4: %s", fmtAddrs(got))
	}
}

func fmtAddrs(a []netip.Addr) string {
	s := make([]string, len(a))
	for i := range a {
		s[i] = a[i].String()
	}
	return strings.Join(s, " ")
}

// A failed attempt starts the next one at once, without waiting for the delay.
func TestHappyEyeballsFailureStartsTheNextAtOnce(t *testing.T) {
	f := newFakeDialer(t, []string{"198.18.1.10"}, []string{"fd00::1"})
	start := time.Now()
	c, _, err := Dial(context.Background(), f, addrs("fd00::1", "198.18.1.10"), 80, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if took := time.Since(start); took >= AttemptDelay {
		t.Fatalf("took %v, want less than the attempt delay", took)
	}
}

// Every address blackholed: the dial ends at the timeout, as a timeout (a 504).
func TestHappyEyeballsAllBlackholed(t *testing.T) {
	f := newFakeDialer(t, nil, nil)
	start := time.Now()
	_, _, err := Dial(context.Background(), f, addrs("fd00::1", "198.18.1.10", "198.18.1.11"), 80, 900*time.Millisecond)
	if err == nil || !IsTimeout(err) || !IsDialError(err) {
		t.Fatalf("err = %v, want a dial timeout", err)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Fatalf("took %v", took)
	}
	if got := f.tried(); len(got) != 3 {
		t.Fatalf("tried %v", got)
	}
	var de *dialError
	if !errors.As(err, &de) || len(de.errs) != 3 {
		t.Fatalf("errors: %v", err)
	}
}
