package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/egress-guard/egress-guard/pkg/metrics"
	"github.com/egress-guard/egress-guard/pkg/policy"
	"github.com/egress-guard/egress-guard/pkg/tokenreview"
	"github.com/egress-guard/egress-guard/sidecar/cpclient"
	"github.com/egress-guard/egress-guard/sidecar/proxy"
)

// source is where the active policy comes from: a file the proxy watches (the gateway, and
// a sidecar without a control plane), or the control plane (a sidecar in Kubernetes).
type source interface {
	Current() *policy.Policy
	Run(ctx context.Context)
	Status() string   // "" when nothing is wrong; otherwise a line for /ready's body
	Describe() string // for the start-up log line
}

// policySource builds the source and the way a sidecar's identity is picked from its policy
// (nil for the gateway, whose clients authenticate).
func policySource(cfg Config, log *slog.Logger, m *metrics.Metrics) (source, func(*policy.Policy) *policy.Identity, error) {
	if cfg.ControlPlaneURL != "" {
		var c *cpclient.Client
		var err error
		if cfg.ControlPlaneCAPEM != "" {
			c, err = cpclient.NewWithCA(cfg.ControlPlaneURL, cfg.TokenPath, []byte(cfg.ControlPlaneCAPEM))
		} else {
			c, err = cpclient.New(cfg.ControlPlaneURL, cfg.TokenPath, cfg.ControlPlaneCA)
		}
		if err != nil {
			return nil, nil, err
		}
		up := prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "egress_proxy_control_plane_up",
			Help: "1 while the control plane answers; 0 during an outage (the last good policy is enforced).",
		})
		m.Registry.MustRegister(up)
		c.Log = log
		c.OnPolicy = func(p *policy.Policy) {
			m.PolicyLoaded(p.Hash, map[string]int{p.Identities()[0].Name: len(p.Identities()[0].Rules)})
		}
		c.OnState = func(ok bool) {
			if ok {
				up.Set(1)
			} else {
				up.Set(0)
			}
		}
		// The identity is the one the control plane answered for this pod's token.
		return controlPlane{c}, proxy.SoleIdentity, nil
	}
	w := policy.NewWatcher(cfg.PolicyPath, cfg.WatchInterval, policy.Options{InternalDomains: cfg.InternalDomains},
		func(p *policy.Policy, err error) { m.Observe(log, p, err) })
	// A bad or missing policy at start is not fatal: the proxy stays not ready and denies
	// everything, and picks the file up as soon as it is fixed, without a restart backoff.
	_ = w.Load()
	var identity func(*policy.Policy) *policy.Identity
	if cfg.Mode == ModeSidecar {
		identity = proxy.IdentityNamed(cfg.Identity)
	}
	return fileSource{w, cfg.PolicyPath}, identity, nil
}

type fileSource struct {
	*policy.Watcher
	path string
}

func (f fileSource) Status() string   { return "" }
func (f fileSource) Describe() string { return f.path }

type controlPlane struct{ *cpclient.Client }

func (c controlPlane) Describe() string { return c.URL }

func (c controlPlane) Status() string {
	up, since, lastErr := c.Client.Status()
	if up || lastErr == "" {
		return ""
	}
	return fmt.Sprintf("control plane unreachable since %s: %s", since.UTC().Format(time.RFC3339), lastErr)
}

// tokenReviews returns the gateway's ServiceAccount token verifier, or nil when token
// authentication is off: TOKEN_AUTH=auto turns it on inside a cluster or with KUBE_API_URL.
func tokenReviews(cfg Config, log *slog.Logger) (*tokenreview.Cache, error) {
	if cfg.Mode == ModeSidecar || cfg.TokenAuth == "off" {
		return nil, nil // a sidecar's explicit listener uses the pod's identity
	}
	r, err := tokenreview.NewHTTPReviewer(cfg.KubeAPIURL, cfg.KubeTokenPath, cfg.KubeCAPath)
	if err != nil {
		if cfg.TokenAuth == "on" {
			return nil, fmt.Errorf("TOKEN_AUTH=on: %w", err)
		}
		log.Debug("ServiceAccount tokens are not accepted (no API server to review them)", "reason", err.Error())
		return nil, nil
	}
	return &tokenreview.Cache{Reviewer: r, Audiences: []string{cfg.TokenAudience}}, nil
}
