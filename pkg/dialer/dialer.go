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

// NewResolver returns the system resolver when server is "", otherwise a pure-Go resolver
// that sends every query to server (host:port).
func NewResolver(server string) *net.Resolver {
	if server == "" {
		return net.DefaultResolver
	}
	return &net.Resolver{
		PreferGo: true,
		Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, server)
		},
	}
}

// Resolver is what Lookup needs of a resolver; *net.Resolver is one.
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
// hosts file are how it resolves at all. (Go's resolver consults the hosts file only for names
// without the trailing dot, so multi-label hosts-file entries are not used.)
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

// attemptFloor is the least time one address gets when several share the timeout.
const attemptFloor = 2 * time.Second

// Dial connects to the first address of addrs that accepts, in order. Each attempt gets an
// equal share of timeout, but at least attemptFloor, and the whole is bounded by timeout and
// ctx. It returns a *net.TCPConn so that relaying between two of them uses splice(2).
func Dial(ctx context.Context, d *net.Dialer, addrs []netip.Addr, port uint16, timeout time.Duration) (*net.TCPConn, netip.AddrPort, error) {
	if len(addrs) == 0 {
		return nil, netip.AddrPort{}, errors.New("dial: no address to dial")
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	per := max(timeout/time.Duration(len(addrs)), attemptFloor)
	var errs []error
	for _, a := range addrs {
		if ctx.Err() != nil {
			errs = append(errs, ctx.Err())
			break
		}
		ap := netip.AddrPortFrom(a, port)
		actx, acancel := context.WithTimeout(ctx, per)
		c, err := d.DialContext(actx, "tcp", ap.String())
		acancel()
		if err == nil {
			return c.(*net.TCPConn), ap, nil
		}
		errs = append(errs, err)
	}
	return nil, netip.AddrPort{}, &dialError{addrs: addrs, port: port, errs: errs}
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
