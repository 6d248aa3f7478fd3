package e2e

import (
	"bytes"
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/egress-guard/egress-guard/internal/netlab"
)

// benchDNSAddr is the benchmark's own dnsmasq (in its own lab), logging every query.
const benchDNSAddr = "198.18.1.55"

// Each scenario has its own echo server: the proxy's upstream sockets close first and stay in
// TIME_WAIT in the pod namespace, so scenarios that shared one server address would compete
// for the same 4-tuples. All three are the lab's identical echo servers.
const (
	benchIPServer   = "198.18.1.10" // ip: CONNECT 198.18.1.10:7
	benchWarmServer = "198.18.1.11" // name-warm: warm.bench.test
	benchColdServer = "198.18.1.12" // name-cold: <n>.cold.bench.test
)

const benchNamesPolicy = `
identities:
  bench:
    api_keys: ["bench-key"]
    allowed_destinations:
      - "198.18.1.10:7"
      - "*.bench.test"
`

// coldName numbers the name-cold scenario's names: unique within the test binary, so no run
// (-count) ever finds one in a cache.
var coldName atomic.Int64

// BenchmarkNamedCONNECT measures what naming a host costs a CONNECT through the gateway
// binary (explicit proxy, API key): connect, CONNECT, one echoed byte, close, per iteration.
//
//   - ip: CONNECT to an address (no resolution at all): the baseline.
//   - name-warm: CONNECT to one name: its first connection fills the resolver cache, the
//     others are answered from it (the AAAA "no address" answer is kept 5 s, so a long run
//     re-asks it then).
//   - name-cold: CONNECT to a new name every iteration (dnsmasq answers every name under
//     cold.bench.test): every connection misses the cache and asks A and AAAA.
//
// Besides ns/op and latency percentiles it reports dns-queries/op, counted in the log of the
// dnsmasq the proxy asks (--log-queries), and cache-misses/op, from the proxy's own
// egress_proxy_dns_cache_misses_total.
func BenchmarkNamedCONNECT(b *testing.B) {
	require(b)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	l, err := netlab.Up(ctx, fmt.Sprintf("en%d", os.Getpid()%100000), hosts, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer l.Down()
	// Room for tens of thousands of upstream connections per scenario (TIME_WAIT keeps each
	// 4-tuple for a minute): a per-namespace setting, in the lab's pod namespace only.
	if out, err := l.Pod.Run(ctx, "sh", "-c", "echo 1024 65000 > /proc/sys/net/ipv4/ip_local_port_range"); err != nil {
		b.Fatalf("ip_local_port_range: %v: %s", err, out)
	}
	// warm.bench.test and every name under cold.bench.test have an A record (TTL 60 s) and no
	// AAAA; any other name under bench.test does not exist.
	dns := startQueryLoggingDNS(b, l, benchDNSAddr, []string{"bench.test"}, map[string][]string{
		"warm.bench.test": {benchWarmServer},
		"cold.bench.test": {benchColdServer},
	})
	if addrs, err := dns.resolver.LookupNetIP(ctx, "ip4", "ready.cold.bench.test."); err != nil || len(addrs) != 1 || addrs[0].String() != benchColdServer {
		b.Fatalf("dnsmasq on %s: ready.cold.bench.test is %v %v, want %s", benchDNSAddr, addrs, err, benchColdServer)
	}

	dir, err := os.MkdirTemp("", "egress-guard-bench-names-")
	if err != nil {
		b.Fatal(err)
	}
	defer os.RemoveAll(dir)
	policy := filepath.Join(dir, "egress-policy.yaml")
	if err := os.WriteFile(policy, []byte(benchNamesPolicy), 0o644); err != nil {
		b.Fatal(err)
	}
	const proxyPort, metricsPort = 3128, 9090
	g, err := netlab.Start(l.Pod, binary(b, "./cmd/egress-guard"), []string{
		fmt.Sprintf("PROXY_PORT=%d", proxyPort), fmt.Sprintf("METRICS_PORT=%d", metricsPort),
		"CONFIGMAP_PATH=" + policy, "RESOLVER=" + benchDNSAddr + ":53", "LOG_LEVEL=ERROR", "DIAL_TIMEOUT=3s",
	}, 0, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer g.Stop(10 * time.Second)
	if err := netlab.WaitReady(ctx, l.Pod, fmt.Sprintf("http://127.0.0.1:%d/ready", metricsPort), g, 10*time.Second); err != nil {
		b.Fatal(err)
	}
	cacheMisses := func(b *testing.B) float64 {
		body, err := scrape(l.Pod, fmt.Sprintf("127.0.0.1:%d", metricsPort))
		if err != nil {
			b.Fatalf("GET /metrics: %v", err)
		}
		v, ok := sample(body, "egress_proxy_dns_cache_misses_total")
		if !ok {
			b.Fatal("no egress_proxy_dns_cache_misses_total in /metrics")
		}
		return v
	}

	proxy := fmt.Sprintf("127.0.0.1:%d", proxyPort)
	auth := "Basic " + base64.StdEncoding.EncodeToString([]byte("bench-key:x"))
	for _, sc := range []struct {
		name   string
		target func() string
		server string
	}{
		{"ip", func() string { return benchIPServer + ":7" }, benchIPServer},
		{"name-warm", func() string { return "warm.bench.test:7" }, benchWarmServer},
		{"name-cold", func() string { return fmt.Sprintf("n%d.cold.bench.test:7", coldName.Add(1)) }, benchColdServer},
	} {
		b.Run(sc.name, func(b *testing.B) {
			mark := dns.mark(b)
			misses := cacheMisses(b)
			accepted := l.Accepted(sc.server)
			buf := make([]byte, 512)
			var lat []time.Duration
			for b.Loop() {
				start := time.Now()
				if err := benchConnect(l.Pod, proxy, auth, sc.target(), buf); err != nil {
					b.Fatal(err)
				}
				lat = append(lat, time.Since(start))
			}
			n := float64(b.N)
			if got := l.Accepted(sc.server) - accepted; got != int64(b.N) {
				b.Fatalf("%s accepted %d connections for %d iterations", sc.server, got, b.N)
			}
			slices.Sort(lat)
			b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
			b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
			b.ReportMetric(float64(len(dns.queriesSince(b, mark, 0)))/n, "dns-queries/op")
			b.ReportMetric((cacheMisses(b)-misses)/n, "cache-misses/op")
		})
	}
}

// benchConnect opens a tunnel through the proxy to target, echoes one byte through it and
// closes it, every step within a few seconds.
func benchConnect(pod *netlab.NS, proxy, auth, target string, buf []byte) error {
	c, err := pod.Dial("tcp", proxy, 3*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := io.WriteString(c, "CONNECT "+target+" HTTP/1.1\r\nHost: "+target+"\r\nProxy-Authorization: "+auth+"\r\n\r\n"); err != nil {
		return err
	}
	// The proxy writes its answer in one piece and nothing follows it before the client
	// speaks (the echo server speaks second).
	n := 0
	for !bytes.Contains(buf[:n], []byte("\r\n\r\n")) {
		if n == len(buf) {
			return fmt.Errorf("CONNECT %s: answer too long: %q", target, buf[:n])
		}
		m, err := c.Read(buf[n:])
		n += m
		if err != nil {
			return fmt.Errorf("CONNECT %s: %v after %q", target, err, buf[:n])
		}
	}
	if !bytes.HasPrefix(buf[:n], []byte("HTTP/1.1 200 ")) || !bytes.HasSuffix(buf[:n], []byte("\r\n\r\n")) {
		return fmt.Errorf("CONNECT %s: %q", target, buf[:n])
	}
	if _, err := c.Write([]byte("x")); err != nil {
		return err
	}
	if _, err := io.ReadFull(c, buf[:1]); err != nil || buf[0] != 'x' {
		return fmt.Errorf("echo through %s: %q %v", target, buf[:1], err)
	}
	return nil
}
