// Package proxy is the proxy program's connection handling, for both of its shapes: the
// transparent sidecar (connections redirected by the pod's capture rules) and the explicit
// proxy (HTTP CONNECT and plain-HTTP forwarding), which is also the whole of the gateway.
//
// Where to look:
//
//   - accepted: Server.serve (this file) takes each connection and registers it with the
//     tunnel tracker (the connection cap, idle reaping, drain);
//   - decided: explicit.go and transparent.go learn who is asking for what, and call
//     pkg/decision, the one socket-free decision;
//   - dialed: session.dial connects to one of the verdict's vetted addresses only;
//   - relayed: sidecar/tunnel splices bytes with half-close;
//   - logged: session.go owns each connection's lifecycle: the decision line, the single
//     request count with its final status, the refusal (an HTTP status on the explicit
//     listener before the tunnel opens, a reset everywhere else) and the close line.
//
// The proxy accepts and owns its connections (it does not use net/http's server), so that
// tunnels are tracked for drain and relayed socket to socket with splice(2).
package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/egress-guard/egress-guard/pkg/acceptretry"
	"github.com/egress-guard/egress-guard/pkg/accesslog"
	"github.com/egress-guard/egress-guard/pkg/addrclass"
	"github.com/egress-guard/egress-guard/pkg/decision"
	"github.com/egress-guard/egress-guard/pkg/dialer"
	"github.com/egress-guard/egress-guard/pkg/metrics"
	"github.com/egress-guard/egress-guard/pkg/outcome"
	"github.com/egress-guard/egress-guard/pkg/policy"
	"github.com/egress-guard/egress-guard/pkg/tokenreview"
	"github.com/egress-guard/egress-guard/sidecar/tunnel"
)

// Defaults for the Config fields that New fills in when they are zero (the README's
// documented defaults).
const (
	DefaultHeaderTimeout      = 10 * time.Second
	DefaultMaxHeaderBytes     = 32 << 10
	DefaultPeekTimeout        = 5 * time.Second
	DefaultDialTimeout        = 10 * time.Second
	DefaultServerFirstTimeout = 500 * time.Millisecond
	DefaultKeepAliveTimeout   = 30 * time.Second
)

// Config wires the server to its collaborators. Policy, Classifier, Resolver, Tracker,
// AccessLog and Metrics are required; zero limits mean the documented defaults.
type Config struct {
	Policy     func() *policy.Policy // the active policy; nil until one loaded
	Classifier *addrclass.Classifier
	Resolver   dialer.Resolver
	Dialer     *net.Dialer // nil means a plain net.Dialer
	Tracker    *tunnel.Tracker
	AccessLog  *accesslog.Logger
	Metrics    *metrics.Metrics
	Log        *slog.Logger // operational messages (not per-connection lines); nil discards

	// Identity, when set, picks the identity of every connection from the active policy (the
	// sidecar serves one pod: by name from a policy file, or the one identity the control
	// plane served), and Proxy-Authorization is not required on the explicit listener. Nil for
	// the gateway, whose clients authenticate.
	Identity func(*policy.Policy) *policy.Identity
	// Tokens, when set, verifies ServiceAccount tokens (Bearer, or Basic with the user name
	// "token") on the explicit listener; nil accepts API keys only.
	Tokens *tokenreview.Cache
	// ServerFirstTimeout is how long the transparent listener waits for the client's first
	// bytes before deciding on the original address alone (SMTP, MySQL and SSH clients wait for
	// the server to speak first).
	ServerFirstTimeout time.Duration

	// TLSPorts are the CONNECT ports whose tunnels must open with a ClientHello whose SNI
	// equals the CONNECT host.
	TLSPorts map[uint16]bool
	// DenyECH refuses ClientHellos that carry encrypted_client_hello unless the matched rule
	// opts in: with ECH the SNI is only the outer name, which decides for a whole CDN.
	DenyECH bool

	HeaderTimeout time.Duration // time allowed to send the request head
	// KeepAliveTimeout is how long a plain-HTTP client connection may wait idle between
	// requests.
	KeepAliveTimeout time.Duration
	MaxHeaderBytes   int           // bound on the request head
	PeekTimeout      time.Duration // time allowed for the ClientHello or request head once bytes flow
	DialTimeout      time.Duration // resolving the name; then, separately, connecting
}

// IdentityNamed picks a sidecar's identity by name (policy file mode).
func IdentityNamed(name string) func(*policy.Policy) *policy.Identity {
	return func(p *policy.Policy) *policy.Identity { return p.Identity(name) }
}

// SoleIdentity picks the one identity of a policy the control plane served to this pod.
func SoleIdentity(p *policy.Policy) *policy.Identity {
	if ids := p.Identities(); len(ids) == 1 {
		return ids[0]
	}
	return nil
}

// Server serves the explicit and transparent listeners.
type Server struct {
	cfg     Config
	decider decision.Decider
	nextID  atomic.Uint64
	known   atomic.Pointer[decision.KnownAddrs]
	// transports pool plain-HTTP upstream connections per identity.
	transports transports

	mu          sync.Mutex
	listeners   []net.Listener
	closed      bool
	revalidator sync.Once
}

// New checks cfg and returns a server; call Serve or ServeTransparent to start it.
func New(cfg Config) (*Server, error) {
	var missing []string
	for name, ok := range map[string]bool{
		"Policy": cfg.Policy != nil, "Classifier": cfg.Classifier != nil, "Resolver": cfg.Resolver != nil,
		"Tracker": cfg.Tracker != nil, "AccessLog": cfg.AccessLog != nil, "Metrics": cfg.Metrics != nil,
	} {
		if !ok {
			missing = append(missing, name)
		}
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("proxy: Config lacks %v", missing)
	}
	durations := []struct {
		name string
		v    *time.Duration
		def  time.Duration
	}{
		{"HeaderTimeout", &cfg.HeaderTimeout, DefaultHeaderTimeout},
		{"PeekTimeout", &cfg.PeekTimeout, DefaultPeekTimeout},
		{"DialTimeout", &cfg.DialTimeout, DefaultDialTimeout},
		{"ServerFirstTimeout", &cfg.ServerFirstTimeout, DefaultServerFirstTimeout},
		{"KeepAliveTimeout", &cfg.KeepAliveTimeout, DefaultKeepAliveTimeout},
	}
	for _, d := range durations {
		if *d.v < 0 {
			return nil, fmt.Errorf("proxy: Config.%s is negative (%v)", d.name, *d.v)
		}
		if *d.v == 0 {
			*d.v = d.def
		}
	}
	if cfg.MaxHeaderBytes < 0 {
		return nil, fmt.Errorf("proxy: Config.MaxHeaderBytes is negative (%d)", cfg.MaxHeaderBytes)
	}
	if cfg.MaxHeaderBytes == 0 {
		cfg.MaxHeaderBytes = DefaultMaxHeaderBytes
	}
	if cfg.Dialer == nil {
		cfg.Dialer = &net.Dialer{}
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	return &Server{cfg: cfg, decider: decision.Decider{Resolver: cfg.Resolver, Classifier: cfg.Classifier}}, nil
}

// Serve accepts explicit proxy connections (CONNECT and plain HTTP) on ln until Close. It
// returns nil after Close.
func (s *Server) Serve(ln net.Listener) error { return s.serve(ln, listenerExplicit) }

// ServeTransparent accepts connections redirected by the capture rules on ln until Close.
func (s *Server) ServeTransparent(ln net.Listener) error { return s.serve(ln, listenerTransparent) }

func (s *Server) serve(ln net.Listener, kind listenerKind) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		ln.Close()
		return nil
	}
	s.listeners = append(s.listeners, ln)
	s.mu.Unlock()
	s.revalidator.Do(func() { go s.revalidateOnPolicyChange() })

	var failing acceptretry.Episode
	for {
		nc, err := ln.Accept()
		if err != nil {
			if s.isClosed() {
				return nil
			}
			// Out of descriptors and similar: wait rather than spin, and say so once per
			// episode, not once per failed accept.
			if acceptretry.Retryable(err) {
				time.Sleep(failing.Failed(s.cfg.Log, err, "listener", kind.String(), "addr", ln.Addr().String()))
				continue
			}
			return fmt.Errorf("accept on %s: %w", ln.Addr(), err)
		}
		if failing.Failing() {
			failing.Recovered(s.cfg.Log, "listener", kind.String(), "addr", ln.Addr().String())
		}
		conn, ok := nc.(*net.TCPConn)
		if !ok {
			nc.Close()
			continue
		}
		tc, err := s.cfg.Tracker.Add(conn)
		ss := s.newSession(kind, conn, tc)
		if err != nil {
			reason := outcome.Draining
			switch {
			case errors.Is(err, tunnel.ErrPendingLimit):
				reason = outcome.PendingLimit
			case errors.Is(err, tunnel.ErrClientLimit):
				reason = outcome.ClientLimit
			}
			if kind == listenerTransparent {
				ss.refuse(decision.Refuse(reason), "") // a reset: nothing to wait for
			} else {
				go ss.refuse(decision.Refuse(reason), "") // writing a status may wait for the client
			}
			continue
		}
		if kind == listenerTransparent {
			go s.serveTransparent(ss)
		} else {
			go s.serveExplicit(ss)
		}
	}
}

// Close stops accepting. Connections already accepted are left to the tracker's drain.
func (s *Server) Close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	for _, ln := range s.listeners {
		ln.Close()
	}
	s.closeIdleUpstreams()
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// revalidateOnPolicyChange re-checks open tunnels whenever the active policy changes, until
// Close: a connection the new policy no longer allows (a revoked API key, a removed rule) is
// closed with reason policy_revoked instead of relaying on under the old decision.
func (s *Server) revalidateOnPolicyChange() {
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	last := s.cfg.Policy()
	for range tick.C {
		if s.isClosed() {
			return
		}
		if pol := s.cfg.Policy(); pol != last && pol != nil {
			last = pol
			if n := s.cfg.Tracker.Revalidate(); n > 0 {
				s.cfg.Log.Info("closed connections the new policy no longer allows", "count", n, "policy", pol.Hash)
			}
		}
	}
}

// decide runs the decision with its own budget for name resolution (the dial gets another).
// An address target resolves nothing, so it gets no timer: most tunnels name an IP or come
// from a captured connection without a name.
func (s *Server) decide(id *policy.Identity, t decision.Target, known *decision.KnownAddrs) decision.Verdict {
	if !t.IsName() {
		return s.decider.Decide(context.Background(), id, t, known)
	}
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.DialTimeout)
	defer cancel()
	return s.decider.Decide(ctx, id, t, known)
}

// RunKnownAddrs keeps the addresses of the sidecar identity's exact names current (for
// captured connections that name no host): it resolves them at once when the policy changes
// and again every interval.
func (s *Server) RunKnownAddrs(ctx context.Context, interval time.Duration) {
	if s.cfg.Identity == nil {
		return
	}
	check := time.NewTicker(time.Second)
	defer check.Stop()
	var last time.Time
	for {
		pol := s.cfg.Policy()
		cur := s.known.Load()
		if pol != nil && (cur == nil || cur.Policy != pol || time.Since(last) >= interval) {
			k, failed := decision.ResolveKnown(ctx, s.cfg.Resolver, pol, s.cfg.Identity(pol), s.cfg.DialTimeout)
			if failed > 0 {
				s.cfg.Log.Debug("some exact-name rules did not resolve; retrying next round", "failed", failed)
			}
			s.known.Store(k)
			last = time.Now()
		}
		select {
		case <-ctx.Done():
			return
		case <-check.C:
		}
	}
}
