package metrics

import "testing"

// BenchmarkTunnelMetrics is what the proxy counts for one tunnel that ends normally: its
// request with the final status, its bytes each way and its close reason.
func BenchmarkTunnelMetrics(b *testing.B) {
	m := New()
	b.ReportAllocs()
	for b.Loop() {
		m.ActiveTunnels.Inc()
		m.Requests.WithLabelValues("bench", "127.0.0.0/8", "allowed").Inc()
		m.TunnelBytes.WithLabelValues("bench", "up").Add(1)
		m.TunnelBytes.WithLabelValues("bench", "down").Add(1)
		m.ConnectionsClosed.WithLabelValues("closed").Inc()
		m.ActiveTunnels.Dec()
	}
}
