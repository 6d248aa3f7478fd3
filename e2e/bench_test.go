package e2e

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/egress-guard/egress-guard/internal/netlab"
	"github.com/egress-guard/egress-guard/pkg/contract"
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

// BenchmarkControlPlane10000Sidecars: one control plane (the real binary, with a real API
// server for the TokenReview) holding 10,000 sidecars' long-polls, each on its own TLS
// connection; reports the control plane's RSS while they wait and the time from a policy edit
// on disk until every one of them has the new rules (watch interval 200ms + settle 250ms
// included).
func BenchmarkControlPlane10000Sidecars(b *testing.B) {
	const sidecars = 10000
	var lim syscall.Rlimit
	syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim)
	// Each side holds one descriptor per sidecar: this process the clients' ends, the control
	// plane (which inherits the limit) the servers'.
	want := uint64(sidecars + 2048)
	if lim.Cur < want {
		lim.Cur = want
		if lim.Max < want {
			lim.Max = want
		}
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			b.Skipf("cannot raise the open-file limit to %d: %v", want, err)
		}
	}
	e := startK8s(b)
	ca, err := netlab.NewCA()
	if err != nil {
		b.Fatal(err)
	}
	caFile := filepath.Join(b.TempDir(), "ca.pem")
	os.WriteFile(caFile, ca.PEM, 0o644)
	// The chart sets GOMEMLIMIT from the container's memory limit, as Go services should: the
	// garbage of 10,000 TLS handshakes is then collected instead of kept until the heap
	// doubles.
	cp := startControlPlane(b, e, ca, caFile, "127.0.0.1", "GOMEMLIMIT=160MiB")
	token := e.token(b, "shop", "frontend", contract.TokenAudience, "app")
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: certPool(b, ca.PEM)}, MaxIdleConnsPerHost: sidecars}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 3 * time.Minute}
	get := func(etag, wait string) (int, string, error) {
		req, _ := http.NewRequest("GET", cp.url+contract.PolicyPath+wait, nil)
		req.Header.Set("Authorization", "Bearer "+token)
		if etag != "" {
			req.Header.Set("If-None-Match", etag)
		}
		resp, err := client.Do(req)
		if err != nil {
			return 0, "", err
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode, resp.Header.Get("ETag"), nil
	}
	sample := func(name string) float64 {
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", cp.metrics))
		if err != nil {
			return 0
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		for _, l := range strings.Split(string(body), "\n") {
			if strings.HasPrefix(l, name+" ") {
				var v float64
				fmt.Sscanf(strings.Fields(l)[1], "%g", &v)
				return v
			}
		}
		return 0
	}
	waiting := func() float64 { return sample("egress_guard_controller_sidecars_waiting") }
	for i := 0; i < b.N; i++ {
		_, etag, err := get("", "")
		if err != nil {
			b.Fatal(err)
		}
		done := make(chan time.Time, sidecars)
		// A simulated sidecar is one TLS connection and one goroutine reading its answer (an
		// http.Client would add two goroutines per connection to this process, competing with
		// the control plane for the same two cores).
		tlsConfig := &tls.Config{RootCAs: certPool(b, ca.PEM)}
		request := []byte("GET " + contract.PolicyPath + "?wait=2m HTTP/1.1\r\nHost: controller\r\nAuthorization: Bearer " + token +
			"\r\nIf-None-Match: " + etag + "\r\n\r\n")
		for j := 0; j < sidecars; j++ {
			go func() {
				defer func() { done <- time.Now() }()
				conn, err := tls.Dial("tcp", strings.TrimPrefix(cp.url, "https://"), tlsConfig)
				if err != nil {
					b.Errorf("dial: %v", err)
					return
				}
				defer conn.Close()
				conn.Write(request)
				resp, err := http.ReadResponse(bufio.NewReaderSize(conn, 2048), nil)
				if err != nil || resp.StatusCode != 200 {
					b.Errorf("long-poll: %v %v", resp, err)
					return
				}
				io.Copy(io.Discard, resp.Body)
			}()
		}
		deadline := time.Now().Add(3 * time.Minute)
		for waiting() < sidecars {
			if time.Now().After(deadline) {
				b.Fatalf("only %v of %d sidecars waiting", waiting(), sidecars)
			}
			time.Sleep(200 * time.Millisecond)
		}
		rss := procRSS(cp.proc.PID())
		b.Logf("heap in use %.0f MiB, stacks %.0f MiB, goroutines %.0f", sample("go_memstats_heap_inuse_bytes")/(1<<20),
			sample("go_memstats_stack_inuse_bytes")/(1<<20), sample("go_goroutines"))
		edited := strings.Replace(identityPolicy, `["api.example.com", "127.0.0.0/8"]`, fmt.Sprintf(`["api.example.com", "127.0.0.0/8", "e%d.example.com"]`, i), 1)
		start := time.Now()
		os.WriteFile(cp.policy, []byte(edited), 0o644)
		var last time.Time
		for j := 0; j < sidecars; j++ {
			if t := <-done; t.After(last) {
				last = t
			}
		}
		b.ReportMetric(float64(last.Sub(start).Milliseconds()), "ms-edit-to-all")
		b.ReportMetric(float64(rss)/1024, "controller-RSS-MiB")
		b.Logf("%d sidecars waiting: controller RSS %d KiB; edit to all of them: %v", sidecars, rss, last.Sub(start))
	}
}

// procRSS is a process's resident set in KiB.
func procRSS(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "VmRSS:") {
			var kb int64
			fmt.Sscanf(strings.TrimSpace(strings.TrimPrefix(l, "VmRSS:")), "%d", &kb)
			return kb
		}
	}
	return 0
}
