package e2e

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/egress-guard/egress-guard/internal/netlab"
	"github.com/egress-guard/egress-guard/pkg/dialer"
)

// queryDNSAddr is a second dnsmasq in the internet namespace, logging every query it gets.
const queryDNSAddr = "198.18.1.54"

// queryLog is a dnsmasq started with --log-queries, logging to a file.
type queryLog struct {
	path string
	// resolver is Go's resolver asking this dnsmasq from the lab's pod namespace.
	resolver *net.Resolver
}

// startQueryLoggingDNS runs dnsmasq on addr in the lab's internet namespace until the test
// ends, answering records (a name and every name under it → addresses, TTL 60 s) and NXDOMAIN
// for any other name under the local domains, and logging every query it gets.
func startQueryLoggingDNS(t testing.TB, l *netlab.Lab, addr string, local []string, records map[string][]string) *queryLog {
	t.Helper()
	ctx := context.Background()
	if out, err := l.Net.Run(ctx, "ip", "addr", "add", addr+"/32", "dev", "lo"); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	t.Cleanup(func() { l.Net.Run(ctx, "ip", "addr", "del", addr+"/32", "dev", "lo") })
	dir := t.TempDir()
	q := &queryLog{path: filepath.Join(dir, "queries.log"), resolver: &net.Resolver{PreferGo: true,
		Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return l.Pod.Dial(network, addr+":53", time.Second)
		}}}
	args := []string{"dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-poll",
		"--bind-interfaces", "--listen-address=" + addr, "--port=53", "--conf-file=/dev/null",
		"--user=root", "--group=root", "--pid-file=" + filepath.Join(dir, "dnsmasq.pid"),
		"--log-queries", "--log-facility=" + q.path, "--local-ttl=60"}
	for _, d := range local {
		args = append(args, "--local=/"+d+"/")
	}
	for n, addrs := range records {
		for _, a := range addrs {
			args = append(args, "--address=/"+n+"/"+a)
		}
	}
	cmd := l.Net.Command(ctx, args...)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	deadline := time.Now().Add(10 * time.Second)
	for {
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		_, err := q.resolver.LookupNetIP(cctx, "ip4", "ready.check."+local[0]+".")
		cancel()
		if de, ok := err.(*net.DNSError); ok && de.IsNotFound {
			return q // NXDOMAIN: it answers
		}
		if time.Now().After(deadline) {
			t.Fatalf("dnsmasq on %s not answering: %v", addr, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// searchedDomains are the domains the tests' names and a cluster's search list produce: their
// query-logging dnsmasq answers NXDOMAIN for any name there it has no record of.
var searchedDomains = []string{"test", "example.com", "cluster.local"}

var queryLine = regexp.MustCompile(`query\[(\w+)\] (\S+) from `)

// mark is the log's size now: queriesSince reads only what is written after it.
func (q *queryLog) mark(t testing.TB) int64 {
	t.Helper()
	st, err := os.Stat(q.path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}

// queriesSince returns the queries ("A api.example.com") logged after mark, once at least
// want have arrived (or a few seconds passed) and no more came in a quiet moment after.
func (q *queryLog) queriesSince(t testing.TB, mark int64, want int) []string {
	t.Helper()
	read := func() []string {
		b, err := os.ReadFile(q.path)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, m := range queryLine.FindAllStringSubmatch(string(b[min(mark, int64(len(b))):]), -1) {
			out = append(out, m[1]+" "+m[2])
		}
		return out
	}
	deadline := time.Now().Add(3 * time.Second)
	for len(read()) < want && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	// Anything still on its way: until the log has not grown for 500 ms (at most 5 s more).
	for last, quiet := q.mark(t), time.Now().Add(5*time.Second); time.Now().Before(quiet); {
		time.Sleep(500 * time.Millisecond)
		size := q.mark(t)
		if size == last {
			break
		}
		last = size
	}
	return read()
}

// clusterResolvConf gives the pod namespace a Kubernetes-like resolv.conf (ip netns exec
// bind-mounts it as /etc/resolv.conf for what it starts in the pod).
func clusterResolvConf(t *testing.T, l *netlab.Lab, server string) {
	t.Helper()
	dir := filepath.Join("/etc/netns", l.Pod.Name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	conf := "nameserver " + server + "\nsearch ns.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
	if err := os.WriteFile(filepath.Join(dir, "resolv.conf"), []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
}

// With a cluster's resolv.conf (three search domains, ndots:5), a new connection to an allowed
// dotted name costs the proxy two queries (A and AAAA, for the absolute name only), and the
// next connection within the TTL none. Without the cache (Go's resolver, as the proxy used
// before) every connection costs two.
func TestResolverQueriesPerConnection(t *testing.T) {
	l := sharedLab(t)
	dns := startQueryLoggingDNS(t, l, queryDNSAddr, searchedDomains, map[string][]string{"api.example.com": {"198.18.1.10", "fd00:18:1::10"}})

	// Before: the proxy's previous path, dialer.Lookup with Go's resolver, on every connection.
	var before []int
	for range 2 {
		m := dns.mark(t)
		if _, err := dialer.Lookup(context.Background(), dns.resolver, "api.example.com"); err != nil {
			t.Fatal(err)
		}
		before = append(before, len(dns.queriesSince(t, m, 2)))
	}
	t.Logf("without the cache (Go's resolver): %d then %d DNS queries for two consecutive lookups", before[0], before[1])
	if before[0] != 2 || before[1] != 2 {
		t.Fatalf("Go's resolver made %v queries, want 2 each time", before)
	}

	clusterResolvConf(t, l, queryDNSAddr)
	g := startGateway(t, l, gatewayPolicy, "RESOLVER=") // the pod's resolv.conf
	var after [][]string
	var hits, misses []float64
	for i := range 2 {
		hits = append(hits, metric(t, l, g.metrics, "egress_proxy_dns_cache_hits_total"))
		misses = append(misses, metric(t, l, g.metrics, "egress_proxy_dns_cache_misses_total"))
		m := dns.mark(t)
		lg := from(g.proc)
		exit, code, body := g.curl(t, "frontend-pod-1", "https://api.example.com/")
		if exit != 0 || code != 200 || !strings.Contains(body, "hello from 198.18.1.10") {
			t.Fatalf("connection %d: exit %d, status %d: %s", i+1, exit, code, body)
		}
		lg.decision(t, "target", "api.example.com:443", "action", "allowed", "reason", "rule")
		after = append(after, dns.queriesSince(t, m, 2-2*i))
	}
	t.Logf("with the cache: connection 1: %d DNS queries %v; connection 2: %d DNS queries %v", len(after[0]), after[0], len(after[1]), after[1])
	first := strings.Join(after[0], ",")
	if first != "A api.example.com,AAAA api.example.com" && first != "AAAA api.example.com,A api.example.com" {
		t.Fatalf("first connection asked %v, want A and AAAA for api.example.com only (no search domain)", after[0])
	}
	if len(after[1]) != 0 {
		t.Fatalf("second connection asked %v, want nothing (cached)", after[1])
	}
	// The cache's own counters say the same: the second connection's two lookups (A, AAAA)
	// were hits and sent nothing.
	hits = append(hits, metric(t, l, g.metrics, "egress_proxy_dns_cache_hits_total"))
	misses = append(misses, metric(t, l, g.metrics, "egress_proxy_dns_cache_misses_total"))
	if hits[2]-hits[1] != 2 || misses[2]-misses[1] != 0 {
		t.Fatalf("second connection: %v cache hits, %v misses; want 2 and 0", hits[2]-hits[1], misses[2]-misses[1])
	}
	if misses[1]-misses[0] != 2 {
		t.Fatalf("first connection: %v cache misses, want 2 (A and AAAA)", misses[1]-misses[0])
	}
}

// blackhole makes addr (added to the internet namespace's lo) drop every SYN, as a dead or
// firewalled server does; the returned func counts the dropped SYNs.
func blackhole(t *testing.T, l *netlab.Lab, addr string) func() int {
	t.Helper()
	ctx := context.Background()
	ip, bits, tables := "ip", "/32", "iptables"
	if strings.Contains(addr, ":") {
		ip, bits, tables = "ip -6", "/128", "ip6tables"
	}
	add := append(strings.Fields(ip), "addr", "add", addr+bits, "dev", "lo")
	if tables == "ip6tables" {
		add = append(add, "nodad")
	}
	if _, err := l.Net.Run(ctx, add...); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Net.Run(ctx, append(strings.Fields(ip), "addr", "del", addr+bits, "dev", "lo")...) })
	drop := []string{"INPUT", "-d", addr, "-p", "tcp", "--syn", "-j", "DROP"}
	if _, err := l.Net.Run(ctx, append([]string{tables, "-I"}, drop...)...); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Net.Run(ctx, append([]string{tables, "-D"}, drop...)...) })
	return func() int {
		out, err := l.Net.Run(ctx, tables, "-L", "INPUT", "-v", "-x", "-n")
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(out, "\n") {
			if f := strings.Fields(line); len(f) > 2 && f[2] == "DROP" && strings.Contains(line, addr) {
				n, _ := strconv.Atoi(f[0])
				return n
			}
		}
		t.Fatalf("no DROP rule for %s in:\n%s", addr, out)
		return 0
	}
}

// A name with addresses of both families, one family's address dropping SYNs: the connection
// through the proxy succeeds well before a per-address timeout (2 s before Happy Eyeballs)
// would have run out.
//
// The proxy orders a name's addresses as RFC 6724 does (and Go's resolver did): IPv4 before a
// ULA (fd00::/8, the lab's IPv6). So with the AAAA blackholed, IPv4 is tried first and simply
// works; the race itself shows when the preferred family is the dead one: the A blackholed, the
// IPv4 attempt hangs, and the IPv6 attempt starts 250 ms later and wins.
func TestHappyEyeballsThroughTheGateway(t *testing.T) {
	l := sharedLab(t)
	require(t, "ip6tables")
	const dead6, dead4 = "fd00:18:9::30", "198.18.9.30"
	dropped6 := blackhole(t, l, dead6)
	dropped4 := blackhole(t, l, dead4)
	startQueryLoggingDNS(t, l, queryDNSAddr, searchedDomains, map[string][]string{
		"he6.example.com": {dead6, "198.18.1.10"},   // AAAA dead, A works
		"he4.example.com": {dead4, "fd00:18:1::10"}, // A dead, AAAA works
	})
	const policy = `
identities:
  "dual-stack":
    api_keys: ["he-key"]
    allowed_destinations:
      - "he6.example.com"
      - "he4.example.com"
      # fd00::/8 is ULA (internal): the rules name the ranges so the IPv6 answers are vetted in.
      - "fd00:18:9::/48"
      - "fd00:18:1::/48"
`
	g := startGateway(t, l, policy, "RESOLVER="+queryDNSAddr+":53", "DIAL_TIMEOUT=5s")
	for _, tc := range []struct {
		name, server, upstream string
		dropped                func() int
		wantDropped            bool // the dead address is the preferred one, so it must have been tried
	}{
		{"he6.example.com", "198.18.1.10", "198.18.1.10:80", dropped6, false},
		{"he4.example.com", "fd00:18:1::10", "[fd00:18:1::10]:80", dropped4, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			lg := from(g.proc)
			before := tc.dropped()
			// The time includes starting curl: a few ms beside the 1 s bound.
			start := time.Now()
			exit, code, body := g.curl(t, "he-key", "http://"+tc.name+"/")
			took := time.Since(start)
			dropped := tc.dropped() - before
			t.Logf("through the gateway to %s: %v, upstream %s, %d SYN(s) dropped at the dead address", tc.name, took.Round(time.Millisecond), tc.upstream, dropped)
			if exit != 0 || code != 200 || !strings.Contains(body, "hello from "+tc.server+" ") {
				t.Fatalf("curl exit %d, status %d: %s", exit, code, body)
			}
			d := lg.decision(t, "target", tc.name+":80", "action", "allowed", "reason", "rule")
			lg.closeOf(t, d, "upstream", tc.upstream)
			if tc.wantDropped && dropped < 1 {
				t.Fatal("no SYN to the dead address was dropped: the preferred family was not tried first")
			}
			if took >= time.Second {
				t.Fatalf("took %v: a per-address timeout was waited out instead of racing the families", took)
			}
		})
	}
}
