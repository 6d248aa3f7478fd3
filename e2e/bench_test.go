package e2e

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/egress-guard/egress-guard/internal/netlab"
)

// BenchmarkTransparent measures what capture costs an app: connection setup (connect, one
// echoed byte, close) and bulk throughput to a server in the internet namespace, first
// directly, then through the capture rules and the sidecar, in the same namespaces.
func BenchmarkTransparent(b *testing.B) {
	require(b, "iptables", "ip6tables", "setpriv")
	ctx := context.Background()
	l, err := netlab.Up(ctx, fmt.Sprintf("eb%d", os.Getpid()%100000), hosts, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer l.Down()
	dir, _ := os.MkdirTemp("", "egress-guard-bench-")
	defer os.RemoveAll(dir)
	os.Chmod(dir, 0o755)
	policy := filepath.Join(dir, "policy.yaml")
	os.WriteFile(policy, []byte("identities:\n  bench:\n    allowed_destinations: [\"198.18.1.10\"]\n"), 0o644)
	side, err := netlab.Start(l.Pod, binary(b, "./cmd/egress-guard"), []string{"MODE=sidecar", "IDENTITY=bench",
		"CONFIGMAP_PATH=" + policy, "LOG_LEVEL=ERROR", "SERVER_FIRST_TIMEOUT=100ms"}, proxyUID, proxyUID)
	if err != nil {
		b.Fatal(err)
	}
	defer side.Stop(5 * time.Second)
	if err := netlab.WaitReady(ctx, l.Pod, "http://127.0.0.1:15090/ready", side, 10*time.Second); err != nil {
		b.Fatal(err)
	}

	// The phases use different (identical) servers: the direct phase leaves thousands of
	// conntrack entries in TIME_WAIT for its 4-tuples, and a NATed connection that reused one
	// would wait for a SYN retransmit, which measures the benchmark, not the proxy.
	servers := map[string]string{"direct": "198.18.1.11:7", "transparent": "198.18.1.10:7"}
	for _, mode := range []string{"direct", "transparent"} {
		server := servers[mode]
		if mode == "transparent" {
			if out, err := l.Pod.Run(ctx, binary(b, "./cmd/egress-guard-init"), "--dns-servers", netlab.DNSServer); err != nil {
				b.Fatalf("init: %v\n%s", err, out)
			}
		}
		b.Run(mode+"/connect-echo", func(b *testing.B) {
			buf := make([]byte, 1)
			var lat []time.Duration
			for b.Loop() {
				start := time.Now()
				c, err := l.Pod.Dial("tcp", server, 3*time.Second)
				if err != nil {
					b.Fatal(err)
				}
				c.SetDeadline(time.Now().Add(3 * time.Second))
				// The echo server speaks second: the sidecar decides on the address once the
				// byte arrives (no name in it) without waiting for the server-first timeout.
				if _, err := c.Write([]byte("x")); err != nil {
					b.Fatal(err)
				}
				if _, err := io.ReadFull(c, buf); err != nil {
					b.Fatal(err)
				}
				lat = append(lat, time.Since(start))
				c.Close()
			}
			slices.Sort(lat)
			b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
			b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
		})
		b.Run(mode+"/throughput", func(b *testing.B) {
			c, err := l.Pod.Dial("tcp", server, 3*time.Second)
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			chunk := make([]byte, 1<<20)
			done := make(chan int64)
			go func() { n, _ := io.Copy(io.Discard, c); done <- n }()
			b.SetBytes(int64(len(chunk)))
			for b.Loop() {
				if _, err := c.Write(chunk); err != nil {
					b.Fatal(err)
				}
			}
			c.(interface{ CloseWrite() error }).CloseWrite()
			<-done
		})
	}
}
