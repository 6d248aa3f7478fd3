// Package acceptretry is what an accept loop does with the errors that pass: the process or
// the system out of descriptors (EMFILE, ENFILE) and the like. Returning from the loop on such
// an error would stop the listener for good (the proxy, or the control plane that every
// sidecar asks for its policy) over a moment's exhaustion; retrying at once would spin a core.
// So the loop waits, 5 ms doubling to 1 s as net/http does, and says so twice per episode
// whatever its length: when it starts, and when an accept works again, with the count.
// Per-failure lines would be one line per backoff step for as long as the descriptors stay
// taken.
package acceptretry

import (
	"errors"
	"log/slog"
	"net"
	"os"
	"syscall"
	"time"
)

// The backoff's bounds.
const (
	BackoffMin = 5 * time.Millisecond
	BackoffMax = time.Second
)

// Retryable reports whether an accept error is worth waiting out rather than ending the loop.
func Retryable(err error) bool {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, os.ErrDeadlineExceeded) {
		return true
	}
	var t interface{ Temporary() bool }
	return errors.As(err, &t) && t.Temporary()
}

// Episode is one accept loop's current run of failed accepts; the zero value is none.
type Episode struct {
	count   int
	since   time.Time
	backoff time.Duration
}

// Failed records a failed accept and returns how long to wait before the next one. The first
// failure of an episode is logged, with attrs (which listener) before the error.
func (a *Episode) Failed(log *slog.Logger, err error, attrs ...any) time.Duration {
	if a.count == 0 {
		a.since = time.Now()
		log.Warn("accept failing; backing off", append(attrs, "err", err.Error(),
			"fd_exhausted", errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE))...)
	}
	a.count++
	a.backoff = min(max(2*a.backoff, BackoffMin), BackoffMax)
	return a.backoff
}

// Failing reports whether an episode is on: the accept loop calls Recovered after an accept
// that worked only then, so that a working loop does not build the line's attributes for
// every connection.
func (a *Episode) Failing() bool { return a.count > 0 }

// Recovered ends the episode, if any, with one line.
func (a *Episode) Recovered(log *slog.Logger, attrs ...any) {
	if a.count == 0 {
		return
	}
	log.Info("accepting again", append(attrs, "failed_accepts", a.count,
		"duration_ms", time.Since(a.since).Milliseconds())...)
	*a = Episode{}
}
