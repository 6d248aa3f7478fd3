package policy

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// A policy rewritten in place, as an editor or `kubectl cp` does: the watcher may read it
// between two writes. Here the first write is a prefix that parses and allows more than the
// whole file (the rule lost its ports line, so every port is allowed): it must never be
// applied; the whole file must be, by the same load attempt once it has settled.
func TestWatcherNeverAppliesAHalfWrittenFile(t *testing.T) {
	const rest = "        ports: [443]\n"
	half := "identities:\n  a:\n    api_keys: [k]\n    allowed_destinations:\n      - destination: c.example.com\n"
	full := half + rest
	hp, err := Parse("half", []byte(half), defaults)
	if err != nil {
		t.Fatalf("the prefix must parse for this test to mean anything: %v", err)
	}
	if hp.Identity("a").MatchName("c.example.com", 80) == nil {
		t.Fatal("the prefix should allow every port")
	}
	fp, err := Parse("full", []byte(full), defaults)
	if err != nil || fp.Identity("a").MatchName("c.example.com", 80) != nil {
		t.Fatalf("the whole file should allow port 443 only: %v", err)
	}

	path := filepath.Join(t.TempDir(), "policy.yaml")
	write(t, path, goodA)
	var (
		mu      sync.Mutex
		applied []string
	)
	w := NewWatcher(path, time.Hour, defaults, func(p *Policy, err error) {
		mu.Lock()
		defer mu.Unlock()
		if p != nil {
			applied = append(applied, p.Hash)
		}
	})
	w.settle = 300 * time.Millisecond
	if err := w.Load(); err != nil {
		t.Fatal(err)
	}

	// Rewrite in place: truncate, write the prefix, and the rest a moment later.
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteString(half); err != nil {
		t.Fatal(err)
	}
	loaded := make(chan error, 1)
	go func() { loaded <- w.Load() }() // reads the prefix
	time.Sleep(20 * time.Millisecond)
	if _, err := f.WriteString(rest); err != nil {
		t.Fatal(err)
	}
	if err := <-loaded; err != nil {
		t.Fatal(err)
	}

	mu.Lock()
	defer mu.Unlock()
	for _, h := range applied {
		if h == hp.Hash {
			t.Fatalf("the half-written file was applied (policies applied: %v)", applied)
		}
	}
	if cur := w.Current(); cur.Hash != fp.Hash || cur.Identity("a").MatchName("c.example.com", 80) != nil {
		t.Fatalf("active policy %s, want the whole file's %s (applied: %v)", cur.Hash, fp.Hash, applied)
	}
}

// Content that keeps changing is not applied by a load attempt, nor reported as rejected;
// a later attempt applies it once it is stable.
func TestWatcherWaitsForChangingContent(t *testing.T) {
	path := filepath.Join(t.TempDir(), "policy.yaml")
	write(t, path, goodA)
	var rep reports
	w := NewWatcher(path, time.Hour, defaults, rep.add)
	w.settle = 20 * time.Millisecond
	if err := w.Load(); err != nil {
		t.Fatal(err)
	}
	first := w.Current()

	stop := make(chan struct{})
	done := make(chan struct{})
	started := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			// Rewritten in place at a fixed length, never truncated: the file is never
			// empty or short (a truncated file that stays so past the settle delay, which a
			// loaded machine can produce, is settled content: another test's subject).
			if f, err := os.OpenFile(path, os.O_WRONLY, 0); err == nil {
				f.WriteAt([]byte(fmt.Sprintf("%s# version %09d\n", goodB, i)), 0)
				f.Close()
			}
			if i == 0 {
				close(started)
			}
			time.Sleep(2 * time.Millisecond)
		}
	}()
	<-started
	err := w.Load()
	close(stop)
	<-done
	if err == nil || !strings.Contains(err.Error(), "still changing") {
		t.Fatalf("Load of changing content: %v", err)
	}
	if w.Current() != first {
		t.Fatal("changing content was applied")
	}
	if g, b := rep.counts(); g != 1 || b != 0 {
		t.Fatalf("reports good=%d bad=%d, want 1 and 0", g, b)
	}
	if err := w.Load(); err != nil || w.Current().Identity("a").MatchName("b.example.com", 1) == nil {
		t.Fatalf("settled content not applied: %v", err)
	}
}
