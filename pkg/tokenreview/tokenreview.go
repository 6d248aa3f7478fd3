// Package tokenreview verifies Kubernetes ServiceAccount tokens with the API server's
// TokenReview, and caches the answers: one review per token every 2 minutes at most, never
// trusted past its expiry, refusals remembered briefly and apart (they cannot evict accepted
// tokens), concurrent reviews of one token coalesced, memory bounded.
//
// The cache is keyed by a hash of the token; tokens themselves are never stored, logged or
// put in errors. The proxy reviews over one HTTPS call (HTTPReviewer, no Kubernetes client
// library); the control plane plugs in its client-go reviewer.
package tokenreview

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/egress-guard/egress-guard/pkg/contract"
	"github.com/egress-guard/egress-guard/pkg/policy"
)

// DefaultAudience is the audience egress-guard's projected tokens are issued for: a token
// minted for another service (or the API server's default audience) is refused.
const DefaultAudience = contract.TokenAudience

// Failure is why a token was not accepted: a bounded metric label.
type Failure string

// Failures.
const (
	FailureMalformed         Failure = "malformed"           // not a JWT
	FailureInvalid           Failure = "invalid"             // the API server did not authenticate it (signature, audience, expiry, deleted pod)
	FailureNotServiceAccount Failure = "not_service_account" // authenticated, but not a ServiceAccount
	FailureUnavailable       Failure = "unavailable"         // the review itself failed (API server unreachable)
)

// Result is what a token proved.
type Result struct {
	Namespace, ServiceAccount string
	Failure                   Failure // "" when the token is a valid ServiceAccount token
}

// OK reports whether the token authenticated a ServiceAccount.
func (r Result) OK() bool { return r.Failure == "" }

// Reviewer asks the API server about one token.
type Reviewer interface {
	// Review returns whether the token is authenticated for one of audiences, and as whom.
	// An error means the question could not be answered (not that the token is bad).
	Review(ctx context.Context, token string, audiences []string) (authenticated bool, username string, err error)
}

// Cache answers Authenticate from memory when it can. The zero value is not usable; set
// Reviewer and call New... or fill the fields and use it as a value behind a pointer.
type Cache struct {
	Reviewer  Reviewer
	Audiences []string // default: DefaultAudience
	// MaxTTL is the longest a positive answer is kept (default 2m, as the API server's own
	// token cache), never past the token's expiry: a bound token stops passing TokenReview
	// when its pod is deleted, and is trusted at most this long after.
	MaxTTL      time.Duration
	NegativeTTL time.Duration // how long a refusal is kept (default 10s)
	MaxEntries  int           // accepted tokens, default 10000; beyond it half are dropped
	// MaxNegativeEntries bounds the refusals (default 1000), kept apart from the accepted
	// tokens so that a flood of bad tokens can never evict a sidecar's good one.
	MaxNegativeEntries int
	// MaxInflight bounds the TokenReviews sent at once (default 32); more wait for a slot
	// until their context ends. Anyone who reaches the listener can present new tokens, and
	// each is a review: this keeps a flood from becoming one against the API server.
	MaxInflight int

	now func() time.Time

	mu       sync.Mutex
	slots    chan struct{}      // MaxInflight; made with the maps
	entries  map[[32]byte]entry // accepted tokens
	refusals map[[32]byte]entry // refused tokens
	inflight map[[32]byte]*call

	reviews atomic.Int64 // TokenReviews sent
	hits    atomic.Int64 // answered from the cache
}

type entry struct {
	res     Result
	expires time.Time
}

type call struct {
	done chan struct{}
	res  Result
}

// Stats returns how many reviews were sent and how many answers came from the cache.
func (c *Cache) Stats() (reviews, hits int64) { return c.reviews.Load(), c.hits.Load() }

// Authenticate returns what token proves. Only a FailureUnavailable result is not cached.
func (c *Cache) Authenticate(ctx context.Context, token string) Result {
	if !looksLikeJWT(token) {
		return Result{Failure: FailureMalformed}
	}
	key := sha256.Sum256([]byte(token))
	now := c.clock()
	c.mu.Lock()
	if c.entries == nil {
		c.entries, c.refusals, c.inflight = map[[32]byte]entry{}, map[[32]byte]entry{}, map[[32]byte]*call{}
		c.slots = make(chan struct{}, cmp.Or(c.MaxInflight, 32))
	}
	if e, ok := c.entries[key]; ok && now.Before(e.expires) {
		c.mu.Unlock()
		c.hits.Add(1)
		return e.res
	}
	if e, ok := c.refusals[key]; ok && now.Before(e.expires) {
		c.mu.Unlock()
		c.hits.Add(1)
		return e.res
	}
	if cl, ok := c.inflight[key]; ok {
		c.mu.Unlock()
		select {
		case <-cl.done:
			c.hits.Add(1)
			return cl.res
		case <-ctx.Done():
			return Result{Failure: FailureUnavailable}
		}
	}
	cl := &call{done: make(chan struct{})}
	c.inflight[key] = cl
	c.mu.Unlock()

	cl.res = c.review(ctx, token)
	c.mu.Lock()
	delete(c.inflight, key)
	if ttl := c.ttl(cl.res, token, now); ttl > 0 {
		m, other, max := c.entries, c.refusals, cmp.Or(c.MaxEntries, 10000)
		if !cl.res.OK() {
			m, other, max = c.refusals, c.entries, cmp.Or(c.MaxNegativeEntries, 1000)
		}
		if len(m) >= max {
			evict(m, now, max/2)
		}
		m[key] = entry{res: cl.res, expires: now.Add(ttl)}
		delete(other, key)
	}
	c.mu.Unlock()
	close(cl.done)
	return cl.res
}

func (c *Cache) review(ctx context.Context, token string) Result {
	select {
	case c.slots <- struct{}{}:
		defer func() { <-c.slots }()
	case <-ctx.Done():
		return Result{Failure: FailureUnavailable}
	}
	c.reviews.Add(1)
	aud := c.Audiences
	if len(aud) == 0 {
		aud = []string{DefaultAudience}
	}
	ok, user, err := c.Reviewer.Review(ctx, token, aud)
	switch {
	case err != nil:
		return Result{Failure: FailureUnavailable}
	case !ok:
		return Result{Failure: FailureInvalid}
	}
	ns, name, isSA := policy.ServiceAccountFromUsername(user)
	if !isSA {
		return Result{Failure: FailureNotServiceAccount}
	}
	return Result{Namespace: ns, ServiceAccount: name}
}

// ttl is how long an answer may be kept: a positive one until the token expires (less a
// margin, at most MaxTTL, default 2 minutes), a refusal NegativeTTL, an unanswered question not at all.
func (c *Cache) ttl(r Result, token string, now time.Time) time.Duration {
	switch r.Failure {
	case FailureUnavailable:
		return 0
	case "":
	default:
		return durationOr(c.NegativeTTL, 10*time.Second)
	}
	ttl := durationOr(c.MaxTTL, 2*time.Minute)
	if exp, ok := Expiry(token); ok {
		// A margin so that a token about to expire is reviewed again rather than trusted
		// past its end by clock skew.
		if left := exp.Sub(now) - 5*time.Second; left < ttl {
			ttl = left
		}
	}
	return max(ttl, 0)
}

// evict drops the expired entries of m, then arbitrary live ones (map order is random) until
// at most keep remain.
func evict(m map[[32]byte]entry, now time.Time, keep int) {
	for k, e := range m {
		if !now.Before(e.expires) {
			delete(m, k)
		}
	}
	for k := range m {
		if len(m) <= keep {
			return
		}
		delete(m, k)
	}
}

func (c *Cache) clock() time.Time {
	if c.now != nil {
		return c.now()
	}
	return time.Now()
}

func durationOr(d, def time.Duration) time.Duration {
	if d > 0 {
		return d
	}
	return def
}

// looksLikeJWT is a cheap check before a review: three non-empty base64url segments.
func looksLikeJWT(t string) bool {
	if len(t) < 10 || len(t) > 16<<10 {
		return false
	}
	parts := strings.Split(t, ".")
	if len(parts) != 3 {
		return false
	}
	for _, p := range parts[:2] {
		if p == "" {
			return false
		}
		for i := 0; i < len(p); i++ {
			c := p[i]
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return false
			}
		}
	}
	return true
}

// Expiry reads the exp claim of a JWT without verifying it: only to bound how long a
// verified answer is cached, never to decide whether the token is valid.
func Expiry(token string) (time.Time, bool) {
	parts := strings.SplitN(token, ".", 3)
	if len(parts) != 3 {
		return time.Time{}, false
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return time.Time{}, false
	}
	var claims struct {
		Exp *json.Number `json:"exp"`
	}
	if json.Unmarshal(payload, &claims) != nil || claims.Exp == nil {
		return time.Time{}, false
	}
	n, err := claims.Exp.Int64()
	if err != nil || n <= 0 || n > 1<<40 {
		return time.Time{}, false
	}
	return time.Unix(n, 0), true
}
