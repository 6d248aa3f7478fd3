// Package resolver is the proxy's DNS client: it asks the servers of resolv.conf (or one
// configured server) for A and AAAA records, in parallel, and caches the answers for as long
// as their TTLs say, within bounds.
//
// Go's net.Resolver does not expose TTLs, so this package speaks DNS itself (UDP, TCP when the
// answer is truncated). It only resolves: it returns raw answers and never judges them. The
// caller (pkg/decision) classifies every address it gets, cached or not, on every connection,
// so a cached answer is vetted exactly like a fresh one.
//
// Names follow pkg/dialer.Lookup's rule: a name with a trailing dot is asked as that absolute
// name only; a name without one goes through the hosts file (single-label names only) and the
// search list, as the C library does.
package resolver

import (
	"container/list"
	"context"
	"errors"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// Cache bounds. They are constants rather than settings: they are safety margins, not
// tuning knobs.
const (
	// MinTTL is the least time an answer is kept. Records with TTL 0 or 1 (common behind
	// load balancers) would otherwise cost a query per connection; five seconds still
	// follows a failover within the time a client takes to retry.
	MinTTL = 5 * time.Second
	// MaxTTL is the most time an answer is kept, whatever its TTL: a changed record (or a
	// policy-relevant move to another address) is seen within five minutes.
	MaxTTL = 300 * time.Second
	// NegativeTTL is how long "no such name" and "no address of this type" are kept: long
	// enough that a client retrying a missing name in a loop does not turn into a query
	// flood, short enough that a name created a moment later is found quickly.
	NegativeTTL = 5 * time.Second
	// FailureTTL is how long a failed query (SERVFAIL, REFUSED, no answer within the
	// timeouts) is kept, the least RFC 9520 allows. Without it a server that fails AAAA
	// while answering A costs one query on every connection, and a failing server gets a
	// query storm from every client's retries; one second is short enough that a recovered
	// server is used again at once.
	FailureTTL = time.Second
	// MaxEntries bounds the cache (one entry per name and record type); the least recently
	// used entry goes first. An entry holds at most MaxAddrs addresses (24 bytes each) and a
	// name of at most 254 bytes: under 1.5 KiB with the map and list overhead, so about
	// 15 MiB at most.
	MaxEntries = 10000
)

// Config configures a Resolver. The zero value reads /etc/resolv.conf and /etc/hosts.
type Config struct {
	Server     string // host:port asked instead of resolv.conf's nameservers; "" for those
	ResolvConf string // default /etc/resolv.conf
	Hosts      string // default /etc/hosts

	// Zero means the package constant.
	MinTTL, MaxTTL, NegativeTTL, FailureTTL time.Duration
	MaxEntries                              int
}

// Resolver resolves names with a cache. It is safe for concurrent use; one per process.
type Resolver struct {
	conf                                    conf
	hosts                                   *hostsFile
	minTTL, maxTTL, negativeTTL, failureTTL time.Duration
	maxEntries                              int
	now                                     func() time.Time

	mu       sync.Mutex
	entries  map[key]*list.Element // of *entry
	lru      *list.List            // front: most recently used
	inflight map[key]*flight

	hits, misses atomic.Uint64
}

type key struct {
	name string // absolute, lower case
	typ  dnsmessage.Type
}

type entry struct {
	key     key
	addrs   []netip.Addr // nil: negative, or a failure
	nx      bool
	err     error // the failure, kept for FailureTTL
	expires time.Time
}

// flight is one query in progress; lookups of the same name and type wait for it.
type flight struct {
	done chan struct{}
	res  result
}

type result struct {
	addrs []netip.Addr
	nx    bool
	err   error
}

// New returns a resolver. A missing resolv.conf gives the C library's defaults.
func New(cfg Config) *Resolver {
	if cfg.ResolvConf == "" {
		cfg.ResolvConf = "/etc/resolv.conf"
	}
	if cfg.Hosts == "" {
		cfg.Hosts = "/etc/hosts"
	}
	r := &Resolver{
		conf:        readConf(cfg.ResolvConf),
		hosts:       &hostsFile{path: cfg.Hosts},
		minTTL:      or(cfg.MinTTL, MinTTL),
		maxTTL:      or(cfg.MaxTTL, MaxTTL),
		negativeTTL: or(cfg.NegativeTTL, NegativeTTL),
		failureTTL:  or(cfg.FailureTTL, FailureTTL),
		maxEntries:  or(cfg.MaxEntries, MaxEntries),
		now:         time.Now,
		entries:     map[key]*list.Element{},
		lru:         list.New(),
		inflight:    map[key]*flight{},
	}
	if cfg.Server != "" {
		r.conf.servers = []string{cfg.Server}
	}
	return r
}

func or[T comparable](v, def T) T {
	var zero T
	if v == zero {
		return def
	}
	return v
}

// Stats returns how many lookups of one name and type the cache answered (hits, including
// waiting for a query already in flight) and how many sent a query (misses).
func (r *Resolver) Stats() (hits, misses uint64) { return r.hits.Load(), r.misses.Load() }

// LookupNetIP resolves host to its addresses, for network "ip" both families in RFC 6724
// precedence order (global IPv6, IPv4, then ULA; see sortByPrecedence), for "ip6" or "ip4"
// one family. A name that does not exist, or has no address, is a
// *net.DNSError with IsNotFound. It satisfies pkg/dialer.Resolver.
func (r *Resolver) LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error) {
	if a, err := netip.ParseAddr(host); err == nil {
		return []netip.Addr{a}, nil
	}
	var types []dnsmessage.Type
	switch network {
	case "ip":
		types = []dnsmessage.Type{dnsmessage.TypeAAAA, dnsmessage.TypeA}
	case "ip6":
		types = []dnsmessage.Type{dnsmessage.TypeAAAA}
	case "ip4":
		types = []dnsmessage.Type{dnsmessage.TypeA}
	default:
		return nil, &net.DNSError{Err: "unknown network " + network, Name: host}
	}
	name := strings.ToLower(host)
	if name == "" || name == "." || len(name) > 254 {
		return nil, &net.DNSError{Err: "invalid name", Name: host, IsNotFound: true}
	}
	if !strings.Contains(strings.TrimSuffix(name, "."), ".") && !strings.HasSuffix(name, ".") {
		if addrs := filter(r.hosts.lookup(name, r.now()), network); len(addrs) > 0 {
			return addrs, nil
		}
	}
	var lastErr error
	var names [8]string // room for a pod's search list and the name as given; more grow it
	for _, fqdn := range r.conf.names(name, names[:0]) {
		res := r.both(ctx, fqdn, types)
		var addrs []netip.Addr
		for _, x := range res[:len(types)] {
			addrs = append(addrs, x.addrs...)
			if x.err != nil {
				lastErr = x.err
			}
		}
		if len(addrs) > 0 {
			sortByPrecedence(addrs)
			return addrs, nil
		}
		if ctx.Err() != nil {
			lastErr = ctx.Err()
			break
		}
	}
	if lastErr != nil {
		de := &net.DNSError{Err: lastErr.Error(), Name: host, IsTemporary: true}
		if errors.Is(lastErr, context.DeadlineExceeded) {
			de.IsTimeout = true
		}
		return nil, de
	}
	return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
}

// ResolutionDelay is how long a lookup of both families waits for the second answer once the
// first brought addresses (RFC 8305, section 3). A server that never answers AAAA (or A) then
// costs this, not its whole timeout, on every connection; the late query goes on and fills
// the cache if it ever answers.
const ResolutionDelay = 50 * time.Millisecond

// both asks fqdn for types (one or two), in parallel; what the cache holds is answered
// without a goroutine.
func (r *Resolver) both(ctx context.Context, fqdn string, types []dnsmessage.Type) [2]result {
	var res [2]result
	type answered struct {
		i   int
		res result
	}
	var ch chan answered // made for the first query that needs a goroutine
	pending, have := 0, false
	for i, t := range types {
		var ok bool
		if res[i], ok = r.cached(key{fqdn, t}); ok {
			have = have || len(res[i].addrs) > 0
			continue
		}
		pending++
		if pending == 1 && i == len(types)-1 && !have {
			// The only query, and nothing to answer with before it: no goroutine.
			res[i] = r.query(ctx, fqdn, t)
			return res
		}
		if ch == nil {
			ch = make(chan answered, len(types)) // buffered: a query left behind never blocks
		}
		go func() { ch <- answered{i, r.query(ctx, fqdn, t)} }()
	}
	var delay <-chan time.Time
	if have && pending > 0 {
		t := time.NewTimer(ResolutionDelay)
		defer t.Stop()
		delay = t.C
	}
	for pending > 0 {
		select {
		case a := <-ch:
			res[a.i] = a.res
			pending--
			if pending > 0 && delay == nil && len(a.res.addrs) > 0 {
				t := time.NewTimer(ResolutionDelay)
				defer t.Stop()
				delay = t.C
			}
		case <-delay:
			return res
		}
	}
	return res
}

// filter returns the addresses of network's family, in a new slice (addrs may be shared).
func filter(addrs []netip.Addr, network string) []netip.Addr {
	var out []netip.Addr
	for _, a := range addrs {
		if network == "ip" || (network == "ip4") == a.Is4() {
			out = append(out, a)
		}
	}
	return out
}

// cached returns the cache's answer for k, if it has one that has not expired.
func (r *Resolver) cached(k key) (result, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.cachedLocked(k)
}

// cachedLocked is cached with r.mu held; an expired entry is dropped.
func (r *Resolver) cachedLocked(k key) (result, bool) {
	el := r.entries[k]
	if el == nil {
		return result{}, false
	}
	e := el.Value.(*entry)
	if !r.now().Before(e.expires) {
		r.lru.Remove(el)
		delete(r.entries, k)
		return result{}, false
	}
	r.lru.MoveToFront(el)
	r.hits.Add(1)
	return result{addrs: e.addrs, nx: e.nx, err: e.err}, true
}

// query answers one name and type: from the cache, from a query already in flight, or by
// sending one. The query runs on its own (bounded by the servers' timeouts, not by ctx), so a
// caller giving up does not fail the others waiting for it.
func (r *Resolver) query(ctx context.Context, name string, typ dnsmessage.Type) result {
	k := key{name, typ}
	r.mu.Lock()
	if res, ok := r.cachedLocked(k); ok {
		r.mu.Unlock()
		return res
	}
	f := r.inflight[k]
	if f != nil {
		r.hits.Add(1)
	} else {
		r.misses.Add(1)
		f = &flight{done: make(chan struct{})}
		r.inflight[k] = f
		go r.fly(k, f)
	}
	r.mu.Unlock()
	select {
	case <-f.done:
		return f.res
	case <-ctx.Done():
		return result{err: ctx.Err()}
	}
}

func (r *Resolver) fly(k key, f *flight) {
	a, err := r.ask(k)
	r.mu.Lock()
	delete(r.inflight, k)
	ttl := min(max(a.ttl, r.minTTL), r.maxTTL)
	switch {
	case err != nil:
		ttl = r.failureTTL
	case len(a.addrs) == 0:
		ttl = r.negativeTTL
	}
	r.store(&entry{key: k, addrs: a.addrs, nx: a.nx, err: err, expires: r.now().Add(ttl)})
	r.mu.Unlock()
	f.res = result{addrs: a.addrs, nx: a.nx, err: err}
	close(f.done)
}

// store adds e, evicting the least recently used entries beyond the bound. r.mu is held.
func (r *Resolver) store(e *entry) {
	r.entries[e.key] = r.lru.PushFront(e)
	for len(r.entries) > r.maxEntries {
		old := r.lru.Back()
		r.lru.Remove(old)
		delete(r.entries, old.Value.(*entry).key)
	}
}

// ask sends the question to the servers in order, for the configured number of rounds,
// until one answers about the name (addresses, no addresses, or NXDOMAIN).
func (r *Resolver) ask(k key) (answer, error) {
	n, err := dnsmessage.NewName(k.name)
	if err != nil {
		return answer{}, err
	}
	q := dnsmessage.Question{Name: n, Type: k.typ, Class: dnsmessage.ClassINET}
	c := &r.conf
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout*time.Duration(c.attempts*len(c.servers)))
	defer cancel()
	var lastErr error
	for range c.attempts {
		for _, s := range c.servers {
			a, err := exchange(ctx, s, q, c.timeout)
			if err == nil {
				return a, nil
			}
			lastErr = err
			if ctx.Err() != nil {
				return answer{}, lastErr
			}
		}
	}
	return answer{}, lastErr
}
