package dialer

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"testing"
	"time"
)

// fakeResolver answers "known.test." with its A address twice (as a DNS answer may) and its
// AAAA address, and any other name with "no such host": Lookup's own work (the absolute
// name, duplicates removed, not-found mapped to ErrNoSuchHost) needs no DNS server.
type fakeResolver struct{}

func (fakeResolver) LookupNetIP(_ context.Context, _, host string) ([]netip.Addr, error) {
	if host != "known.test." {
		return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
	}
	return []netip.Addr{netip.MustParseAddr("198.18.1.10"), netip.MustParseAddr("198.18.1.10"), netip.MustParseAddr("fd00:18:1::10")}, nil
}

func TestLookup(t *testing.T) {
	ctx := context.Background()
	r := fakeResolver{}
	got, err := Lookup(ctx, r, "known.test")
	if err != nil {
		t.Fatal(err)
	}
	want := map[netip.Addr]bool{netip.MustParseAddr("198.18.1.10"): true, netip.MustParseAddr("fd00:18:1::10"): true}
	if len(got) != 2 || !want[got[0]] || !want[got[1]] {
		t.Fatalf("Lookup = %v, want both addresses once", got)
	}
	if _, err := Lookup(ctx, r, "missing.test"); !errors.Is(err, ErrNoSuchHost) {
		t.Fatalf("missing name: %v, want ErrNoSuchHost", err)
	}
	if got, err := Lookup(ctx, r, "::ffff:10.0.0.1"); err != nil || got[0] != netip.MustParseAddr("10.0.0.1") {
		t.Fatalf("literal: %v %v", got, err)
	}
}

func listen(t *testing.T) (net.Listener, uint16) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
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
			c.Close()
		}
	}()
	return ln, uint16(ln.Addr().(*net.TCPAddr).Port)
}

func TestDialSkipsRefusedAddress(t *testing.T) {
	_, port := listen(t)
	// 127.0.0.2 has no listener on that port: refused, then 127.0.0.1 accepts.
	addrs := []netip.Addr{netip.MustParseAddr("127.0.0.2"), netip.MustParseAddr("127.0.0.1")}
	c, used, err := Dial(context.Background(), &net.Dialer{}, addrs, port, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if used != netip.AddrPortFrom(addrs[1], port) {
		t.Fatalf("used %v", used)
	}
}

func TestDialAllRefused(t *testing.T) {
	ln, port := listen(t)
	ln.Close()
	_, _, err := Dial(context.Background(), &net.Dialer{}, []netip.Addr{netip.MustParseAddr("127.0.0.1")}, port, 5*time.Second)
	if err == nil || IsTimeout(err) {
		t.Fatalf("err = %v, timeout=%v; want a refusal", err, IsTimeout(err))
	}
}

func TestDialTimeout(t *testing.T) {
	_, port := listen(t)
	ctx, cancel := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer cancel()
	_, _, err := Dial(ctx, &net.Dialer{}, []netip.Addr{netip.MustParseAddr("127.0.0.1")}, port, 5*time.Second)
	if err == nil || !IsTimeout(err) {
		t.Fatalf("err = %v, want a timeout", err)
	}
	if _, _, err := Dial(context.Background(), &net.Dialer{}, nil, port, time.Second); err == nil {
		t.Fatal("dial with no addresses succeeded")
	}
}

type recordingResolver struct{ asked []string }

func (r *recordingResolver) LookupNetIP(_ context.Context, _, host string) ([]netip.Addr, error) {
	r.asked = append(r.asked, host)
	return []netip.Addr{netip.MustParseAddr("198.18.1.10")}, nil
}

// A name is asked as an absolute name, so no resolv.conf search domain can answer for it.
func TestLookupAsksTheAbsoluteName(t *testing.T) {
	r := &recordingResolver{}
	for _, h := range []string{"api.example.com", "api.example.com.", "localhost"} {
		if _, err := Lookup(context.Background(), r, h); err != nil {
			t.Fatal(err)
		}
	}
	// A single-label name keeps the search list and the hosts file: it resolves no other way.
	if strings.Join(r.asked, ",") != "api.example.com.,api.example.com.,localhost" {
		t.Fatalf("asked %q, want the absolute name twice, then localhost as given", r.asked)
	}
}

// stackDialer records the stack DialContext ran on, then dials for real.
type stackDialer struct{ stack string }

func (d *stackDialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	buf := make([]byte, 8<<10)
	d.stack = string(buf[:runtime.Stack(buf, false)])
	return (&net.Dialer{}).DialContext(ctx, network, address)
}

// One address has nothing to race: it is dialed on the caller's goroutine, not on one
// started for the attempt (a goroutine start and two scheduler hand-offs per connection).
func TestDialOneAddressOnTheCallersGoroutine(t *testing.T) {
	_, port := listen(t)
	d := &stackDialer{}
	c, used, err := Dial(context.Background(), d, []netip.Addr{netip.MustParseAddr("127.0.0.1")}, port, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if used != netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port) {
		t.Fatalf("used %v", used)
	}
	if !strings.Contains(d.stack, "TestDialOneAddressOnTheCallersGoroutine") {
		t.Fatalf("dialed on another goroutine:\n%s", d.stack)
	}
}
