package tunnel

import (
	"github.com/egress-guard/egress-guard/pkg/outcome"
	"io"
	"net"
	"syscall"
	"testing"
	"time"
)

// cpuTime is the process's user+system CPU time so far.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkRelayShortTunnel is the life of egressbench's latency tunnel around a relay: an app
// connection and an upstream to an echo server, one byte each way, the app closes, the relay
// half-closes and ends, Done closes both. cpu-µs/op is the whole process (app, proxy side and
// echo server together); compare it between versions, not with the proxy's own figure.
func BenchmarkRelayShortTunnel(b *testing.B) {
	for _, mode := range []struct {
		name  string
		plain int64
	}{{"plain-first", plainFirst}, {"splice-only", 0}} {
		b.Run(mode.name, func(b *testing.B) {
			defer func(old int64) { plainFirst = old }(plainFirst)
			plainFirst = mode.plain
			benchShortTunnel(b)
		})
	}
}

func benchShortTunnel(b *testing.B) {
	echo, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer echo.Close()
	go func() {
		for {
			c, err := echo.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	front, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer front.Close()
	tr := NewTracker(Config{})
	buf := make([]byte, 1)
	b.ReportAllocs()
	cpu0 := cpuTime(b)
	for b.Loop() {
		app, err := net.Dial("tcp", front.Addr().String())
		if err != nil {
			b.Fatal(err)
		}
		pc, err := front.Accept()
		if err != nil {
			b.Fatal(err)
		}
		up, err := net.Dial("tcp", echo.Addr().String())
		if err != nil {
			b.Fatal(err)
		}
		c, err := tr.Add(pc.(*net.TCPConn))
		if err != nil {
			b.Fatal(err)
		}
		c.SetUpstream(up.(*net.TCPConn))
		done := make(chan struct{})
		c.Start(nil, func(int64, int64, outcome.CloseReason) {
			c.Done()
			close(done)
		})
		app.Write([]byte("x"))
		if _, err := io.ReadFull(app, buf); err != nil {
			b.Fatal(err)
		}
		app.(*net.TCPConn).CloseWrite()
		io.Copy(io.Discard, app)
		app.Close()
		<-done
	}
	b.ReportMetric(float64((cpuTime(b)-cpu0).Microseconds())/float64(b.N), "cpu-µs/op")
}
