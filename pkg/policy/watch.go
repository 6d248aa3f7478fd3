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
//
// A file rewritten in place can be read half-written, and a prefix of a policy may parse (a
// rule that lost its ports line allows every port). New content is therefore applied only
// once it is stable: it is read again after a settle delay, and applied when both reads are
// identical. A ConfigMap update swaps a symlink atomically, so it settles at once and is
// applied within one interval plus the settle delay.
type Watcher struct {
	path     string
	interval time.Duration
	settle   time.Duration
	opts     Options
	report   func(*Policy, error)

	cur atomic.Pointer[Policy]

	mu       sync.Mutex // serialises loads
	lastSum  [sha256.Size]byte
	lastErr  string // the last content's parse error
	readErr  string // the error of the last read, while the file cannot be read
	attempts int
}

// NewWatcher returns a watcher for path. report, if not nil, is called once per load attempt
// that saw new content (and for the first attempt), with the new policy or the error.
func NewWatcher(path string, interval time.Duration, opts Options, report func(*Policy, error)) *Watcher {
	if report == nil {
		report = func(*Policy, error) {}
	}
	return &Watcher{path: path, interval: interval, settle: DefaultSettle, opts: opts, report: report}
}

// DefaultSettle is how long new content must stay unchanged before it is applied.
const DefaultSettle = 250 * time.Millisecond

// settleRounds bounds the re-reads of one load attempt: content still changing after them is
// left for the next poll.
const settleRounds = 4

// Current returns the active policy, or nil until one loaded.
func (w *Watcher) Current() *Policy { return w.cur.Load() }

// Load makes one attempt now.
func (w *Watcher) Load() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	data, err := os.ReadFile(w.path)
	if err != nil {
		err = fmt.Errorf("load policy %s: %w", w.path, err)
		// A missing or unreadable file is reported once, not every interval. It says
		// nothing about the content last loaded, which stays remembered: the same content
		// readable again (after a transient EMFILE, or a file put back) is not a new
		// policy, so it is neither reported nor re-applied to every open tunnel.
		if w.attempts == 0 || err.Error() != w.readErr {
			w.readErr = err.Error()
			w.attempts++
			w.report(nil, err)
		}
		return err
	}
	w.readErr = ""
	sum := sha256.Sum256(data)
	if w.unchanged(sum) {
		return w.lastResult()
	}
	// New content: wait until it stops changing, so that a file caught in the middle of an
	// in-place rewrite is never applied.
	data, sum, ok := w.settled(data, sum)
	if !ok {
		// Not reported: nothing was rejected, and the next poll tries again.
		return fmt.Errorf("load policy %s: the file is still changing; will retry", w.path)
	}
	if w.unchanged(sum) {
		return w.lastResult()
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

// unchanged reports whether sum is the content of the last attempt.
func (w *Watcher) unchanged(sum [sha256.Size]byte) bool {
	return w.attempts > 0 && sum == w.lastSum
}

// lastResult is what Load returns for content it has already seen.
func (w *Watcher) lastResult() error {
	if w.lastErr != "" {
		return fmt.Errorf("%s", w.lastErr)
	}
	return nil
}

// settled re-reads the file after the settle delay until two consecutive reads are identical,
// and returns that content; ok is false if it was still changing (or could no longer be read)
// after settleRounds re-reads.
func (w *Watcher) settled(data []byte, sum [sha256.Size]byte) (_ []byte, _ [sha256.Size]byte, ok bool) {
	if w.settle <= 0 {
		return data, sum, true
	}
	for range settleRounds {
		time.Sleep(w.settle)
		again, err := os.ReadFile(w.path)
		if err != nil {
			return nil, sum, false
		}
		againSum := sha256.Sum256(again)
		if againSum == sum {
			return data, sum, true
		}
		data, sum = again, againSum
	}
	return nil, sum, false
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
