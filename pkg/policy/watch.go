package policy

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// Watcher keeps the active policy current. It polls the file and compares content, not
// modification times: a ConfigMap volume swaps a symlink to a new directory, which leaves the
// path's mtime meaningless. A file that fails to load is reported and the last good policy
// stays active.
type Watcher struct {
	path     string
	interval time.Duration
	opts     Options
	report   func(*Policy, error)

	cur atomic.Pointer[Policy]

	mu       sync.Mutex // serialises loads
	lastSum  [sha256.Size]byte
	lastErr  string
	attempts int
}

// NewWatcher returns a watcher for path. report, if not nil, is called once per load attempt
// that saw new content (and for the first attempt), with the new policy or the error.
func NewWatcher(path string, interval time.Duration, opts Options, report func(*Policy, error)) *Watcher {
	if report == nil {
		report = func(*Policy, error) {}
	}
	return &Watcher{path: path, interval: interval, opts: opts, report: report}
}

// Current returns the active policy, or nil until one loaded.
func (w *Watcher) Current() *Policy { return w.cur.Load() }

// Load makes one attempt now.
func (w *Watcher) Load() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	data, err := os.ReadFile(w.path)
	if err != nil {
		err = fmt.Errorf("load policy %s: %w", w.path, err)
		// A missing file is reported once, not every interval.
		if w.attempts == 0 || err.Error() != w.lastErr {
			w.lastErr = err.Error()
			w.lastSum = [sha256.Size]byte{}
			w.attempts++
			w.report(nil, err)
		}
		return err
	}
	sum := sha256.Sum256(data)
	if w.attempts > 0 && sum == w.lastSum {
		if w.lastErr != "" {
			return fmt.Errorf("%s", w.lastErr)
		}
		return nil
	}
	w.attempts++
	w.lastSum = sum
	p, err := Parse(w.path, bytes.Clone(data), w.opts)
	if err != nil {
		err = fmt.Errorf("load policy %s: %w", w.path, err)
		w.lastErr = err.Error()
		w.report(nil, err)
		return err
	}
	w.lastErr = ""
	w.cur.Store(p)
	w.report(p, nil)
	return nil
}

// Run polls every interval until ctx is done.
func (w *Watcher) Run(ctx context.Context) {
	t := time.NewTicker(w.interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			_ = w.Load()
		}
	}
}
