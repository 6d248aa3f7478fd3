// Package e2e runs egress-guard for real: the built binaries in network namespaces, with
// dnsmasq for DNS, TLS and HTTP servers on test addresses, iptables, and curl as the client.
// The tests need root; they skip with the reason when they cannot run, except under CI=true,
// where not running is a failure.
package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/egress-guard/egress-guard/internal/netlab"
)

var (
	binDir   string
	buildMu  sync.Mutex
	binaries = map[string]string{}
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "egress-guard-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	// Binaries run as unprivileged users too (the sidecar, the self-test's probe client).
	os.Chmod(dir, 0o755)
	binDir = dir
	code := m.Run()
	labMu.Lock()
	if lab != nil {
		lab.Down()
	}
	labMu.Unlock()
	os.RemoveAll(dir)
	os.Exit(code)
}

// require skips (or, under CI, fails) when the machine cannot run the lab.
func require(t testing.TB, commands ...string) {
	t.Helper()
	if err := netlab.Require(commands...); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("e2e cannot run: %v (CI must run the e2e tests)", err)
		}
		t.Skipf("e2e skipped: %v", err)
	}
}

// binary builds a command of this module once per test run.
func binary(t testing.TB, pkg string) string {
	t.Helper()
	buildMu.Lock()
	defer buildMu.Unlock()
	if b, ok := binaries[pkg]; ok {
		return b
	}
	root, _ := filepath.Abs("..")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	b, err := netlab.Build(ctx, root, pkg, binDir)
	if err != nil {
		t.Fatal(err)
	}
	binaries[pkg] = b
	return b
}

// The lab's hosts: every name the tests use and where it lives.
var hosts = []netlab.Host{
	{Names: []string{"api.example.com"}, V4: "198.18.1.10", V6: "fd00:18:1::10"},
	{Names: []string{"a.cdn.example.com"}, V4: "198.18.1.11"},
	{Names: []string{"cdn.example.com"}, V4: "198.18.1.12"},
	{Names: []string{"portonly.example.com"}, V4: "198.18.1.13"},
	{Names: []string{"v6only.example.com"}, V6: "fd00:18:1::14"},
	{Names: []string{"evil.test"}, V4: "198.18.1.20"},
	{Names: []string{"smtp.example.com"}, V4: "198.18.1.25"},
}

// Names that resolve to internal addresses nothing in the lab listens on.
var internalRecords = map[string][]string{
	// What a search domain would answer for api.example.com (see TestSearchList...): the
	// evil host's address.
	"api.example.com.search.test": {"198.18.1.20"},
	"meta.cdn.example.com":        {"169.254.169.254"},
	"rfc1918.cdn.example.com":     {"10.1.2.3"},
}

var (
	labMu sync.Mutex
	lab   *netlab.Lab
)

// sharedLab brings the lab up once for all tests (about a second of setup).
func sharedLab(t *testing.T) *netlab.Lab {
	t.Helper()
	require(t, "curl", "iptables")
	labMu.Lock()
	defer labMu.Unlock()
	if lab == nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		l, err := netlab.Up(ctx, fmt.Sprintf("eg%d", os.Getpid()%100000), hosts, internalRecords)
		if err != nil {
			t.Fatal(err)
		}
		lab = l
	}
	return lab
}

// scrape fetches /metrics from addr (host:port) inside ns.
func scrape(ns *netlab.NS, addr string) (string, error) {
	code, body, err := netlab.HTTPGet(context.Background(), ns, "http://"+addr+"/metrics")
	if err == nil && code != 200 {
		err = fmt.Errorf("status %d", code)
	}
	return body, err
}

// sample returns the value of the sample whose line starts with series (name{labels}) in a
// /metrics body, and whether there is one.
func sample(body, series string) (float64, bool) {
	for _, line := range strings.Split(body, "\n") {
		if strings.HasPrefix(line, series+" ") {
			var v float64
			_, err := fmt.Sscanf(line[len(series)+1:], "%g", &v)
			return v, err == nil
		}
	}
	return 0, false
}

// metricIn returns the value of series in the /metrics of addr (host:port) inside ns, or 0.
func metricIn(t testing.TB, ns *netlab.NS, addr, series string) float64 {
	t.Helper()
	body, err := scrape(ns, addr)
	if err != nil {
		t.Fatalf("GET /metrics: %v", err)
	}
	v, _ := sample(body, series)
	return v
}

// metric returns the value of the sample whose line starts with series (name{labels}), or 0.
func metric(t testing.TB, l *netlab.Lab, port int, series string) float64 {
	t.Helper()
	return metricIn(t, l.Pod, fmt.Sprintf("127.0.0.1:%d", port), series)
}

func waitMetric(t *testing.T, l *netlab.Lab, port int, series string, want float64) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		got := metric(t, l, port, series)
		if got >= want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s = %v, want >= %v", series, got, want)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func lookPath(c string) (string, error) { return exec.LookPath(c) }

// logFrom is a process's log from a mark on: the assertions made through it see only the
// lines written after the mark, so a subtest cannot pass on a line an earlier one wrote. Take
// it with from just before the action under test (the curl, the dial, the file write).
type logFrom struct {
	p    *netlab.Process
	mark int
}

// from marks p's log now.
func from(p *netlab.Process) logFrom { return logFrom{p: p, mark: p.Mark()} }

// wait waits for a line with msg after the mark whose fields have the values kv (field,
// value, field, value...) and returns the first one.
func (l logFrom) wait(t *testing.T, msg string, kv ...string) map[string]any {
	t.Helper()
	r, err := l.p.WaitRecordAfter(l.mark, msg, 5*time.Second, fields(kv...))
	if err != nil {
		t.Fatalf("want %s %v: %v", msg, kv, err)
	}
	return r
}

// decision waits for the decision line of one connection: kv must name at least its target,
// action and reason, so that no unrelated line can satisfy it.
func (l logFrom) decision(t *testing.T, kv ...string) map[string]any {
	t.Helper()
	for _, need := range []string{"target", "action", "reason"} {
		if !slices.Contains(keys(kv), need) {
			t.Fatalf("decision assertion %v does not name %q", kv, need)
		}
	}
	return l.wait(t, "decision", kv...)
}

// closeOf waits for the close line of the connection whose decision line is d (the same
// conn id) and checks that its fields have the values kv.
func (l logFrom) closeOf(t *testing.T, d map[string]any, kv ...string) map[string]any {
	t.Helper()
	conn := fmt.Sprint(d["conn"])
	if d["conn"] == nil {
		t.Fatalf("decision line without a conn id: %v", d)
	}
	return l.wait(t, "close", append([]string{"conn", conn, "target", fmt.Sprint(d["target"])}, kv...)...)
}

// none checks, after a moment for lines in flight, that no msg line was written after the
// mark.
func (l logFrom) none(t *testing.T, msg string) {
	t.Helper()
	time.Sleep(200 * time.Millisecond)
	if recs := l.p.RecordsAfter(l.mark, msg); len(recs) != 0 {
		t.Fatalf("unexpected %s lines: %v", msg, recs)
	}
}

// fields matches a record whose fields have the values kv (field, value, field, value...);
// a missing field reads as "<nil>".
func fields(kv ...string) func(map[string]any) bool {
	if len(kv)%2 != 0 {
		panic(fmt.Sprintf("fields: odd number of arguments %q", kv))
	}
	return func(m map[string]any) bool {
		for i := 0; i+1 < len(kv); i += 2 {
			if fmt.Sprint(m[kv[i]]) != kv[i+1] {
				return false
			}
		}
		return true
	}
}

func keys(kv []string) []string {
	var out []string
	for i := 0; i < len(kv); i += 2 {
		out = append(out, kv[i])
	}
	return out
}
