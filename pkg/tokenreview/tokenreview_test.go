package tokenreview

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
)

// jwt builds an unsigned token with the claims given (signature checks are the API server's).
func jwt(claims map[string]any) string {
	b, _ := json.Marshal(claims)
	return "eyJhbGciOiJSUzI1NiJ9." + base64.RawURLEncoding.EncodeToString(b) + ".c2ln"
}

type fakeReviewer struct {
	calls atomic.Int64
	delay time.Duration
	users map[string]string // token -> username; absent: not authenticated
	err   error
}

func (f *fakeReviewer) Review(_ context.Context, token string, aud []string) (bool, string, error) {
	f.calls.Add(1)
	time.Sleep(f.delay)
	if f.err != nil {
		return false, "", f.err
	}
	if len(aud) != 1 || aud[0] != DefaultAudience {
		return false, "", fmt.Errorf("audiences %v", aud)
	}
	u, ok := f.users[token]
	return ok, u, nil
}

type clock struct{ t time.Time }

func (c *clock) now() time.Time { return c.t }

func TestCacheReviewsOncePerTokenUntilItExpires(t *testing.T) {
	clk := &clock{t: time.Unix(1_800_000_000, 0)}
	good := jwt(map[string]any{"exp": clk.t.Add(time.Hour).Unix()})
	short := jwt(map[string]any{"exp": clk.t.Add(20 * time.Second).Unix(), "n": 2})
	f := &fakeReviewer{users: map[string]string{good: "system:serviceaccount:shop:frontend", short: "system:serviceaccount:shop:x"}}
	c := &Cache{Reviewer: f, now: clk.now}
	for i := 0; i < 10000; i++ {
		if r := c.Authenticate(context.Background(), good); !r.OK() || r.Namespace != "shop" || r.ServiceAccount != "frontend" {
			t.Fatalf("result %+v", r)
		}
	}
	if n := f.calls.Load(); n != 1 {
		t.Fatalf("%d TokenReviews for 10,000 uses of one token, want 1", n)
	}
	if rv, hits := c.Stats(); rv != 1 || hits != 9999 {
		t.Fatalf("stats %d reviews %d hits", rv, hits)
	}
	// Never kept past the token's expiry: 20 s left means at most 15 s in the cache.
	c.Authenticate(context.Background(), short)
	clk.t = clk.t.Add(16 * time.Second)
	c.Authenticate(context.Background(), short)
	if n := f.calls.Load(); n != 3 {
		t.Fatalf("a token near its expiry was not reviewed again: %d calls", n)
	}
	// MaxTTL (2 minutes by default) bounds a long-lived token too.
	clk.t = clk.t.Add(3 * time.Minute)
	c.Authenticate(context.Background(), good)
	if n := f.calls.Load(); n != 4 {
		t.Fatalf("a cached answer outlived MaxTTL: %d calls", n)
	}
}

func TestCacheFailures(t *testing.T) {
	clk := &clock{t: time.Unix(1_800_000_000, 0)}
	bad := jwt(map[string]any{"sub": "x"})
	user := jwt(map[string]any{"sub": "admin"})
	f := &fakeReviewer{users: map[string]string{user: "admin"}}
	c := &Cache{Reviewer: f, now: clk.now}
	if r := c.Authenticate(context.Background(), bad); r.Failure != FailureInvalid {
		t.Fatalf("bad token: %+v", r)
	}
	c.Authenticate(context.Background(), bad)
	if f.calls.Load() != 1 {
		t.Fatal("a refusal was not cached")
	}
	clk.t = clk.t.Add(11 * time.Second)
	c.Authenticate(context.Background(), bad)
	if f.calls.Load() != 2 {
		t.Fatal("a refusal was cached longer than NegativeTTL")
	}
	if r := c.Authenticate(context.Background(), user); r.Failure != FailureNotServiceAccount {
		t.Fatalf("a user that is not a ServiceAccount: %+v", r)
	}
	for _, garbage := range []string{"", "abc", "a.b", "a..c", "not a token at all", "x.y.z.w"} {
		if r := c.Authenticate(context.Background(), garbage); r.Failure != FailureMalformed {
			t.Fatalf("%q: %+v", garbage, r)
		}
	}
	if f.calls.Load() != 3 {
		t.Fatalf("malformed tokens were sent for review: %d calls", f.calls.Load())
	}
	// An unanswered review is not remembered: the next use asks again.
	down := &fakeReviewer{err: errors.New("connection refused")}
	c2 := &Cache{Reviewer: down, now: clk.now}
	for i := 0; i < 2; i++ {
		if r := c2.Authenticate(context.Background(), user); r.Failure != FailureUnavailable {
			t.Fatalf("unavailable: %+v", r)
		}
	}
	if down.calls.Load() != 2 {
		t.Fatal("an unavailable answer was cached")
	}
}

func TestCacheCoalescesConcurrentReviews(t *testing.T) {
	tok := jwt(map[string]any{"exp": time.Now().Add(time.Hour).Unix()})
	f := &fakeReviewer{delay: 50 * time.Millisecond, users: map[string]string{tok: "system:serviceaccount:a:b"}}
	c := &Cache{Reviewer: f}
	var wg sync.WaitGroup
	for i := 0; i < 100; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if !c.Authenticate(context.Background(), tok).OK() {
				t.Error("not OK")
			}
		}()
	}
	wg.Wait()
	if n := f.calls.Load(); n != 1 {
		t.Fatalf("%d reviews for 100 concurrent uses, want 1", n)
	}
}

func TestCacheIsBounded(t *testing.T) {
	f := &fakeReviewer{users: map[string]string{}}
	c := &Cache{Reviewer: f, MaxEntries: 100}
	// 1,030 tokens: not a multiple of the bound, so a cache that emptied itself at the bound
	// instead of halving would end with 30.
	for i := 0; i < 1030; i++ {
		tok := jwt(map[string]any{"i": i})
		f.users[tok] = "system:serviceaccount:a:b"
		c.Authenticate(context.Background(), tok)
	}
	// Evicting halves the cache: between half and all of the bound stay cached.
	if n := len(c.entries); n > 100 || n < 50 {
		t.Fatalf("%d entries, want 50 to 100", n)
	}
}

func TestExpiry(t *testing.T) {
	if exp, ok := Expiry(jwt(map[string]any{"exp": 1800000000})); !ok || exp.Unix() != 1800000000 {
		t.Fatal(exp, ok)
	}
	for _, tok := range []string{jwt(map[string]any{"exp": "soon"}), jwt(map[string]any{"exp": -1}), jwt(map[string]any{}), "a.!!!.c", "a.b"} {
		if _, ok := Expiry(tok); ok {
			t.Errorf("%q: expiry accepted", tok)
		}
	}
}

// FuzzExpiry: the unverified claims reader never panics on any bytes.
func FuzzExpiry(f *testing.F) {
	f.Add(jwt(map[string]any{"exp": 1800000000}))
	f.Add("eyJhbGciOiJSUzI1NiJ9.eyJleHAiOjF9.c2ln")
	f.Add("a.b.c")
	f.Add("..")
	f.Fuzz(func(t *testing.T, tok string) {
		if exp, ok := Expiry(tok); ok && exp.Unix() <= 0 {
			t.Fatalf("%q: expiry %v", tok, exp)
		}
		looksLikeJWT(tok)
	})
}

// The HTTP reviewer speaks the TokenReview API (the real API server is exercised in e2e).
func TestHTTPReviewer(t *testing.T) {
	var gotAuth string
	var got authnv1.TokenReview
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/apis/authentication.k8s.io/v1/tokenreviews" || r.Method != http.MethodPost {
			http.Error(w, "wrong path", 404)
			return
		}
		gotAuth = r.Header.Get("Authorization")
		json.NewDecoder(r.Body).Decode(&got)
		got.Status = authnv1.TokenReviewStatus{Authenticated: got.Spec.Token == "good.token.x", Audiences: got.Spec.Audiences,
			User: authnv1.UserInfo{Username: "system:serviceaccount:shop:frontend"}}
		w.WriteHeader(http.StatusCreated)
		json.NewEncoder(w).Encode(got)
	}))
	defer srv.Close()
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca.crt")
	os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o600)
	cred := filepath.Join(dir, "token")
	os.WriteFile(cred, []byte("reviewer-credential\n"), 0o600)
	r, err := NewHTTPReviewer(srv.URL, cred, ca)
	if err != nil {
		t.Fatal(err)
	}
	ok, user, err := r.Review(context.Background(), "good.token.x", []string{"egress-guard"})
	if err != nil || !ok || user != "system:serviceaccount:shop:frontend" {
		t.Fatalf("%v %q %v", ok, user, err)
	}
	if gotAuth != "Bearer reviewer-credential" || got.Spec.Audiences[0] != "egress-guard" || got.Kind != "TokenReview" {
		t.Fatalf("request: auth %q, review %+v", gotAuth, got)
	}
	if ok, _, err := r.Review(context.Background(), "bad.token.x", []string{"egress-guard"}); ok || err != nil {
		t.Fatalf("bad token: %v %v", ok, err)
	}
	if _, err := NewHTTPReviewer(srv.URL, cred, filepath.Join(dir, "missing")); err == nil {
		t.Fatal("missing CA accepted")
	}
}

// A flood of refused tokens never evicts an accepted one: refusals have their own, smaller
// bound.
func TestCacheRefusalsDoNotEvictAcceptedTokens(t *testing.T) {
	c, f, _, good := cacheWithGoodToken()
	if !c.Authenticate(context.Background(), good).OK() {
		t.Fatal("good token refused")
	}
	const flood = 50000
	for i := 0; i < flood; i++ {
		if r := c.Authenticate(context.Background(), jwt(map[string]any{"garbage": i})); r.Failure != FailureInvalid {
			t.Fatalf("garbage token %d: %+v", i, r)
		}
	}
	if r := c.Authenticate(context.Background(), good); !r.OK() {
		t.Fatalf("good token after the flood: %+v", r)
	}
	if n := f.calls.Load(); n != 1+flood {
		t.Fatalf("%d TokenReviews, want %d: the accepted token was evicted by refusals and reviewed again", n, 1+flood)
	}
	if n := len(c.refusals); n > 1000 || n < 500 {
		t.Fatalf("%d refusals cached, want 500 to 1000", n)
	}
	// The refusals are still remembered: the last one is not reviewed again.
	c.Authenticate(context.Background(), jwt(map[string]any{"garbage": flood - 1}))
	if n := f.calls.Load(); n != 1+flood {
		t.Fatal("a recent refusal was not cached")
	}
}

// An accepted token is trusted for at most 2 minutes by default (a deleted pod's bound token
// stops passing TokenReview; the API server's own token cache keeps answers 2 minutes too).
func TestCachePositiveTTLDefaultsToTwoMinutes(t *testing.T) {
	c, f, clk, good := cacheWithGoodToken()
	c.Authenticate(context.Background(), good)
	clk.t = clk.t.Add(2*time.Minute - time.Second)
	c.Authenticate(context.Background(), good)
	if n := f.calls.Load(); n != 1 {
		t.Fatalf("%d reviews within 2 minutes, want 1", n)
	}
	clk.t = clk.t.Add(2 * time.Second)
	c.Authenticate(context.Background(), good)
	if n := f.calls.Load(); n != 2 {
		t.Fatalf("an accepted token was trusted past 2 minutes without a review: %d reviews", n)
	}
}

// cacheWithGoodToken is a cache on a fake reviewer and clock that accepts one token, valid for
// an hour.
func cacheWithGoodToken() (*Cache, *fakeReviewer, *clock, string) {
	clk := &clock{t: time.Unix(1_800_000_000, 0)}
	good := jwt(map[string]any{"exp": clk.t.Add(time.Hour).Unix()})
	f := &fakeReviewer{users: map[string]string{good: "system:serviceaccount:shop:frontend"}}
	return &Cache{Reviewer: f, now: clk.now}, f, clk, good
}

// blockingReviewer holds every review until release is closed, and records the most it held
// at once.
type blockingReviewer struct {
	release   chan struct{}
	now, most atomic.Int64
}

func (b *blockingReviewer) Review(ctx context.Context, _ string, _ []string) (bool, string, error) {
	n := b.now.Add(1)
	defer b.now.Add(-1)
	for {
		m := b.most.Load()
		if n <= m || b.most.CompareAndSwap(m, n) {
			break
		}
	}
	<-b.release
	return false, "", nil
}

// No more than MaxInflight reviews go to the API server at once, however many new tokens
// arrive; the others wait for a slot, or give up with their context (unavailable, not cached).
func TestCacheBoundsReviewsInFlight(t *testing.T) {
	b := &blockingReviewer{release: make(chan struct{})}
	c := &Cache{Reviewer: b, MaxInflight: 4}
	var wg sync.WaitGroup
	for i := 0; i < 50; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.Authenticate(context.Background(), jwt(map[string]any{"n": i}))
		}()
	}
	for b.now.Load() < 4 {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond) // time for more to get in, if they could
	if n := b.most.Load(); n != 4 {
		t.Fatalf("%d reviews at once, want 4", n)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if r := c.Authenticate(ctx, jwt(map[string]any{"n": "late"})); r.Failure != FailureUnavailable {
		t.Fatalf("a review that found no slot before its deadline: %+v, want unavailable", r)
	}
	close(b.release)
	wg.Wait()
	if n := b.most.Load(); n != 4 {
		t.Fatalf("%d reviews at once, want 4", n)
	}
}
