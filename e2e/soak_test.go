package e2e

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/egress-guard/egress-guard/internal/netlab"
)

// The soak tests run only with SOAK=1 (make soak): 10,000 tunnels through the real gateway,
// minutes of wall time.
//
//	SOAK=1 go test -count=1 -run TestSoak -v -timeout 20m ./e2e/
//
// Knobs: SOAK_DURATION (60s), how long the policy is rewritten under load; SOAK_TUNNELS
// (10000).
func soakParams(t *testing.T) (tunnels int, duration time.Duration) {
	t.Helper()
	if os.Getenv("SOAK") != "1" {
		t.Skip("soak test: runs only with SOAK=1 (make soak)")
	}
	tunnels, duration = 10000, 60*time.Second
	if v := os.Getenv("SOAK_TUNNELS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 2 {
			t.Fatalf("SOAK_TUNNELS=%q: want a number >= 2", v)
		}
		tunnels = n
	}
	if v := os.Getenv("SOAK_DURATION"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			t.Fatalf("SOAK_DURATION=%q: want a positive duration", v)
		}
		duration = d
	}
	return tunnels, duration
}

// Descriptors the proxy needs per tunnel: at least its two sockets; a tunnel whose bytes go
// through splice(2) also holds a pipe (two descriptors) per direction while it waits (measured
// with the relay that spliced from the first byte: 1,000 tunnels held 2,000 sockets and 4,000
// pipe descriptors).
const (
	proxyFDsPerTunnelMin = 2
	proxyFDsPerTunnelMax = 6
)

// soakNofile raises this process's descriptor limit for n tunnels (the client end of each and
// the echo server's end) and returns the limit to give the proxy: enough for every tunnel to
// splice when the hard limit allows it, and never less than its sockets need. Raising a hard
// limit needs CAP_SYS_RESOURCE; without it everything must fit under the current one.
func soakNofile(t *testing.T, n int) (proxy int) {
	t.Helper()
	own := uint64(2*n + 1024)
	proxyMin, proxyMax := uint64(proxyFDsPerTunnelMin*n+512), uint64(proxyFDsPerTunnelMax*n+512)
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if want := max(own, proxyMax); lim.Max < want {
		raised := syscall.Rlimit{Cur: lim.Cur, Max: want}
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &raised); err == nil {
			lim = raised
		} else {
			t.Logf("hard open-file limit %d, not raised to %d: %v (no CAP_SYS_RESOURCE?)", lim.Max, want, err)
		}
	}
	if lim.Max < max(own, proxyMin) {
		t.Fatalf("%d tunnels need %d descriptors here and at least %d in the proxy (%d to %d per tunnel); the hard limit is %d: raise ulimit -Hn, or run fewer with SOAK_TUNNELS=%d",
			n, own, proxyMin, proxyFDsPerTunnelMin, proxyFDsPerTunnelMax, lim.Max, (lim.Max-1024)/2)
	}
	lim.Cur = max(lim.Cur, own)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	return int(min(proxyMax, lim.Max))
}

// soakTunnel is one CONNECT tunnel to the echo server.
type soakTunnel struct {
	c   net.Conn
	br  *bufio.Reader
	buf [8]byte
}

// echo sends 8 bytes and reads them back.
func (s *soakTunnel) echo(seq int) error {
	msg := fmt.Sprintf("%08d", seq%100000000)
	s.c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.WriteString(s.c, msg); err != nil {
		return err
	}
	if _, err := io.ReadFull(s.br, s.buf[:]); err != nil {
		return err
	}
	if string(s.buf[:]) != msg {
		return fmt.Errorf("echo %q, want %q", s.buf[:], msg)
	}
	return nil
}

// finish ends the tunnel normally: a last message, a half-close, its echo and the end of the
// stream from the other side.
func (s *soakTunnel) finish() error {
	defer s.c.Close()
	s.c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.WriteString(s.c, "bye!"); err != nil {
		return err
	}
	if err := s.c.(*net.TCPConn).CloseWrite(); err != nil {
		return err
	}
	rest, err := io.ReadAll(s.br)
	if err != nil {
		return err
	}
	if string(rest) != "bye!" {
		return fmt.Errorf("last echo %q, want \"bye!\"", rest)
	}
	return nil
}

// inParallel runs f(i) for every i in [0, n) on workers goroutines, each taking the next i
// in turn, and returns when all have returned.
func inParallel(n, workers int, f func(i int)) {
	var next atomic.Int64
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := int(next.Add(1)) - 1; i < n; i = int(next.Add(1)) - 1 {
				f(i)
			}
		}()
	}
	wg.Wait()
}

// openTunnels opens n tunnels to echo through the proxy in ns, with a few openers at a time,
// each carrying one echo before it counts as open.
func openTunnels(t *testing.T, ns *netlab.NS, echo string, n int) []*soakTunnel {
	t.Helper()
	start := time.Now()
	tunnels := make([]*soakTunnel, n)
	var failed atomic.Int64
	var firstErr sync.Once
	inParallel(n, 32, func(i int) {
		if failed.Load() > 0 {
			return // after the first failure, open no more
		}
		c, br, err := connectThrough(ns, echo, 30*time.Second)
		if err == nil {
			tunnels[i] = &soakTunnel{c: c, br: br}
			err = tunnels[i].echo(i)
		}
		if err != nil {
			failed.Add(1)
			firstErr.Do(func() { t.Errorf("opening tunnel %d: %v", i, err) })
		}
	})
	if failed.Load() > 0 {
		for _, s := range tunnels {
			if s != nil {
				s.c.Close()
			}
		}
		t.FailNow()
	}
	t.Logf("%d tunnels open in %v", n, time.Since(start).Round(time.Millisecond))
	return tunnels
}

// cut is a tunnel that failed: which, when, why.
type cut struct {
	i   int
	at  time.Time
	err error
}

// traffic echoes 8 bytes on every tunnel about once a second until ctx ends (workers each own
// a share of the tunnels and go through it in turn). A tunnel whose echo fails is reported
// once and left alone afterwards. wait returns when every worker has stopped.
func traffic(ctx context.Context, tunnels []*soakTunnel, workers int, report func(cut)) (rounds *atomic.Int64, wait func()) {
	rounds = new(atomic.Int64)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			dead := map[int]bool{}
			for seq := 1; ; seq++ {
				round := time.Now()
				alive := 0
				for i := w; i < len(tunnels); i += workers {
					if dead[i] {
						continue
					}
					if err := tunnels[i].echo(seq*len(tunnels) + i); err != nil {
						dead[i] = true
						report(cut{i, time.Now(), err})
						continue
					}
					alive++
				}
				rounds.Add(1)
				if alive == 0 {
					return
				}
				select {
				case <-ctx.Done():
					return
				case <-time.After(time.Until(round.Add(time.Second))):
				}
			}
		}()
	}
	return rounds, wg.Wait
}

// usage is one sample of the proxy's resources.
type usage struct {
	rssKiB     int64
	goroutines float64
	sockets    int     // socket descriptors
	pipes      int     // pipe descriptors: splice(2)'s pipes, pooled by the Go runtime until a GC
	heapMiB    float64 // go_memstats_heap_inuse_bytes
	gcs        float64 // go_gc_duration_seconds_count
}

func (u usage) String() string {
	return fmt.Sprintf("RSS %7.1f MiB  goroutines %6.0f  sockets %6d  pipe fds %6d  heap in use %6.1f MiB  GCs %4.0f",
		float64(u.rssKiB)/1024, u.goroutines, u.sockets, u.pipes, u.heapMiB, u.gcs)
}

func (u *usage) peak(v usage) {
	u.rssKiB, u.goroutines, u.heapMiB = max(u.rssKiB, v.rssKiB), max(u.goroutines, v.goroutines), max(u.heapMiB, v.heapMiB)
	u.sockets, u.pipes, u.gcs = max(u.sockets, v.sockets), max(u.pipes, v.pipes), max(u.gcs, v.gcs)
}

// sampleProxy reads the proxy's RSS and descriptors from /proc and its goroutines, heap and
// GC count from its /metrics (in ns).
func sampleProxy(t *testing.T, ns *netlab.NS, pid int) usage {
	t.Helper()
	u := usage{rssKiB: procRSS(pid)}
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	if ents, err := os.ReadDir(dir); err == nil {
		for _, e := range ents {
			target, _ := os.Readlink(filepath.Join(dir, e.Name()))
			switch {
			case strings.HasPrefix(target, "socket:"):
				u.sockets++
			case strings.HasPrefix(target, "pipe:"):
				u.pipes++
			}
		}
	}
	body, err := scrape(ns, nsMetricsAddr)
	if err != nil {
		t.Errorf("GET /metrics: %v", err)
		return u
	}
	u.goroutines, _ = sample(body, "go_goroutines")
	heap, _ := sample(body, "go_memstats_heap_inuse_bytes")
	u.heapMiB = heap / (1 << 20)
	u.gcs, _ = sample(body, "go_gc_duration_seconds_count")
	return u
}

// closeReasons counts the close lines after mark by reason.
func closeReasons(p *netlab.Process, mark int) (map[string]int, int) {
	out := map[string]int{}
	total := 0
	for _, r := range p.RecordsAfter(mark, "close") {
		out[fmt.Sprint(r["reason"])]++
		total++
	}
	return out, total
}

// waitCloseLines waits until n close lines were written after mark.
func waitCloseLines(t *testing.T, p *netlab.Process, mark, n int, timeout time.Duration) map[string]int {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		reasons, total := closeReasons(p, mark)
		if total >= n || time.Now().After(deadline) {
			if total != n {
				t.Errorf("%d close lines, want %d: %v", total, n, reasons)
			}
			return reasons
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// TestSoak: 10,000 live tunnels through the real gateway, (a) carrying traffic while the
// policy is rewritten every second, then closed, with the proxy's RSS and goroutines back
// near their baseline; (b) SIGTERM with 10,000 live tunnels: /ready false at once, half the
// tunnels finish normally within the drain budget, the rest are closed at its deadline, and
// every one has its close line.
func TestSoak(t *testing.T) {
	n, duration := soakParams(t)
	nofile := soakNofile(t, n)
	t.Run("ReloadUnderLoad", func(t *testing.T) { soakReload(t, n, nofile, duration) })
	t.Run("SIGTERMDrain", func(t *testing.T) { soakDrain(t, n, nofile) })
}

// Tolerances of "back near the baseline" once every tunnel is closed.
const (
	goroutineSlack = 25       // goroutines above the baseline
	heapSlackMiB   = 16       // heap in use above the baseline after two GCs, MiB
	rssSlackKiB    = 32 << 10 // RSS above the baseline after two GCs, KiB, at least (see soakReload)
	// The runtime keeps every goroutine descriptor it created, for reuse: up to three per
	// tunnel while tunnels open (about 450 bytes each).
	runtimeKiBPerTunnel = 2
	cycleGrowthMiB      = 2 // heap growth allowed from one cycle of tunnels to the next
)

// finishAll checks that every tunnel still echoes, then finishes it normally.
func finishAll(t *testing.T, tunnels []*soakTunnel) {
	var finishErrs atomic.Int64
	inParallel(len(tunnels), 64, func(i int) {
		err := tunnels[i].echo(i)
		if err == nil {
			err = tunnels[i].finish()
		}
		if err != nil && finishErrs.Add(1) <= 5 {
			t.Errorf("tunnel %d at the end: %v", i, err)
		}
	})
}

// waitTwoGCs samples the proxy until two GCs after gcs have run and ok holds, or 6 minutes
// passed (the runtime forces a GC every 2 minutes when nothing else starts one).
func waitTwoGCs(t *testing.T, ns *netlab.NS, pid int, gcs float64, ok func(usage) bool) usage {
	start := time.Now()
	for {
		u := sampleProxy(t, ns, pid)
		if u.gcs >= gcs+2 && ok(u) || time.Since(start) > 6*time.Minute {
			return u
		}
		time.Sleep(2 * time.Second)
	}
}

func soakReload(t *testing.T, n, nofile int, duration time.Duration) {
	ns := ownNS(t, "egsk")
	echo := echoListener(t, ns)
	dir := t.TempDir()
	policy := filepath.Join(dir, "policy.yaml")
	os.WriteFile(policy, []byte(loopbackPolicy("")), 0o644)
	p := startLimited(t, ns, nofile, policy, "MAX_TUNNELS="+strconv.Itoa(2*n),
		"MAX_PENDING_PER_CLIENT=1000", "WATCH_INTERVAL=250ms")
	time.Sleep(2 * time.Second)
	base := sampleProxy(t, ns, p.PID())
	reloads0 := metricIn(t, ns, nsMetricsAddr, "egress_proxy_config_reloads_total")

	lg := from(p)
	tunnels := openTunnels(t, ns, echo, n)
	opened := sampleProxy(t, ns, p.PID())

	var cuts []cut
	var cutMu sync.Mutex
	ctx, stop := context.WithCancel(context.Background())
	rounds, wait := traffic(ctx, tunnels, 100, func(c cut) {
		cutMu.Lock()
		cuts = append(cuts, c)
		cutMu.Unlock()
	})
	// The policy changes every second (a new rule beside the one the tunnels use): each change
	// makes the proxy re-check every open tunnel, and none may be cut.
	peak := opened
	writes := 0
	start := time.Now()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for ; time.Since(start) < duration; <-tick.C {
		writes++
		tmp := policy + ".tmp"
		os.WriteFile(tmp, []byte(loopbackPolicy(fmt.Sprintf(`, "rev-%d.example.com"`, writes))), 0o644)
		if err := os.Rename(tmp, policy); err != nil {
			t.Fatal(err)
		}
		peak.peak(sampleProxy(t, ns, p.PID()))
	}
	stop()
	wait()
	time.Sleep(time.Second) // the last write is applied after 250ms of calm
	reloads := metricIn(t, ns, nsMetricsAddr, "egress_proxy_config_reloads_total") - reloads0
	loadErrors := metricIn(t, ns, nsMetricsAddr, "egress_proxy_config_load_errors_total")
	active := metricIn(t, ns, nsMetricsAddr, "egress_proxy_active_tunnels")

	// Every tunnel still works, then finishes normally.
	finishAll(t, tunnels)
	reasons := waitCloseLines(t, p, lg.mark, n, 60*time.Second)

	// Back near the baseline: goroutines within goroutineSlack within 10s.
	var after usage
	settle := time.Now()
	for {
		after = sampleProxy(t, ns, p.PID())
		if after.goroutines <= base.goroutines+goroutineSlack || time.Since(settle) > 10*time.Second {
			break
		}
		time.Sleep(250 * time.Millisecond)
	}
	settled := time.Since(settle).Round(time.Millisecond)
	// Memory is another matter: what 10,000 closed tunnels used is garbage until the next GC,
	// and with the traffic gone nothing allocates enough to start one before the runtime
	// forces one (2 minutes after the last); what they returned to sync.Pools (request-head
	// readers, relay buffers) survives that GC in the pools' victim caches and goes at the
	// next; the freed pages then return to the system over seconds. So RSS and the heap are
	// judged after two GCs, waiting for the runtime's own (up to 6 minutes).
	// What stays is mostly the runtime's own: it keeps every goroutine it ever created (a few
	// hundred bytes each, in the heap) and every socket's poller descriptor; hence the slack.
	// Since the goroutine that decides a tunnel hands the relay to two fresh ones, up to three
	// goroutines per tunnel exist while tunnels open: runtimeKiBPerTunnel covers their kept
	// descriptors. Whether anything else stays is what the second cycle below tells.
	rssSlack := max(rssSlackKiB, (peak.rssKiB-base.rssKiB)/4) + int64(n*runtimeKiBPerTunnel)
	heapSlack := float64(heapSlackMiB) + float64(n*runtimeKiBPerTunnel)/1024
	gcWait := time.Now()
	afterGC := waitTwoGCs(t, ns, p.PID(), after.gcs, func(u usage) bool {
		return u.rssKiB <= base.rssKiB+rssSlack && u.heapMiB <= base.heapMiB+heapSlack
	})
	gcWaited := time.Since(gcWait).Round(time.Second)

	// A second cycle of as many tunnels, opened and closed: what the runtime kept from the
	// first is reused, so the heap after two more GCs must not grow; state kept per closed
	// tunnel (a leak) would add itself again.
	lg2 := from(p)
	finishAll(t, openTunnels(t, ns, echo, n))
	waitCloseLines(t, p, lg2.mark, n, 60*time.Second)
	afterGC2 := waitTwoGCs(t, ns, p.PID(), sampleProxy(t, ns, p.PID()).gcs, func(u usage) bool {
		return u.heapMiB <= afterGC.heapMiB+cycleGrowthMiB
	})

	t.Logf("soak: %d tunnels, %v of policy rewrites every second (%d writes, %d reloads applied, %d load errors), %d traffic rounds (%d echoes per tunnel), %d cut",
		n, duration, writes, int(reloads), int(loadErrors), rounds.Load(), rounds.Load()/100, len(cuts))
	t.Logf("%-28s %s", "baseline", base)
	t.Logf("%-28s %s", "tunnels open", opened)
	t.Logf("%-28s %s", "peak (under traffic+reload)", peak)
	t.Logf("%-28s %s (goroutines settled in %v)", "after close", after, settled)
	t.Logf("%-28s %s (%v after the settle)", "after close and 2 GCs", afterGC, gcWaited)
	t.Logf("%-28s %s", "second cycle, 2 GCs later", afterGC2)
	t.Logf("tolerances: goroutines baseline+%d; sockets baseline+2; after 2 GCs, heap in use baseline+%.0f MiB, RSS baseline+%.0f MiB (%d MiB or a quarter of the growth to the peak, plus %d KiB per tunnel); a second cycle grows the heap by at most %d MiB",
		goroutineSlack, heapSlack, float64(rssSlack)/1024, rssSlackKiB>>10, runtimeKiBPerTunnel, cycleGrowthMiB)
	t.Logf("close lines: %v; active tunnels at the end of the soak: %v", reasons, active)

	cutMu.Lock()
	for i, c := range cuts {
		if i < 10 {
			t.Errorf("tunnel %d cut at +%v: %v", c.i, c.at.Sub(start).Round(time.Millisecond), c.err)
		}
	}
	cutMu.Unlock()
	if len(cuts) > 0 {
		t.Errorf("%d of %d tunnels cut during the soak", len(cuts), n)
	}
	if reasons["closed"] != n {
		t.Errorf("close reasons %v, want %d closed", reasons, n)
	}
	if int(active) != n {
		t.Errorf("egress_proxy_active_tunnels = %v during the soak, want %d", active, n)
	}
	if loadErrors != 0 || reloads < float64(writes)/2 {
		t.Errorf("%d policy writes: %v reloads, %v load errors; want at least half applied and no error", writes, reloads, loadErrors)
	}
	if after.goroutines > base.goroutines+goroutineSlack {
		t.Errorf("goroutines after close %v, baseline %v: more than %d above it 10s after the last tunnel closed", after.goroutines, base.goroutines, goroutineSlack)
	}
	if afterGC.gcs < after.gcs+2 {
		t.Errorf("no two GCs within %v after the tunnels closed (GCs %v then %v)", gcWaited, after.gcs, afterGC.gcs)
	}
	if afterGC.heapMiB > base.heapMiB+heapSlack {
		t.Errorf("heap in use after close and 2 GCs %.1f MiB, baseline %.1f MiB: more than %.0f MiB above it", afterGC.heapMiB, base.heapMiB, heapSlack)
	}
	if afterGC2.heapMiB > afterGC.heapMiB+cycleGrowthMiB {
		t.Errorf("heap in use after a second cycle of %d tunnels %.1f MiB, after the first %.1f MiB: grew by more than %d MiB (state kept per closed tunnel)",
			n, afterGC2.heapMiB, afterGC.heapMiB, cycleGrowthMiB)
	}
	if afterGC2.goroutines > base.goroutines+goroutineSlack {
		t.Errorf("goroutines after the second cycle %v, baseline %v", afterGC2.goroutines, base.goroutines)
	}
	if afterGC.rssKiB > base.rssKiB+rssSlack {
		t.Errorf("RSS after close and 2 GCs %d KiB, baseline %d KiB: more than %d MiB above it", afterGC.rssKiB, base.rssKiB, rssSlack>>10)
	}
	// The sockets of every tunnel are closed (the /metrics request's own socket aside).
	if after.sockets > base.sockets+2 {
		t.Errorf("sockets after close %d, baseline %d", after.sockets, base.sockets)
	}
}

func soakDrain(t *testing.T, n, nofile int) {
	const budget = 15 * time.Second
	ns := ownNS(t, "egdr")
	echo := echoListener(t, ns)
	policy := filepath.Join(t.TempDir(), "policy.yaml")
	os.WriteFile(policy, []byte(loopbackPolicy("")), 0o644)
	// DRAIN_IDLE_TIMEOUT above the budget: this test is about the budget's deadline, and a
	// tunnel whose once-a-second echo came late on a busy machine must not be closed as idle.
	p := startLimited(t, ns, nofile, policy, "MAX_TUNNELS="+strconv.Itoa(2*n),
		"MAX_PENDING_PER_CLIENT=1000", "DRAIN_TIMEOUT="+budget.String(), "DRAIN_IDLE_TIMEOUT=1m")
	lg := from(p)
	tunnels := openTunnels(t, ns, echo, n)
	// Even tunnels finish during the drain; odd ones go on until the deadline closes them.
	var finishers, stayers []*soakTunnel
	for i, s := range tunnels {
		if i%2 == 0 {
			finishers = append(finishers, s)
		} else {
			stayers = append(stayers, s)
		}
	}
	var mu sync.Mutex
	var early, atDeadline []cut
	var sigAt time.Time
	finCtx, stopFinishers := context.WithCancel(context.Background())
	_, waitFinishers := traffic(finCtx, finishers, 50, func(c cut) {
		mu.Lock()
		early = append(early, c)
		mu.Unlock()
	})
	stayCtx, stopStayers := context.WithCancel(context.Background())
	defer stopStayers()
	_, waitStayers := traffic(stayCtx, stayers, 50, func(c cut) {
		mu.Lock()
		defer mu.Unlock()
		// The deadline closes them: a cut is on time when it is seen after the budget (less a
		// margin for the signal's delivery), and is a close (EOF or reset), not a timeout.
		var ne net.Error
		timeout := errors.As(c.err, &ne) && ne.Timeout()
		if !sigAt.IsZero() && c.at.Sub(sigAt) >= budget-500*time.Millisecond && !timeout {
			atDeadline = append(atDeadline, c)
		} else {
			early = append(early, c)
		}
	})
	time.Sleep(3 * time.Second) // a few rounds of traffic first
	peak := sampleProxy(t, ns, p.PID())

	mu.Lock()
	sigAt = time.Now()
	mu.Unlock()
	if err := p.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	// /ready turns false at once.
	var notReady time.Duration
	for {
		code, body, err := netlab.HTTPGet(context.Background(), ns, "http://"+nsMetricsAddr+"/ready")
		if code == http.StatusServiceUnavailable {
			notReady = time.Since(sigAt)
			break
		}
		if time.Since(sigAt) > 5*time.Second {
			t.Fatalf("/ready still not 503 5s after SIGTERM (last: %d %q %v)", code, body, err)
		}
		time.Sleep(5 * time.Millisecond)
	}

	// Half the tunnels finish normally, from 1s after the signal, well within the budget.
	time.Sleep(time.Second)
	stopFinishers()
	waitFinishers()
	var finished, finishFailed atomic.Int64
	var lastFinish atomic.Int64
	inParallel(len(finishers), 64, func(i int) {
		if err := finishers[i].finish(); err != nil {
			if finishFailed.Add(1) <= 5 {
				t.Errorf("finishing tunnel %d during the drain: %v", 2*i, err)
			}
			return
		}
		finished.Add(1)
		lastFinish.Store(int64(time.Since(sigAt)))
	})
	finishedBy := time.Duration(lastFinish.Load())

	// The stayers are closed at the deadline; the process then exits 0.
	waitStayers()
	exited, err := p.Wait(budget + 30*time.Second)
	exitAfter := time.Since(sigAt)
	if !exited || err != nil {
		t.Fatalf("exit after the drain: exited=%v err=%v", exited, err)
	}
	reasons, total := closeReasons(p, lg.mark)
	draining := p.RecordsAfter(lg.mark, "draining")

	mu.Lock()
	defer mu.Unlock()
	t.Logf("SIGTERM with %d live tunnels (budget %v): /ready 503 after %v; draining line %v", n, budget, notReady.Round(time.Millisecond), draining)
	t.Logf("finished normally: %d (the last %v after the signal); closed at the deadline: %d; cut early or failed: %d+%d; exit %v after the signal",
		finished.Load(), finishedBy.Round(time.Millisecond), len(atDeadline), len(early), finishFailed.Load(), exitAfter.Round(time.Millisecond))
	t.Logf("close lines: %d in all, by reason %v; proxy before the signal: %s", total, reasons, peak)
	for i, c := range early {
		if i < 10 {
			t.Errorf("tunnel cut %v after the signal (before the deadline, or by a timeout): %v", c.at.Sub(sigAt).Round(time.Millisecond), c.err)
		}
	}
	if notReady > time.Second {
		t.Errorf("/ready turned 503 only %v after SIGTERM", notReady)
	}
	if finishedBy > budget {
		t.Errorf("finishing took until %v after the signal, beyond the budget %v", finishedBy, budget)
	}
	if int(finished.Load()) != len(finishers) || len(atDeadline) != len(stayers) || len(early) != 0 || finishFailed.Load() != 0 {
		t.Errorf("finished %d of %d, closed at the deadline %d of %d, early %d, failed %d", finished.Load(), len(finishers),
			len(atDeadline), len(stayers), len(early), finishFailed.Load())
	}
	if reasons["closed"] != int(finished.Load()) || reasons["drain"] != len(atDeadline) || total != n {
		t.Errorf("close lines %v (%d in all): want closed = %d finished, drain = %d closed at the deadline, %d in all",
			reasons, total, finished.Load(), len(atDeadline), n)
	}
	if exitAfter > budget+10*time.Second {
		t.Errorf("exited %v after the signal, budget %v", exitAfter, budget)
	}
}
