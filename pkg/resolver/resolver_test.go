package resolver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

var testRecords = map[string]record{
	"dual.test.":    {addrs: []string{"198.18.1.10", "fd00:18:1::10"}, ttl: 60},
	"v4.test.":      {addrs: []string{"198.18.1.11"}, ttl: 60},
	"zero.test.":    {addrs: []string{"198.18.1.12"}, ttl: 0},
	"long.test.":    {addrs: []string{"198.18.1.13"}, ttl: 86400},
	"alias.test.":   {cname: "v4.test.", addrs: []string{"198.18.1.11"}, ttl: 30},
	"svc.b.search.": {addrs: []string{"198.18.1.14"}, ttl: 60},
}

func lookup(t *testing.T, r *Resolver, network, host string) []netip.Addr {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	addrs, err := r.LookupNetIP(ctx, network, host)
	if err != nil {
		t.Fatalf("lookup %s %s: %v", network, host, err)
	}
	return addrs
}

func TestLookupIsCachedWithinTheTTL(t *testing.T) {
	s := newTestServer(t, testRecords)
	r, clock := newTest(t, s, "", Config{})
	got := lookup(t, r, "ip", "dual.test.")
	if want := []netip.Addr{netip.MustParseAddr("198.18.1.10"), netip.MustParseAddr("fd00:18:1::10")}; !slices.Equal(got, want) {
		t.Fatalf("got %v, want %v (IPv4 before ULA, as RFC 6724 orders them)", got, want)
	}
	if n := s.queries(); n != 2 {
		t.Fatalf("first lookup: %d queries, want 2 (A and AAAA)", n)
	}
	clock.advance(59 * time.Second)
	lookup(t, r, "ip", "dual.test.")
	if n := s.queries(); n != 0 {
		t.Fatalf("second lookup within the TTL: %d queries, want 0", n)
	}
	clock.advance(2 * time.Second)
	lookup(t, r, "ip4", "dual.test.")
	if n := s.queries(); n != 1 {
		t.Fatalf("lookup of one type after the TTL: %d queries, want 1", n)
	}
	if hits, misses := r.Stats(); hits != 2 || misses != 3 {
		t.Fatalf("stats: %d hits, %d misses; want 2, 3", hits, misses)
	}
}

func TestConcurrentLookupsShareOneQuery(t *testing.T) {
	s := newTestServer(t, testRecords)
	s.set(func() { s.delay = 100 * time.Millisecond })
	r, _ := newTest(t, s, "", Config{})
	var wg sync.WaitGroup
	errs := make(chan error, 50)
	for range 50 {
		wg.Go(func() {
			addrs, err := r.LookupNetIP(context.Background(), "ip", "dual.test.")
			if err == nil && len(addrs) != 2 {
				err = fmt.Errorf("got %v", addrs)
			}
			if err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if a, aaaa := s.count("dual.test.", "TypeA"), s.count("dual.test.", "TypeAAAA"); a != 1 || aaaa != 1 {
		t.Fatalf("50 concurrent lookups: %d A and %d AAAA queries, want 1 each", a, aaaa)
	}
}

// A caller giving up does not fail the others waiting for the same query.
func TestCallerCancelDoesNotFailTheFlight(t *testing.T) {
	s := newTestServer(t, testRecords)
	s.set(func() { s.delay = 200 * time.Millisecond })
	r, _ := newTest(t, s, "", Config{})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := r.LookupNetIP(ctx, "ip4", "v4.test."); err == nil {
		t.Fatal("lookup with an expired context succeeded")
	}
	lookup(t, r, "ip4", "v4.test.")
	if n := s.queries(); n != 1 {
		t.Fatalf("%d queries, want the first one only", n)
	}
}

func TestNegativeAnswersAreCachedBriefly(t *testing.T) {
	s := newTestServer(t, testRecords)
	r, clock := newTest(t, s, "", Config{})
	for i := range 2 {
		_, err := r.LookupNetIP(context.Background(), "ip", "missing.test.")
		var de *net.DNSError
		if !errors.As(err, &de) || !de.IsNotFound {
			t.Fatalf("err = %v, want not found", err)
		}
		if n, want := s.queries(), 2*(1-i); n != want {
			t.Fatalf("lookup %d of a missing name: %d queries, want %d", i+1, n, want)
		}
	}
	clock.advance(NegativeTTL + time.Second)
	r.LookupNetIP(context.Background(), "ip", "missing.test.")
	if n := s.queries(); n != 2 {
		t.Fatalf("after the negative TTL: %d queries, want 2", n)
	}

	// No AAAA record (NODATA) is negative for AAAA only; the A answer keeps its TTL.
	lookup(t, r, "ip", "v4.test.")
	s.queries()
	clock.advance(NegativeTTL + time.Second)
	lookup(t, r, "ip", "v4.test.")
	if a, aaaa := s.count("v4.test.", "TypeA"), s.count("v4.test.", "TypeAAAA"); a != 1 || aaaa != 2 {
		t.Fatalf("%d A and %d AAAA queries, want 1 and 2", a, aaaa)
	}
}

func TestTTLFloorAndCeiling(t *testing.T) {
	s := newTestServer(t, testRecords)
	r, clock := newTest(t, s, "", Config{})
	lookup(t, r, "ip4", "zero.test.")
	lookup(t, r, "ip4", "long.test.")
	s.queries()
	clock.advance(MinTTL - time.Second)
	lookup(t, r, "ip4", "zero.test.")
	if n := s.queries(); n != 0 {
		t.Fatalf("TTL 0 within the floor: %d queries, want 0", n)
	}
	clock.advance(2 * time.Second)
	lookup(t, r, "ip4", "zero.test.")
	if n := s.queries(); n != 1 {
		t.Fatalf("TTL 0 after the floor: %d queries, want 1", n)
	}
	clock.advance(MaxTTL - MinTTL - 2*time.Second)
	lookup(t, r, "ip4", "long.test.")
	if n := s.queries(); n != 0 {
		t.Fatalf("TTL 86400 before the ceiling: %d queries, want 0", n)
	}
	clock.advance(3 * time.Second)
	lookup(t, r, "ip4", "long.test.")
	if n := s.queries(); n != 1 {
		t.Fatalf("TTL 86400 after the ceiling: %d queries, want 1", n)
	}
}

func TestCacheIsBounded(t *testing.T) {
	s := newTestServer(t, testRecords)
	r, _ := newTest(t, s, "", Config{MaxEntries: 3})
	for _, n := range []string{"v4.test.", "zero.test.", "long.test.", "dual.test."} {
		lookup(t, r, "ip4", n)
	}
	r.mu.Lock()
	size, lru := len(r.entries), r.lru.Len()
	r.mu.Unlock()
	if size != 3 || lru != 3 {
		t.Fatalf("%d entries (%d in the LRU list), want 3", size, lru)
	}
	s.queries()
	lookup(t, r, "ip4", "dual.test.") // most recent: cached
	if n := s.queries(); n != 0 {
		t.Fatalf("most recent name: %d queries, want 0", n)
	}
	lookup(t, r, "ip4", "v4.test.") // oldest: evicted
	if n := s.queries(); n != 1 {
		t.Fatalf("evicted name: %d queries, want 1", n)
	}
}

// Addresses come in RFC 6724 precedence order: global IPv6, IPv4, ULA. (Data only: nothing
// here is dialed.)
func TestAddressOrder(t *testing.T) {
	s := newTestServer(t, map[string]record{"order.test.": {addrs: []string{"fd00::1", "198.18.1.1", "2001:db8::1", "198.18.1.2", "2002:c612:101::1"}, ttl: 60}})
	r, _ := newTest(t, s, "", Config{})
	got := fmt.Sprint(lookup(t, r, "ip", "order.test."))
	if want := "[2001:db8::1 198.18.1.1 198.18.1.2 2002:c612:101::1 fd00::1]"; got != want {
		t.Fatalf("got %s, want %s", got, want)
	}
}

func TestCNAMEChain(t *testing.T) {
	s := newTestServer(t, testRecords)
	r, _ := newTest(t, s, "", Config{})
	if got := lookup(t, r, "ip4", "alias.test."); !slices.Equal(got, []netip.Addr{netip.MustParseAddr("198.18.1.11")}) {
		t.Fatalf("got %v", got)
	}
}

// A name with a trailing dot is asked as that name only; a single-label name goes through the
// hosts file, then the search list.
func TestNamesAndSearchList(t *testing.T) {
	s := newTestServer(t, testRecords)
	r, _ := newTest(t, s, "nameserver 127.0.0.9\nsearch a.search b.search\noptions ndots:5 timeout:1 attempts:1\n", Config{})
	if _, err := r.LookupNetIP(context.Background(), "ip4", "svc.b."); err == nil {
		t.Fatal("absolute name resolved through the search list")
	}
	if n := s.count("svc.b..a.search.", "TypeA") + s.count("svc.b.a.search.", "TypeA"); n != 0 {
		t.Fatalf("the search list was applied to an absolute name (%d queries)", n)
	}
	if got := lookup(t, r, "ip4", "svc"); !slices.Equal(got, []netip.Addr{netip.MustParseAddr("198.18.1.14")}) {
		t.Fatalf("svc: %v", got)
	}
	if s.count("svc.a.search.", "TypeA") != 1 || s.count("svc.b.search.", "TypeA") != 1 || s.count("svc.", "TypeA") != 0 {
		t.Fatalf("search order: %v", s.counts)
	}
	if got := lookup(t, r, "ip", "hostsonly"); !slices.Equal(got, []netip.Addr{netip.MustParseAddr("198.18.9.9")}) {
		t.Fatalf("hosts file: %v", got)
	}
	if got := lookup(t, r, "ip6", "localhost"); !slices.Equal(got, []netip.Addr{netip.MustParseAddr("::1")}) {
		t.Fatalf("localhost ip6: %v", got)
	}
}

func TestTruncatedAnswerIsAskedAgainOverTCP(t *testing.T) {
	s := newTestServer(t, testRecords)
	s.set(func() { s.truncate = true })
	r, _ := newTest(t, s, "", Config{})
	if got := lookup(t, r, "ip", "dual.test."); len(got) != 2 {
		t.Fatalf("got %v", got)
	}
	if n := s.queries(); n != 4 {
		t.Fatalf("%d queries, want 4 (UDP and TCP for A and AAAA)", n)
	}
}

// A failed query is kept for FailureTTL (RFC 9520): a server that fails AAAA while
// answering A gets one AAAA query per second, not one per connection, and a name whose every
// query fails fails fast for that second instead of asking again.
func TestFailuresAreCachedForFailureTTL(t *testing.T) {
	s := newTestServer(t, map[string]record{
		"api.example.com.":  {addrs: []string{"198.18.1.10", "fd00::10"}, ttl: 60},
		"down.example.com.": {addrs: []string{"198.18.1.11"}, ttl: 60},
	})
	s.set(func() {
		s.rcode = map[string]dnsmessage.RCode{
			"api.example.com. TypeAAAA": dnsmessage.RCodeServerFailure,
			"down.example.com. TypeA":   dnsmessage.RCodeRefused,
		}
	})
	r, clock := newTest(t, s, "options timeout:1 attempts:1\n", Config{})
	for i := range 3 {
		if got := lookup(t, r, "ip", "api.example.com."); !slices.Equal(got, []netip.Addr{netip.MustParseAddr("198.18.1.10")}) {
			t.Fatalf("lookup %d: %v, want the A address", i+1, got)
		}
		_, err := r.LookupNetIP(context.Background(), "ip4", "down.example.com.")
		var de *net.DNSError
		if !errors.As(err, &de) || de.IsNotFound || !de.IsTemporary || !strings.Contains(de.Err, "REFUSED") {
			t.Fatalf("lookup %d of a refused name: %v, want a temporary failure saying REFUSED", i+1, err)
		}
	}
	if a, aaaa, down := s.count("api.example.com.", "TypeA"), s.count("api.example.com.", "TypeAAAA"), s.count("down.example.com.", "TypeA"); a != 1 || aaaa != 1 || down != 1 {
		t.Fatalf("%d A, %d AAAA, %d refused A queries in three lookups; want 1, 1, 1", a, aaaa, down)
	}
	clock.advance(FailureTTL)
	lookup(t, r, "ip", "api.example.com.")
	r.LookupNetIP(context.Background(), "ip4", "down.example.com.")
	if a, aaaa, down := s.count("api.example.com.", "TypeA"), s.count("api.example.com.", "TypeAAAA"), s.count("down.example.com.", "TypeA"); a != 1 || aaaa != 2 || down != 2 {
		t.Fatalf("after FailureTTL: %d A, %d AAAA, %d refused A queries; want 1 (cached for its TTL), 2, 2", a, aaaa, down)
	}
	// The server recovered: the next query after the failure expired is answered and kept
	// for the record's TTL.
	s.set(func() { s.rcode = nil })
	clock.advance(FailureTTL)
	if got := lookup(t, r, "ip4", "down.example.com."); !slices.Equal(got, []netip.Addr{netip.MustParseAddr("198.18.1.11")}) {
		t.Fatalf("after recovery: %v", got)
	}
}

func TestReadConf(t *testing.T) {
	dir := t.TempDir()
	p := dir + "/resolv.conf"
	writeFile(t, p, "# k8s\nnameserver 10.96.0.10\nnameserver fd00::a\nsearch ns.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5 timeout:2 attempts:3 rotate\n")
	c := readConf(p)
	if !slices.Equal(c.servers, []string{"10.96.0.10:53", "[fd00::a]:53"}) || c.ndots != 5 || c.timeout != 2*time.Second || c.attempts != 3 {
		t.Fatalf("%+v", c)
	}
	if got := c.names("api.example.com.", nil); !slices.Equal(got, []string{"api.example.com."}) {
		t.Fatalf("absolute: %v", got)
	}
	if got := c.names("db", nil); !slices.Equal(got, []string{"db.ns.svc.cluster.local.", "db.svc.cluster.local.", "db.cluster.local.", "db."}) {
		t.Fatalf("single label: %v", got)
	}
	if d := readConf(dir + "/missing"); d.ndots != 1 || len(d.servers) != 2 {
		t.Fatalf("defaults: %+v", d)
	}
}

// A server that never answers AAAA (some middleboxes drop them) must not hold every
// connection for its whole timeout when the A answer is there: the lookup returns the A
// addresses ResolutionDelay after them, cold and again with A cached.
func TestUnansweredFamilyCostsTheResolutionDelayNotTheTimeout(t *testing.T) {
	s := newTestServer(t, map[string]record{"api.example.com.": {addrs: []string{"198.18.1.10", "fd00::10"}, ttl: 60}})
	s.set(func() { s.silent = map[string]bool{"api.example.com. TypeAAAA": true} })
	r, _ := newTest(t, s, "options timeout:5 attempts:1\n", Config{})
	for i := range 2 {
		start := time.Now()
		addrs, err := r.LookupNetIP(context.Background(), "ip", "api.example.com.")
		took := time.Since(start)
		if err != nil || len(addrs) != 1 || addrs[0].String() != "198.18.1.10" {
			t.Fatalf("lookup %d: %v, %v; want the A address", i+1, addrs, err)
		}
		// The server's timeout is 5 s: anything near it means the lookup waited for AAAA.
		if took > 2*time.Second {
			t.Fatalf("lookup %d took %v: it waited for the unanswered AAAA query", i+1, took)
		}
	}
	if n := s.count("api.example.com.", "TypeA"); n != 1 {
		t.Fatalf("%d A queries, want 1 (cached)", n)
	}
	if n := s.count("api.example.com.", "TypeAAAA"); n != 1 {
		t.Fatalf("%d AAAA queries, want 1 (the second lookup joins the one in flight)", n)
	}
}

// The hosts file is parsed once and looked at again (modification time, size) at most every
// hostsRecheck: a short name on every connection reads no file, and an edit is seen after
// the recheck.
func TestHostsFileIsReadAgainOnlyWhenChanged(t *testing.T) {
	s := newTestServer(t, testRecords)
	r, clock := newTest(t, s, "options timeout:1 attempts:1\n", Config{})
	if got := lookup(t, r, "ip", "hostsonly"); !slices.Equal(got, []netip.Addr{netip.MustParseAddr("198.18.9.9")}) {
		t.Fatalf("hosts file: %v", got)
	}
	os.WriteFile(r.hosts.path, []byte("198.18.9.10 hostsonly\n"), 0o644)
	if got := lookup(t, r, "ip", "hostsonly"); !slices.Equal(got, []netip.Addr{netip.MustParseAddr("198.18.9.9")}) {
		t.Fatalf("within the recheck interval: %v, want the parsed file's 198.18.9.9", got)
	}
	clock.advance(hostsRecheck)
	if got := lookup(t, r, "ip", "hostsonly"); !slices.Equal(got, []netip.Addr{netip.MustParseAddr("198.18.9.10")}) {
		t.Fatalf("after the recheck interval: %v, want the edit's 198.18.9.10", got)
	}
}

// An answer keeps its first MaxAddrs addresses, in order, in the cache and for the caller: a
// 64 KiB TCP answer of thousands of A records (names chosen by whoever runs a
// wildcard-allowed domain's DNS) must not cost its whole size per cache entry.
func TestAnswerKeepsAtMostMaxAddrs(t *testing.T) {
	const n = 4000 // about 64,000 bytes: as many as a TCP answer holds
	addrs := make([]string, n)
	a := netip.MustParseAddr("198.18.0.1")
	for i := range addrs {
		addrs[i] = a.String()
		a = a.Next()
	}
	s := newTestServer(t, map[string]record{"many.test.": {addrs: addrs, ttl: 60}})
	s.set(func() { s.truncate = true }) // UDP says TC, the whole answer comes over TCP
	r, _ := newTest(t, s, "", Config{})
	got := lookup(t, r, "ip4", "many.test.")
	if len(got) != MaxAddrs {
		t.Fatalf("got %d addresses, want %d", len(got), MaxAddrs)
	}
	for i, a := range got {
		if a.String() != addrs[i] {
			t.Fatalf("address %d is %s, want %s (the answer's first ones, in order)", i, a, addrs[i])
		}
	}
	if n := s.count("many.test.", "TypeA"); n != 2 {
		t.Fatalf("%d queries, want 2 (UDP, then TCP)", n)
	}
	r.mu.Lock()
	e := r.entries[key{"many.test.", dnsmessage.TypeA}].Value.(*entry)
	kept := len(e.addrs)
	r.mu.Unlock()
	if kept != MaxAddrs {
		t.Fatalf("the cache keeps %d addresses, want %d", kept, MaxAddrs)
	}
	if got := lookup(t, r, "ip4", "many.test."); len(got) != MaxAddrs {
		t.Fatalf("cached: got %d addresses, want %d", len(got), MaxAddrs)
	}
}

// A datagram that does not parse, or does not answer the query, is ignored, and the server's
// answer is still taken: otherwise an off-path sender that guesses the source port could
// fail a lookup (and have the failure cached) with five bytes.
func TestJunkDatagramDoesNotFailTheLookup(t *testing.T) {
	s := newTestServer(t, testRecords)
	s.set(func() {
		s.junk = func(query []byte) [][]byte {
			// The query's ID, the response bit, one question, then nothing: parses past the
			// ID check, fails on the question.
			cut := append(query[:2:2], 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0, 7, 'v')
			return [][]byte{{1, 2, 3, 4, 5}, cut}
		}
	})
	r, _ := newTest(t, s, "options timeout:5 attempts:1\n", Config{})
	start := time.Now()
	if got := lookup(t, r, "ip4", "v4.test."); !slices.Equal(got, []netip.Addr{netip.MustParseAddr("198.18.1.11")}) {
		t.Fatalf("got %v", got)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("lookup took %v: the answer was not taken as it came", d)
	}
	if n := s.queries(); n != 1 {
		t.Fatalf("%d queries, want 1", n)
	}
}
