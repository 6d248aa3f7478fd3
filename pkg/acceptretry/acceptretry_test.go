package acceptretry

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The backoff doubles from 5ms to at most 1s, and starts over after an accept that worked.
func TestBackoffSteps(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	errEMFILE := os.NewSyscallError("accept4", syscall.EMFILE)
	var a Episode
	want := []time.Duration{5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000}
	for i, w := range want {
		if got := a.Failed(log, errEMFILE); got != w*time.Millisecond {
			t.Fatalf("failure %d: backoff %v, want %v", i+1, got, w*time.Millisecond)
		}
	}
	a.Recovered(log)
	if got := a.Failed(log, errEMFILE); got != 5*time.Millisecond {
		t.Fatalf("first backoff of a new episode: %v, want 5ms", got)
	}
}

// An episode is two lines whatever its length: its start with the error, its end with the
// count of failed accepts.
func TestEpisodeIsLoggedTwice(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewJSONHandler(&buf, nil))
	err := &net.OpError{Op: "accept", Net: "tcp", Err: os.NewSyscallError("accept4", syscall.EMFILE)}
	var a Episode
	a.Recovered(log, "listener", "policy") // no episode: no line
	for range 5 {
		a.Failed(log, err, "listener", "policy")
	}
	if !a.Failing() {
		t.Fatal("Failing() false after 5 failed accepts")
	}
	a.Recovered(log, "listener", "policy")
	if a.Failing() {
		t.Fatal("Failing() true after Recovered")
	}
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 2 {
		t.Fatalf("%d lines for an episode of 5 failures, want 2:\n%s", len(lines), buf.String())
	}
	var start, end map[string]any
	json.Unmarshal([]byte(lines[0]), &start)
	json.Unmarshal([]byte(lines[1]), &end)
	if start["msg"] != "accept failing; backing off" || start["level"] != "WARN" || start["listener"] != "policy" ||
		start["fd_exhausted"] != true || start["err"] != "accept tcp: accept4: too many open files" {
		t.Fatalf("start line: %v", start)
	}
	if end["msg"] != "accepting again" || end["level"] != "INFO" || end["listener"] != "policy" || end["failed_accepts"] != 5.0 {
		t.Fatalf("end line: %v", end)
	}
}

// Out of descriptors and timeouts are waited out; a closed listener ends the loop.
func TestRetryable(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{&net.OpError{Op: "accept", Err: os.NewSyscallError("accept4", syscall.EMFILE)}, true},
		{&net.OpError{Op: "accept", Err: os.NewSyscallError("accept4", syscall.ENFILE)}, true},
		{os.ErrDeadlineExceeded, true},
		{context.DeadlineExceeded, true},
		{net.ErrClosed, false},
		{&net.OpError{Op: "accept", Err: net.ErrClosed}, false},
		{errors.New("other"), false},
	} {
		if got := Retryable(tc.err); got != tc.want {
			t.Errorf("Retryable(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}
