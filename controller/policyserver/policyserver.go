// Package policyserver gives each sidecar its own identity's policy. A sidecar authenticates
// with its projected ServiceAccount token; the server verifies it (TokenReview, cached), maps
// the ServiceAccount to the identity that selects it, and answers with that identity's rules
// only (policy.Document: never another identity's entries, never an API key).
//
// The protocol is plain HTTP/1.1 caching semantics, held open for pushes:
//
//	GET /v1/policy?wait=30s
//	Authorization: Bearer <token>
//	If-None-Match: "<hash the sidecar has>"
//
// answers 200 with the document, its hash as ETag and the identity in X-Egress-Guard-Identity,
// or, when the sidecar is current, holds the request until the identity's rules change (then
// 200) or the wait ends (304 Not Modified). A policy edit therefore reaches every waiting
// sidecar as soon as the control plane loads it.
//
// A waiting sidecar costs a parked connection, not a goroutine: Serve reads requests itself
// (with net/http's parser) and, when a sidecar is current, keeps only its connection and
// identity in a table until the policy changes or its wait ends. That is what lets one control
// plane hold tens of thousands of sidecars in little memory.
package policyserver

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
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
	Log     *slog.Logger // accept failures (out of descriptors); nil discards

	mu       sync.Mutex
	gen      *generation
	waiters  map[*waiter]struct{} // parked connections of current sidecars
	stopping bool
}

// generation is one loaded policy and its documents.
type generation struct {
	pol  *policy.Policy
	docs map[string]document
}

type document struct {
	body []byte
	etag string
	// ok is the whole keep-alive 200 response, built once per policy: waking ten thousand
	// sidecars writes the same bytes ten thousand times instead of building them.
	ok []byte
}

// SetPolicy makes p the policy served, and answers every waiting sidecar whose identity's
// rules changed (or that lost its identity); the others go on waiting.
func (s *Server) SetPolicy(p *policy.Policy) {
	g := &generation{pol: p, docs: map[string]document{}}
	for _, id := range p.Identities() {
		body, err := p.Document(id.Name)
		if err != nil {
			continue // cannot happen: the identity is in p
		}
		sum := sha256.Sum256(body)
		d := document{body: body, etag: `"` + hex.EncodeToString(sum[:8]) + `"`}
		var b bytes.Buffer
		writeResponse(&b, http.StatusOK, okHeader(d, id.Name), body)
		d.ok = b.Bytes()
		g.docs[id.Name] = d
	}
	s.mu.Lock()
	s.gen = g
	var wake []*waiter
	var answers []answer
	for w := range s.waiters {
		a := s.lookup(g, w.who)
		if a.code == http.StatusNotModified && a.doc.etag == w.etag {
			continue
		}
		if a.code == http.StatusNotModified {
			a.code = http.StatusOK
		}
		delete(s.waiters, w)
		wake, answers = append(wake, w), append(answers, a)
	}
	s.Metrics.Waiting.Set(float64(len(s.waiters)))
	s.mu.Unlock()
	for i, w := range wake {
		go s.resume(w, answers[i])
	}
}

func (s *Server) current() *generation {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.gen
}

// Ready reports whether a policy is loaded.
func (s *Server) Ready() bool { return s.current() != nil }

// answer is what one request gets: a response now, or a place among the waiters.
type answer struct {
	code   int
	reason string // a refusal's reason, for the body and the metrics
	msg    string
	doc    document
	id     string
	header http.Header
}

// evaluate authenticates a request and decides its answer. wait reports that the sidecar is
// current and asked to wait: the caller parks it.
func (s *Server) evaluate(r *http.Request) (a answer, who tokenreview.Result, etag string, wait time.Duration) {
	if r.Method != http.MethodGet {
		return answer{code: http.StatusMethodNotAllowed, reason: "method_not_allowed", msg: "GET only",
			header: http.Header{"Allow": {"GET"}}}, who, "", 0
	}
	if r.URL.Path != Path {
		return answer{code: http.StatusNotFound, reason: "not_found", msg: "the policy endpoint is " + Path}, who, "", 0
	}
	scheme, token, _ := strings.Cut(r.Header.Get("Authorization"), " ")
	if !strings.EqualFold(scheme, "Bearer") || strings.TrimSpace(token) == "" {
		return s.authFailed("missing_token"), who, "", 0
	}
	who = s.Auth.Authenticate(r.Context(), strings.TrimSpace(token))
	if !who.OK() {
		if who.Failure == tokenreview.FailureUnavailable {
			s.Metrics.AuthFailures.WithLabelValues(string(who.Failure)).Inc()
			return answer{code: http.StatusServiceUnavailable, reason: string(who.Failure), msg: "the token cannot be verified now"}, who, "", 0
		}
		return s.authFailed(string(who.Failure)), who, "", 0
	}
	etag = r.Header.Get("If-None-Match")
	a = s.lookup(s.current(), who)
	if a.reason == "unmapped_service_account" {
		s.Metrics.AuthFailures.WithLabelValues(a.reason).Inc()
	}
	if a.code == http.StatusNotModified && etag != a.doc.etag {
		a.code = http.StatusOK
	}
	if a.code == http.StatusNotModified {
		wait = s.wait(r)
	}
	return a, who, etag, wait
}

// lookup is the answer for a ServiceAccount under one generation: 304 means "here is the
// current document", which the caller turns into 200 when the sidecar has another one. It
// counts nothing: it is asked again for every waiter on every policy change.
func (s *Server) lookup(g *generation, who tokenreview.Result) answer {
	if g == nil {
		return answer{code: http.StatusServiceUnavailable, reason: "no_policy", msg: "no policy loaded yet"}
	}
	id := g.pol.IdentityForServiceAccount(who.Namespace, who.ServiceAccount)
	if id == nil {
		return answer{code: http.StatusForbidden, reason: "unmapped_service_account",
			msg: "no identity selects ServiceAccount " + who.Namespace + "/" + who.ServiceAccount}
	}
	return answer{code: http.StatusNotModified, doc: g.docs[id.Name], id: id.Name}
}

func (s *Server) authFailed(reason string) answer {
	s.Metrics.AuthFailures.WithLabelValues(reason).Inc()
	return answer{code: http.StatusUnauthorized, reason: reason,
		msg:    "a valid ServiceAccount token with the egress-guard audience is required",
		header: http.Header{"Www-Authenticate": {`Bearer realm="egress-guard"`}}}
}

// write sends an answer as an HTTP/1.1 response.
func (s *Server) write(w io.Writer, a answer, keepAlive bool) error {
	h := http.Header{}
	for k, v := range a.header {
		h[k] = v
	}
	var body []byte
	switch a.code {
	case http.StatusOK:
		s.Metrics.Requests.WithLabelValues("served").Inc()
		if keepAlive {
			_, err := w.Write(a.doc.ok)
			return err
		}
		body = a.doc.body
		h = okHeader(a.doc, a.id)
	case http.StatusNotModified:
		h.Set("ETag", a.doc.etag)
		s.Metrics.Requests.WithLabelValues("not_modified").Inc()
	default:
		body = []byte("egress-guard control plane: " + a.msg + " (" + a.reason + ")\n")
		h.Set("Content-Type", "text/plain; charset=utf-8")
		s.Metrics.Requests.WithLabelValues(a.reason).Inc()
	}
	if a.code != http.StatusNotModified {
		h.Set("Content-Length", strconv.Itoa(len(body)))
	}
	if !keepAlive {
		h.Set("Connection", "close")
	}
	var b bytes.Buffer
	writeResponse(&b, a.code, h, body)
	_, err := w.Write(b.Bytes())
	return err
}

func okHeader(d document, identity string) http.Header {
	return http.Header{
		"Etag":                    {d.etag},
		"X-Egress-Guard-Identity": {identity},
		"Content-Type":            {"application/json"},
		"Cache-Control":           {"no-store"},
		"Content-Length":          {strconv.Itoa(len(d.body))},
	}
}

func writeResponse(b *bytes.Buffer, code int, h http.Header, body []byte) {
	fmt.Fprintf(b, "HTTP/1.1 %d %s\r\n", code, http.StatusText(code))
	h.Write(b)
	b.WriteString("\r\n")
	b.Write(body)
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
