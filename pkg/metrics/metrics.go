// Package metrics defines the Prometheus metrics of egress-guard.
//
// The names and labels of the first four metrics are the original egress-guard's and
// dashboards depend on them. Every label value is bounded: identities come from the
// policy (or the fixed words "unknown" and "none"), destinations are policy entries
// (or "none"), statuses and reasons are fixed words. A raw host from a client never
// becomes a label, so an unauthenticated client cannot grow the series count.
package metrics

import (
	"io"
	"log/slog"
	"net/http"

	"github.com/egress-guard/egress-guard/pkg/policy"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Policy holds the metrics of loading a policy, shared by the proxy and the control plane.
type Policy struct {
	ConfigReloads        prometheus.Counter
	ConfigLoadErrors     prometheus.Counter
	AllowedDestinations  *prometheus.GaugeVec // identity
	PolicyHash           *prometheus.GaugeVec // hash
	LastReloadSuccessful prometheus.Gauge
}

// NewPolicy registers the policy metrics on r.
func NewPolicy(r prometheus.Registerer) *Policy {
	m := &Policy{
		ConfigReloads: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "egress_proxy_config_reloads_total",
			Help: "Successful policy loads.",
		}),
		ConfigLoadErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "egress_proxy_config_load_errors_total",
			Help: "Policy loads that failed; the last good policy stays active.",
		}),
		AllowedDestinations: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "egress_proxy_allowed_destinations",
			Help: "Allowed destinations per identity in the active policy.",
		}, []string{"identity"}),
		PolicyHash: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "egress_proxy_policy_hash_info",
			Help: "1 for the hash of the active policy file (sha256 prefix).",
		}, []string{"hash"}),
		LastReloadSuccessful: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "egress_proxy_config_last_reload_successful",
			Help: "1 if the last policy load attempt succeeded, 0 if it failed.",
		}),
	}
	r.MustRegister(m.ConfigReloads, m.ConfigLoadErrors, m.AllowedDestinations, m.PolicyHash, m.LastReloadSuccessful)
	return m
}

// Metrics holds the proxy's collectors and the registry that serves them.
type Metrics struct {
	Registry *prometheus.Registry
	*Policy

	Requests          *prometheus.CounterVec // identity, destination, status
	ActiveTunnels     prometheus.Gauge
	TunnelsRejected   prometheus.Counter
	AuditWouldDeny    *prometheus.CounterVec // identity, reason
	TunnelBytes       *prometheus.CounterVec // identity, direction
	ConnectionsClosed *prometheus.CounterVec // reason
	Refusals          *prometheus.CounterVec // reason
}

// New registers every metric on a fresh registry, with the Go and process collectors.
func New() *Metrics {
	r := prometheus.NewRegistry()
	m := &Metrics{
		Registry: r,
		Policy:   NewPolicy(r),
		Requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "egress_proxy_requests_total",
			Help: "Total proxy requests by identity, matched policy destination and status.",
		}, []string{"identity", "destination", "status"}),
		ActiveTunnels: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "egress_proxy_active_tunnels",
			Help: "Open tunnels and forwarded HTTP exchanges.",
		}),
		TunnelsRejected: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "egress_proxy_tunnel_limit_rejections_total",
			Help: "Connections refused because the concurrent tunnel cap was reached.",
		}),
		AuditWouldDeny: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "egress_proxy_audit_would_deny_total",
			Help: "Connections of audit-mode identities that enforce mode would have denied.",
		}, []string{"identity", "reason"}),
		TunnelBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "egress_proxy_bytes_total",
			Help: "Bytes relayed, counted when a connection closes (direction up = client to destination).",
		}, []string{"identity", "direction"}),
		ConnectionsClosed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "egress_proxy_connections_closed_total",
			Help: "Client connections closed, by close reason (refused ones included).",
		}, []string{"reason"}),
		Refusals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "egress_proxy_refusals_total",
			Help: "Connections refused before any upstream connection, by decision reason (policy, credentials, limits, malformed requests).",
		}, []string{"reason"}),
	}
	r.MustRegister(m.Requests, m.ActiveTunnels, m.TunnelsRejected, m.AuditWouldDeny, m.TunnelBytes,
		m.ConnectionsClosed, m.Refusals,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// DNSCache exports the resolver cache's counters, read at scrape time (the resolver counts
// them itself: nothing on the connection path touches a Prometheus series for them).
func (m *Metrics) DNSCache(stats func() (hits, misses uint64)) {
	m.Registry.MustRegister(
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "egress_proxy_dns_cache_hits_total",
			Help: "Name lookups (per record type) answered from the resolver cache.",
		}, func() float64 { h, _ := stats(); return float64(h) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "egress_proxy_dns_cache_misses_total",
			Help: "Name lookups (per record type) that queried a DNS server.",
		}, func() float64 { _, mi := stats(); return float64(mi) }),
	)
}

// PolicyLoaded records a successful load of the policy with the given hash and the number
// of destinations per identity. Identities that disappeared lose their series.
func (m *Policy) PolicyLoaded(hash string, destinations map[string]int) {
	m.ConfigReloads.Inc()
	m.LastReloadSuccessful.Set(1)
	m.PolicyHash.Reset()
	m.PolicyHash.WithLabelValues(hash).Set(1)
	m.AllowedDestinations.Reset()
	for id, n := range destinations {
		m.AllowedDestinations.WithLabelValues(id).Set(float64(n))
	}
}

// PolicyLoadFailed records a rejected policy; the previous policy's series stay.
func (m *Policy) PolicyLoadFailed() {
	m.ConfigLoadErrors.Inc()
	m.LastReloadSuccessful.Set(0)
}

// Observe records a policy load attempt of a watcher, in metrics and one log line: the last
// good policy stays active on an error.
func (m *Policy) Observe(log *slog.Logger, p *policy.Policy, err error) {
	if err != nil {
		m.PolicyLoadFailed()
		log.Error("policy rejected; keeping the last good policy", "err", err.Error())
		return
	}
	counts := make(map[string]int)
	for _, id := range p.Identities() {
		counts[id.Name] = len(id.Rules)
	}
	m.PolicyLoaded(p.Hash, counts)
	log.Info("policy loaded", "path", p.Source, "hash", p.Hash, "identities", len(counts))
}

// AdminMux serves /health (the process is up), /ready (ready reports true; note, when not
// empty, is a line for the body either way) and /metrics from reg: the admin endpoints of the
// proxy and of the control plane.
func AdminMux(reg *prometheus.Registry, ready func() bool, note func() string) *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, _ *http.Request) {
		io.WriteString(w, "ok\n")
	})
	mux.HandleFunc("GET /ready", func(w http.ResponseWriter, _ *http.Request) {
		n := note()
		if n != "" {
			n = "\n" + n
		}
		if !ready() {
			http.Error(w, "not ready"+n, http.StatusServiceUnavailable)
			return
		}
		io.WriteString(w, "ready"+n+"\n")
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	return mux
}
