package accesslog

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/egress-guard/egress-guard/pkg/outcome"
)

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func TestDecisionAndCloseLines(t *testing.T) {
	var out syncBuf
	bw := NewBufferedWriter(&out, 4096, time.Hour)
	lg := New(slog.New(slog.NewJSONHandler(bw, nil)))
	r := &Record{ID: 3, Listener: "explicit", Client: netip.MustParseAddrPort("198.18.0.1:5000"), Method: "CONNECT",
		Identity: "frontend-services", Target: "api.example.com:443", Destination: "api.example.com",
		Action: outcome.Allowed, Reason: outcome.Rule, Status: outcome.StatusAllowed, Start: time.Now()}
	lg.Decision(r)
	if out.String() != "" {
		t.Fatal("buffered line written before a flush")
	}
	r.Upstream = netip.MustParseAddrPort("198.18.1.10:443")
	r.BytesUp, r.BytesDown, r.CloseReason = 10, 20, outcome.Closed
	lg.Close(r)
	bw.Close()
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 2 {
		t.Fatalf("%d lines: %q", len(lines), out.String())
	}
	var d, c map[string]any
	json.Unmarshal([]byte(lines[0]), &d)
	json.Unmarshal([]byte(lines[1]), &c)
	if d["msg"] != "decision" || d["reason"] != "rule" || d["action"] != "allowed" || d["status"] != "allowed" ||
		d["method"] != "CONNECT" || d["protocol"] != nil || d["identity"] != "frontend-services" || d["upstream"] != nil {
		t.Errorf("decision line %v", d)
	}
	if c["msg"] != "close" || c["reason"] != "closed" || c["decision_reason"] != "rule" || c["bytes_up"] != 10.0 ||
		c["bytes_down"] != 20.0 || c["upstream"] != "198.18.1.10:443" || c["duration_ms"] == nil {
		t.Errorf("close line %v", c)
	}
}

func TestBufferedWriterFlushesOnTimeAndSize(t *testing.T) {
	var out syncBuf
	bw := NewBufferedWriter(&out, 64, 20*time.Millisecond)
	defer bw.Close()
	bw.Write([]byte("short line\n"))
	deadline := time.Now().Add(2 * time.Second)
	for out.String() == "" && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if out.String() != "short line\n" {
		t.Fatalf("not flushed on time: %q", out.String())
	}
	long := strings.Repeat("x", 50) + "\n"
	bw.Write([]byte(long))
	bw.Write([]byte(long)) // does not fit: the first is flushed whole
	if !strings.HasSuffix(out.String(), long) {
		t.Fatalf("line split or not flushed: %q", out.String())
	}
}
