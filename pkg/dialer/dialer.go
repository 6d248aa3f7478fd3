// Package dialer resolves destination names and connects only to addresses the caller vetted.
//
// The split is deliberate: resolution returns addresses, the caller classifies and filters
// them, and Dial takes the filtered list. Nothing here resolves a name at dial time, so the
// address that was checked is the address that is connected to (no second lookup that DNS
// rebinding could answer differently).
package dialer

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"time"
)

// ErrNoSuchHost is wrapped by Lookup when the name does not exist.
var ErrNoSuchHost = errors.New("no such host")

// Resolver is what Lookup needs of a resolver: pkg/resolver's, which the proxy uses, or a
// *net.Resolver.
type Resolver interface {
	LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error)
}

// Lookup resolves host to its IPv4 and IPv6 addresses, unmapped and without duplicates, in
// the resolver's order. An IP literal is returned as is.
//
// A name with a dot is queried as an absolute name (with a trailing dot), so the resolv.conf
// search list is never applied to it: with Kubernetes' ndots:5, "api.example.com" would
// otherwise first be asked as "api.example.com.<namespace>.svc.cluster.local", and whoever
// answers a name under a search domain would decide where an allowed name's connections go.
// A single-label name ("localhost", a Service name) is asked as given: the search list and the
// hosts file are how it resolves at all. (The resolvers — pkg/resolver, which the proxy uses,
// and Go's — consult the hosts file only for names without the trailing dot, so multi-label
// hosts-file entries are not used.)
func Lookup(ctx context.Context, r Resolver, host string) ([]netip.Addr, error) {
	if a, err := netip.ParseAddr(host); err == nil {
		return []netip.Addr{a.Unmap()}, nil
	}
	fqdn := host
	if strings.Contains(strings.TrimSuffix(host, "."), ".") && !strings.HasSuffix(host, ".") {
		fqdn += "."
	}
	addrs, err := r.LookupNetIP(ctx, "ip", fqdn)
	if err != nil {
		var de *net.DNSError
		if errors.As(err, &de) && de.IsNotFound {
			return nil, fmt.Errorf("resolve %s: %w", host, ErrNoSuchHost)
		}
		return nil, fmt.Errorf("resolve %s: %w", host, err)
	}
	out := make([]netip.Addr, 0, len(addrs))
	seen := make(map[netip.Addr]bool, len(addrs))
	for _, a := range addrs {
		a = a.Unmap()
		if !seen[a] {
			seen[a] = true
			out = append(out, a)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("resolve %s: %w", host, ErrNoSuchHost)
	}
	return out, nil
}

// AttemptDelay is RFC 8305's "connection attempt delay": how long one connection attempt
// has to itself before the next address is tried alongside it.
const AttemptDelay = 250 * time.Millisecond

// ContextDialer is what Dial needs of a dialer; *net.Dialer is one.
type ContextDialer interface {
	DialContext(ctx context.Context, network, address string) (net.Conn, error)
}

// Dial connects to one of addrs, racing them as Happy Eyeballs (RFC 8305) does: the addresses
// are tried in the order given but with the families interleaved (the family of addrs[0]
// first, then the other, and so on), each attempt starting AttemptDelay after the previous one
// or at once when every attempt in progress has failed. The first connection wins; the others
// are cancelled (or closed if they connect too). Only addresses of addrs are ever dialed, so a
// caller that vetted them knows where the connection goes. The whole is bounded by timeout and
// ctx. It returns a *net.TCPConn so that relaying between two of them uses splice(2).
func Dial(ctx context.Context, d ContextDialer, addrs []netip.Addr, port uint16, timeout time.Duration) (*net.TCPConn, netip.AddrPort, error) {
	if len(addrs) == 0 {
		return nil, netip.AddrPort{}, errors.New("dial: no address to dial")
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if len(addrs) == 1 {
		// Nothing to race: the calling goroutine dials. The racing path's goroutine, channel
		// and attempt timer would cost a goroutine start and two hand-offs per connection,
		// each a scheduler wake-up, for nothing.
		c, err := attempt(ctx, d, netip.AddrPortFrom(addrs[0], port))
		if err != nil {
			return nil, netip.AddrPort{}, &dialError{addrs: addrs, port: port, errs: []error{err}}
		}
		return c, netip.AddrPortFrom(addrs[0], port), nil
	}
	order := interleave(addrs)

	type result struct {
		c   *net.TCPConn
		ap  netip.AddrPort
		err error
	}
	results := make(chan result, len(order))
	next, pending := 0, 0
	start := func() {
		ap := netip.AddrPortFrom(order[next], port)
		next++
		pending++
		go func() {
			c, err := attempt(ctx, d, ap)
			results <- result{c, ap, err}
		}()
	}
	delay := time.NewTimer(AttemptDelay)
	defer delay.Stop()
	start()
	var errs []error
	for pending > 0 {
		var timer <-chan time.Time
		if next < len(order) {
			timer = delay.C
		}
		select {
		case r := <-results:
			pending--
			if r.err == nil {
				cancel()
				// Late attempts that connected anyway are closed in the background.
				go func(n int) {
					for range n {
						if l := <-results; l.err == nil {
							l.c.Close()
						}
					}
				}(pending)
				return r.c, r.ap, nil
			}
			errs = append(errs, r.err)
			if next < len(order) && ctx.Err() == nil {
				start()
				delay.Reset(AttemptDelay)
			}
		case <-timer:
			start()
			delay.Reset(AttemptDelay)
		}
	}
	return nil, netip.AddrPort{}, &dialError{addrs: addrs, port: port, errs: errs}
}

// attempt is one connection attempt to ap.
func attempt(ctx context.Context, d ContextDialer, ap netip.AddrPort) (*net.TCPConn, error) {
	c, err := d.DialContext(ctx, "tcp", ap.String())
	if err != nil {
		return nil, err
	}
	tc, ok := c.(*net.TCPConn)
	if !ok {
		c.Close()
		return nil, fmt.Errorf("dial %s: not a TCP connection", ap)
	}
	return tc, nil
}

// interleave orders addrs by alternating families, starting with the family of addrs[0] and
// keeping the order within each family (RFC 8305 section 4).
func interleave(addrs []netip.Addr) []netip.Addr {
	var first, second []netip.Addr
	for _, a := range addrs {
		if a.Is4() == addrs[0].Is4() {
			first = append(first, a)
		} else {
			second = append(second, a)
		}
	}
	if len(second) == 0 {
		return addrs
	}
	out := make([]netip.Addr, 0, len(addrs))
	for i := 0; i < len(first) || i < len(second); i++ {
		if i < len(first) {
			out = append(out, first[i])
		}
		if i < len(second) {
			out = append(out, second[i])
		}
	}
	return out
}

type dialError struct {
	addrs []netip.Addr
	port  uint16
	errs  []error
}

func (e *dialError) Error() string {
	parts := make([]string, len(e.errs))
	for i, err := range e.errs {
		parts[i] = err.Error()
	}
	names := make([]string, len(e.addrs))
	for i, a := range e.addrs {
		names[i] = a.String()
	}
	return fmt.Sprintf("dial port %s on [%s]: %s", strconv.Itoa(int(e.port)), strings.Join(names, " "), strings.Join(parts, "; "))
}

func (e *dialError) Unwrap() []error { return e.errs }

// IsDialError reports whether err came from Dial (no address accepted the connection), as
// opposed to a failure after connecting.
func IsDialError(err error) bool {
	var de *dialError
	return errors.As(err, &de)
}

// IsTimeout reports whether every attempt of a Dial error timed out (a 504 rather than a 502).
func IsTimeout(err error) bool {
	var de *dialError
	if !errors.As(err, &de) || len(de.errs) == 0 {
		return false
	}
	for _, e := range de.errs {
		var ne net.Error
		if !(errors.Is(e, context.DeadlineExceeded) || errors.As(e, &ne) && ne.Timeout()) {
			return false
		}
	}
	return true
}
