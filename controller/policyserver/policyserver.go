// Package policyserver gives each sidecar its own identity's policy. A sidecar authenticates
// with its projected ServiceAccount token; the server verifies it (TokenReview, cached), maps
// the ServiceAccount to the identity that selects it, and answers with that identity's rules
// only (policy.Document: never another identity's entries, never an API key).
//
// The protocol is plain HTTP caching semantics, held open for pushes:
//
//	GET /v1/policy?wait=30s
//	Authorization: Bearer <token>
//	If-None-Match: "<hash the sidecar has>"
//
// answers 200 with the document, its hash as ETag and the identity in X-Egress-Guard-Identity,
// or, when the sidecar is current, holds the request until the identity's rules change (then
// 200) or the wait ends (304 Not Modified). A policy edit therefore reaches every waiting
// sidecar as soon as the control plane loads it.
package policyserver

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/egress-guard/egress-guard/pkg/contract"
	"github.com/egress-guard/egress-guard/pkg/policy"
	"github.com/egress-guard/egress-guard/pkg/tokenreview"
)

// Path is where sidecars ask for their policy; IdentityHeader names the identity served.
const (
	Path           = contract.PolicyPath
	IdentityHeader = contract.IdentityHeader
)

// Authenticator verifies a sidecar's token.
type Authenticator interface {
	Authenticate(ctx context.Context, token string) tokenreview.Result
}

// Server is the policy endpoint. Call SetPolicy with every policy the watcher loads.
type Server struct {
	Auth    Authenticator
	MaxWait time.Duration // cap on the wait a sidecar asks for (default 60s)
	Metrics *Metrics
	Log     *slog.Logger

	mu       sync.Mutex
	gen      *generation
	stopping chan struct{} // closed by Stop
}

// Stop ends every waiting request at once (answered 503, so that sidecars go to another
// replica without waiting out their long-poll): http.Server.Shutdown waits for handlers.
func (s *Server) Stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopping == nil {
		s.stopping = make(chan struct{})
	}
	select {
	case <-s.stopping:
	default:
		close(s.stopping)
	}
}

func (s *Server) stopped() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopping == nil {
		s.stopping = make(chan struct{})
	}
	return s.stopping
}

// generation is one loaded policy, its documents, and the channel closed when the next one
// replaces it.
type generation struct {
	pol     *policy.Policy
	docs    map[string]document
	changed chan struct{}
}

type document struct {
	body []byte
	etag string
}

// SetPolicy makes p the policy served, and wakes every waiting sidecar (each goes back to
// sleep if its own identity's rules did not change).
func (s *Server) SetPolicy(p *policy.Policy) {
	g := &generation{pol: p, docs: map[string]document{}, changed: make(chan struct{})}
	for _, id := range p.Identities() {
		body, err := p.Document(id.Name)
		if err != nil {
			continue // cannot happen: the identity is in p
		}
		sum := sha256.Sum256(body)
		g.docs[id.Name] = document{body: body, etag: `"` + hex.EncodeToString(sum[:8]) + `"`}
	}
	s.mu.Lock()
	old := s.gen
	s.gen = g
	s.mu.Unlock()
	if old != nil {
		close(old.changed)
	}
}

func (s *Server) current() *generation {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.gen
}

// Ready reports whether a policy is loaded.
func (s *Server) Ready() bool { return s.current() != nil }

// ServeHTTP implements the protocol in the package comment.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet {
		w.Header().Set("Allow", "GET")
		s.fail(w, http.StatusMethodNotAllowed, "method_not_allowed", "GET only")
		return
	}
	scheme, token, _ := strings.Cut(r.Header.Get("Authorization"), " ")
	if !strings.EqualFold(scheme, "Bearer") || strings.TrimSpace(token) == "" {
		s.authFailed(w, "missing_token")
		return
	}
	res := s.Auth.Authenticate(r.Context(), strings.TrimSpace(token))
	if !res.OK() {
		if res.Failure == tokenreview.FailureUnavailable {
			s.Metrics.AuthFailures.WithLabelValues(string(res.Failure)).Inc()
			s.fail(w, http.StatusServiceUnavailable, string(res.Failure), "the token cannot be verified now")
			return
		}
		s.authFailed(w, string(res.Failure))
		return
	}
	wait := s.wait(r)
	var deadline <-chan time.Time
	if wait > 0 {
		t := time.NewTimer(wait)
		defer t.Stop()
		deadline = t.C
	}
	waiting := false
	defer func() {
		if waiting {
			s.Metrics.Waiting.Dec()
		}
	}()
	for {
		g := s.current()
		if g == nil {
			s.fail(w, http.StatusServiceUnavailable, "no_policy", "no policy loaded yet")
			return
		}
		id := g.pol.IdentityForServiceAccount(res.Namespace, res.ServiceAccount)
		if id == nil {
			s.Metrics.AuthFailures.WithLabelValues("unmapped_service_account").Inc()
			s.fail(w, http.StatusForbidden, "unmapped_service_account",
				"no identity selects ServiceAccount "+res.Namespace+"/"+res.ServiceAccount)
			return
		}
		doc := g.docs[id.Name]
		if r.Header.Get("If-None-Match") != doc.etag {
			w.Header().Set("ETag", doc.etag)
			w.Header().Set(IdentityHeader, id.Name)
			w.Header().Set("Content-Type", "application/json")
			w.Header().Set("Cache-Control", "no-store")
			w.Write(doc.body)
			s.Metrics.Requests.WithLabelValues("served").Inc()
			return
		}
		if deadline == nil {
			s.notModified(w, doc.etag)
			return
		}
		if !waiting {
			waiting = true
			s.Metrics.Waiting.Inc()
		}
		select {
		case <-g.changed:
			// A new policy: serve it if this identity's rules changed, else wait on.
		case <-deadline:
			s.notModified(w, doc.etag)
			return
		case <-s.stopped():
			s.fail(w, http.StatusServiceUnavailable, "shutting_down", "this replica is shutting down")
			return
		case <-r.Context().Done():
			return
		}
	}
}

func (s *Server) notModified(w http.ResponseWriter, etag string) {
	w.Header().Set("ETag", etag)
	w.WriteHeader(http.StatusNotModified)
	s.Metrics.Requests.WithLabelValues("not_modified").Inc()
}

func (s *Server) authFailed(w http.ResponseWriter, reason string) {
	s.Metrics.AuthFailures.WithLabelValues(reason).Inc()
	w.Header().Set("WWW-Authenticate", `Bearer realm="egress-guard"`)
	s.fail(w, http.StatusUnauthorized, reason, "a valid ServiceAccount token with the egress-guard audience is required")
}

func (s *Server) fail(w http.ResponseWriter, code int, reason, msg string) {
	s.Metrics.Requests.WithLabelValues(reason).Inc()
	http.Error(w, "egress-guard control plane: "+msg+" ("+reason+")", code)
}

// wait is the long-poll duration the sidecar asked for, capped.
func (s *Server) wait(r *http.Request) time.Duration {
	d, err := time.ParseDuration(r.URL.Query().Get("wait"))
	if err != nil || d <= 0 {
		return 0
	}
	max := s.MaxWait
	if max <= 0 {
		max = 60 * time.Second
	}
	return min(d, max)
}

// Metrics are the policy server's metrics; every label value is a fixed word.
type Metrics struct {
	Waiting      prometheus.Gauge       // sidecars holding a long-poll
	Requests     *prometheus.CounterVec // result
	AuthFailures *prometheus.CounterVec // reason
}

// NewMetrics registers the metrics on r, and the token cache's counters when cache is set.
func NewMetrics(r prometheus.Registerer, cache *tokenreview.Cache) *Metrics {
	m := &Metrics{
		Waiting: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "egress_guard_controller_sidecars_waiting",
			Help: "Sidecars holding a policy long-poll (connected and current).",
		}),
		Requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "egress_guard_controller_policy_requests_total",
			Help: "Policy requests by result (served, not_modified, or the refusal's reason).",
		}, []string{"result"}),
		AuthFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "egress_guard_controller_auth_failures_total",
			Help: "Sidecar authentication failures by reason.",
		}, []string{"reason"}),
	}
	r.MustRegister(m.Waiting, m.Requests, m.AuthFailures)
	if cache != nil {
		r.MustRegister(
			prometheus.NewCounterFunc(prometheus.CounterOpts{
				Name: "egress_guard_controller_token_reviews_total",
				Help: "TokenReviews sent to the API server.",
			}, func() float64 { n, _ := cache.Stats(); return float64(n) }),
			prometheus.NewCounterFunc(prometheus.CounterOpts{
				Name: "egress_guard_controller_token_cache_hits_total",
				Help: "Token verifications answered from the cache.",
			}, func() float64 { _, n := cache.Stats(); return float64(n) }),
		)
	}
	return m
}
