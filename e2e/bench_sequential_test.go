package e2e

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// BenchmarkSequentialCONNECT is egressbench's latency-plain scenario against the real gateway
// in a namespace of its own (dial, CONNECT, 200, one byte echoed, close, one tunnel after
// another), once with the Go runtime's default GOMAXPROCS and once with the injected
// sidecar's 1. proxy-cpu-µs/op is the proxy process's CPU time (/proc) per tunnel: the figure
// the injector's default (INJECT_SIDECAR_GOMAXPROCS=1) rests on.
func BenchmarkSequentialCONNECT(b *testing.B) {
	for _, tc := range []struct {
		name, prefix string
		env          []string
	}{
		{"gomaxprocs=default", "egsqd", nil},
		{"gomaxprocs=1", "egsq1", []string{"GOMAXPROCS=1"}},
	} {
		b.Run(tc.name, func(b *testing.B) {
			ns := ownNS(b, tc.prefix)
			echo := echoListener(b, ns)
			policy := filepath.Join(b.TempDir(), "policy.yaml")
			if err := os.WriteFile(policy, []byte(loopbackPolicy("")), 0o644); err != nil {
				b.Fatal(err)
			}
			p := startLimited(b, ns, 4096, policy, tc.env...)
			buf := make([]byte, 1)
			tunnel := func() {
				c, br, err := connectThrough(ns, echo, 10*time.Second)
				if err != nil {
					b.Fatal(err)
				}
				defer c.Close()
				if _, err := c.Write([]byte("x")); err != nil {
					b.Fatal(err)
				}
				if _, err := io.ReadFull(br, buf); err != nil || buf[0] != 'x' {
					b.Fatalf("echo: %q %v", buf, err)
				}
			}
			for range 50 { // warm-up: the first tunnels grow pools and stacks
				tunnel()
			}
			cpu0 := procCPU(b, p.PID())
			for b.Loop() {
				tunnel()
			}
			b.ReportMetric(float64((procCPU(b, p.PID())-cpu0).Microseconds())/float64(b.N), "proxy-cpu-µs/op")
		})
	}
}

// procCPU is a process's user and system CPU time so far (/proc/PID/stat, in clock ticks of
// 10 ms: run enough tunnels for the figure to mean something).
func procCPU(tb testing.TB, pid int) time.Duration {
	tb.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		tb.Fatal(err)
	}
	// The command name (field 2) may hold spaces: count fields after its closing parenthesis.
	fs := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	utime, err1 := strconv.ParseInt(fs[11], 10, 64)
	stime, err2 := strconv.ParseInt(fs[12], 10, 64)
	if err1 != nil || err2 != nil {
		tb.Fatalf("/proc/%d/stat: %q", pid, b)
	}
	return time.Duration(utime+stime) * 10 * time.Millisecond
}
