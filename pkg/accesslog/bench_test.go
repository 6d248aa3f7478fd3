package accesslog

import (
	"io"
	"log/slog"
	"net/netip"
	"testing"
	"time"

	"github.com/egress-guard/egress-guard/pkg/outcome"
)

// BenchmarkAccessLogLine measures the two lines of one tunnel (decision and close) through
// the daemon's shape of logger: a JSON handler on a BufferedWriter.
func BenchmarkAccessLogLine(b *testing.B) {
	bw := NewBufferedWriter(io.Discard, 64<<10, time.Hour)
	defer bw.Close()
	lg := New(slog.New(slog.NewJSONHandler(bw, nil)))
	r := &Record{ID: 3, Listener: "explicit", Client: netip.MustParseAddrPort("127.0.0.1:41234"), Method: "CONNECT",
		Identity: "bench", Target: "127.0.0.1:36401", Destination: "127.0.0.0/8",
		Action: outcome.Allowed, Reason: outcome.Rule, Status: outcome.StatusAllowed, Start: time.Now(),
		Upstream: netip.MustParseAddrPort("127.0.0.1:36401")}
	b.ReportAllocs()
	for b.Loop() {
		lg.Decision(r)
		r.BytesUp, r.BytesDown, r.CloseReason = 1, 1, outcome.Closed
		lg.Close(r)
	}
}
