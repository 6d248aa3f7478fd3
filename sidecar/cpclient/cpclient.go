// Package cpclient is the sidecar's side of policy distribution: it fetches its identity's
// policy from the control plane, authenticating with the pod's projected ServiceAccount token
// (re-read for every request: the kubelet rotates it), and holds a long-poll open so that an
// edit arrives as soon as the control plane loads it. The identity is whatever the control
// plane answers for the token, never something the pod's own configuration could claim.
//
// Until a first policy arrives there is none (the proxy denies everything and is not ready).
// Afterwards an outage keeps the last good policy, is logged once when it starts and once when
// it ends, shows in Status, and the client retries with backoff until the control plane is back.
package cpclient

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/egress-guard/egress-guard/pkg/contract"
	"github.com/egress-guard/egress-guard/pkg/policy"
)

// DefaultTokenPath is where the injector mounts the sidecar's projected token.
const DefaultTokenPath = contract.DefaultTokenPath

// Client keeps the sidecar's policy current.
type Client struct {
	URL       string // the control plane, e.g. https://egress-guard.egress-guard.svc:8443
	TokenPath string
	Wait      time.Duration // long-poll wait asked for (default 30s)
	Log       *slog.Logger
	// OnPolicy is called with every policy received (after it is current), for metrics.
	OnPolicy func(*policy.Policy)
	// OnState is called when the control plane becomes unreachable or reachable again.
	OnState func(up bool)

	http *http.Client
	cur  atomic.Pointer[policy.Policy]
	etag string

	mu      sync.Mutex
	known   bool // a first answer (or failure) was recorded
	up      bool
	lastErr string
	since   time.Time
}

// New returns a client trusting the CA certificates in caFile (the control plane's CA).
func New(url, tokenPath, caFile string) (*Client, error) {
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("control plane CA: %w", err)
	}
	return NewWithCA(url, tokenPath, pem)
}

// NewWithCA is New with the CA certificates themselves (the injector puts them in the
// sidecar's environment: a CA certificate is public, and no volume can carry it across
// namespaces).
func NewWithCA(url, tokenPath string, caPEM []byte) (*Client, error) {
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, errors.New("control plane CA: no PEM certificate")
	}
	if tokenPath == "" {
		tokenPath = DefaultTokenPath
	}
	return &Client{
		URL:       strings.TrimSuffix(url, "/"),
		TokenPath: tokenPath,
		http: &http.Client{Transport: &http.Transport{
			Proxy:               nil,
			TLSClientConfig:     &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12},
			MaxIdleConnsPerHost: 1,
			IdleConnTimeout:     90 * time.Second,
		}},
	}, nil
}

// Current is the last good policy (one identity: this pod's), or nil before the first.
func (c *Client) Current() *policy.Policy { return c.cur.Load() }

// Status says whether the control plane answers, since when, and the last error.
func (c *Client) Status() (up bool, since time.Time, lastErr string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.up, c.since, c.lastErr
}

// Run keeps the policy current until ctx ends.
func (c *Client) Run(ctx context.Context) {
	backoff := time.Duration(0)
	for ctx.Err() == nil {
		err := c.poll(ctx)
		if err == nil {
			backoff = 0
			c.setState(true, "")
			continue
		}
		if ctx.Err() != nil {
			return
		}
		c.setState(false, err.Error())
		backoff = min(max(2*backoff, 500*time.Millisecond), 10*time.Second)
		select {
		case <-ctx.Done():
		case <-time.After(backoff):
		}
	}
}

// errStatus is an answer of the control plane other than 200 or 304.
type errStatus struct {
	code int
	body string
}

func (e *errStatus) Error() string {
	return fmt.Sprintf("control plane answered %d: %s", e.code, strings.TrimSpace(e.body))
}

// poll asks once, waiting for a change when the sidecar is current.
func (c *Client) poll(ctx context.Context) error {
	token, err := os.ReadFile(c.TokenPath)
	if err != nil {
		return fmt.Errorf("reading the ServiceAccount token: %w", err)
	}
	wait := c.Wait
	if wait <= 0 {
		wait = 30 * time.Second
	}
	rctx, cancel := context.WithTimeout(ctx, wait+15*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(rctx, http.MethodGet, c.URL+contract.PolicyPath+"?wait="+wait.String(), nil)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(token)))
	if c.etag != "" && c.Current() != nil {
		req.Header.Set("If-None-Match", c.etag)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("control plane: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return fmt.Errorf("control plane: reading the policy: %w", err)
	}
	switch resp.StatusCode {
	case http.StatusNotModified:
		return nil
	case http.StatusOK:
	default:
		return &errStatus{code: resp.StatusCode, body: string(body[:min(len(body), 300)])}
	}
	identity := resp.Header.Get(contract.IdentityHeader)
	// The served document carries allow_internal explicitly: no local INTERNAL_DOMAINS.
	p, err := policy.Parse("control-plane:"+identity, body, policy.Options{})
	if err != nil {
		return fmt.Errorf("control plane sent a policy that does not load (keeping the last good one): %w", err)
	}
	if ids := p.Identities(); len(ids) != 1 || ids[0].Name != identity {
		return errors.New("control plane sent a policy that is not exactly this pod's identity (keeping the last good one)")
	}
	c.cur.Store(p)
	c.etag = resp.Header.Get("ETag")
	c.log().Info("policy received from the control plane", "identity", identity, "hash", p.Hash, "rules", len(p.Identities()[0].Rules))
	if c.OnPolicy != nil {
		c.OnPolicy(p)
	}
	return nil
}

// setState records reachability and logs transitions only: an outage is one line when it
// starts and one when it ends, not one per retry.
func (c *Client) setState(up bool, errText string) {
	c.mu.Lock()
	changed := !c.known || c.up != up
	c.known = true
	if changed {
		c.since = time.Now()
	}
	c.up, c.lastErr = up, errText
	c.mu.Unlock()
	if !changed {
		return
	}
	switch {
	case up:
		c.log().Info("control plane reachable", "url", c.URL)
	case c.Current() != nil:
		c.log().Warn("control plane unreachable; enforcing the last good policy", "url", c.URL, "err", errText)
	default:
		c.log().Warn("control plane unreachable and no policy yet; denying every connection", "url", c.URL, "err", errText)
	}
	if c.OnState != nil {
		c.OnState(up)
	}
}

func (c *Client) log() *slog.Logger {
	if c.Log != nil {
		return c.Log
	}
	return slog.New(slog.DiscardHandler)
}
