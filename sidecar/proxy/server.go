// Package proxy is the explicit proxy listener: HTTP CONNECT tunnels and plain-HTTP forward
// proxying, authenticated with Proxy-Authorization, on one decision path.
//
// Every connection goes through the same steps: read a bounded request head, authenticate,
// decide on the named destination (policy, then resolution and address vetting), and only then
// dial one of the vetted addresses. For CONNECT tunnels to TLS ports, the proxy also reads the
// ClientHello before dialing and requires its SNI to equal the CONNECT host, so a tunnel
// allowed for one name cannot be used to speak TLS to another name on the same address.
//
// The proxy accepts and owns its connections (it does not use net/http's server), so that
// tunnels are tracked for drain and relayed socket to socket with splice(2).
package proxy

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/egress-guard/egress-guard/pkg/accesslog"
	"github.com/egress-guard/egress-guard/pkg/addrclass"
	"github.com/egress-guard/egress-guard/pkg/dialer"
	"github.com/egress-guard/egress-guard/pkg/metrics"
	"github.com/egress-guard/egress-guard/pkg/peek"
	"github.com/egress-guard/egress-guard/pkg/policy"
	"github.com/egress-guard/egress-guard/sidecar/tunnel"
)

// Config wires the server to its collaborators. All fields are required unless noted.
type Config struct {
	Policy     func() *policy.Policy // the active policy; nil until one loaded
	Classifier *addrclass.Classifier
	Resolver   *net.Resolver
	Dialer     *net.Dialer
	Tracker    *tunnel.Tracker
	AccessLog  *accesslog.Logger
	Metrics    *metrics.Metrics
	Log        *slog.Logger // operational messages (not per-connection lines)

	// Identity, when set, is the identity of every connection (the sidecar serves one pod) and
	// Proxy-Authorization is not required on the explicit listener.
	Identity string
	// ServerFirstTimeout is how long the transparent listener waits for the client's first
	// bytes before deciding on the original address alone (SMTP, MySQL and SSH clients wait for
	// the server to speak first).
	ServerFirstTimeout time.Duration

	// TLSPorts are the CONNECT ports whose tunnels must open with a ClientHello whose SNI
	// equals the CONNECT host.
	TLSPorts map[uint16]bool

	HeaderTimeout  time.Duration // time allowed to send the request head
	MaxHeaderBytes int           // bound on the request head
	PeekTimeout    time.Duration // time allowed for the ClientHello after 200
	DialTimeout    time.Duration // resolve plus connect
}

// Server is the explicit proxy.
type Server struct {
	cfg    Config
	nextID atomic.Uint64
	known  knownAddrsRefresher

	mu        sync.Mutex
	listeners []net.Listener
	closed    bool
}

// New returns a server; call Serve to start it.
func New(cfg Config) *Server { return &Server{cfg: cfg} }

// Serve accepts explicit proxy connections (CONNECT and plain HTTP) on ln until Close. It
// returns nil after Close.
func (s *Server) Serve(ln net.Listener) error { return s.serve(ln, s.handle) }

// ServeTransparent accepts connections redirected by the capture rules on ln until Close.
func (s *Server) ServeTransparent(ln net.Listener) error { return s.serve(ln, s.handleTransparent) }

func (s *Server) serve(ln net.Listener, handle func(*tunnel.Conn, *net.TCPConn)) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		ln.Close()
		return nil
	}
	s.listeners = append(s.listeners, ln)
	s.mu.Unlock()

	var backoff time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			if s.isClosed() {
				return nil
			}
			// Out of descriptors and similar: wait rather than spin, as net/http does.
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, os.ErrDeadlineExceeded) || isTemporary(err) {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.cfg.Log.Warn("accept failed; retrying", "err", err, "backoff", backoff)
				time.Sleep(backoff)
				continue
			}
			return fmt.Errorf("accept on %s: %w", ln.Addr(), err)
		}
		backoff = 0
		conn, ok := nc.(*net.TCPConn)
		if !ok {
			nc.Close()
			continue
		}
		c, err := s.cfg.Tracker.Add(conn)
		if err != nil {
			go s.refuse(conn, err)
			continue
		}
		go handle(c, conn)
	}
}

func isTemporary(err error) bool {
	var t interface{ Temporary() bool }
	return errors.As(err, &t) && t.Temporary()
}

// Close stops accepting. Connections already accepted are left to the tracker's drain.
func (s *Server) Close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	for _, ln := range s.listeners {
		ln.Close()
	}
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// refuse answers a connection the tracker would not take.
func (s *Server) refuse(conn *net.TCPConn, err error) {
	defer conn.Close()
	if errors.Is(err, tunnel.ErrLimit) {
		s.cfg.Metrics.TunnelsRejected.Inc()
		writeStatus(conn, http.StatusServiceUnavailable, "egress-guard: too many concurrent connections", nil)
		return
	}
	writeStatus(conn, http.StatusServiceUnavailable, "egress-guard: shutting down", nil)
}

// handle runs one client connection from request head to close line.
func (s *Server) handle(c *tunnel.Conn, conn *net.TCPConn) {
	defer c.Done()
	s.cfg.Metrics.ActiveTunnels.Inc()
	defer s.cfg.Metrics.ActiveTunnels.Dec()
	rec := s.newRecord("explicit", conn)

	conn.SetReadDeadline(time.Now().Add(s.cfg.HeaderTimeout))
	head := &io.LimitedReader{R: conn, N: int64(s.cfg.MaxHeaderBytes)}
	br := bufio.NewReaderSize(head, 4096)
	req, err := http.ReadRequest(br)
	if err != nil {
		if head.N == int64(s.cfg.MaxHeaderBytes) && br.Buffered() == 0 {
			return // connected and sent nothing (a TCP probe): no request, no log
		}
		if head.N <= 0 {
			s.reject(conn, rec, http.StatusRequestHeaderFieldsTooLarge, ReasonHeaderTooLarge, metrics.StatusBadRequest, "request head too large")
			return
		}
		s.reject(conn, rec, http.StatusBadRequest, ReasonMalformed, metrics.StatusBadRequest, "malformed request: "+shortErr(err))
		return
	}
	conn.SetReadDeadline(time.Time{})
	head.N = math.MaxInt64 // the head was bounded; a forwarded request body is not
	rec.Method = req.Method

	t, err := requestTarget(req)
	if err != nil {
		s.reject(conn, rec, http.StatusBadRequest, ReasonMalformed, metrics.StatusBadRequest, err.Error())
		return
	}
	rec.Target = t.display()

	pol := s.cfg.Policy()
	if pol == nil {
		s.reject(conn, rec, http.StatusServiceUnavailable, ReasonNoPolicy, metrics.StatusDenied, "no policy loaded")
		return
	}
	id, reason := s.identify(pol, req.Header.Get("Proxy-Authorization"))
	if id == nil {
		if reason == ReasonUnknownKey {
			rec.Identity = "unknown"
		}
		s.reject(conn, rec, http.StatusProxyAuthRequired, reason, metrics.StatusAuthRequired, "proxy authentication required")
		return
	}
	rec.Identity = id.Name

	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.DialTimeout)
	defer cancel()
	d := s.decide(ctx, id, t, nil)
	rec.Destination, rec.Action, rec.Reason, rec.Status = d.destination(), d.action, d.reason, d.status
	if !d.allow {
		code := http.StatusForbidden
		if d.status == metrics.StatusConnectionFailed {
			code = http.StatusBadGateway
		}
		s.reject(conn, rec, code, d.reason, d.status, "destination not allowed")
		return
	}

	if req.Method == http.MethodConnect {
		s.connect(ctx, c, conn, br, rec, id, t, &d)
	} else {
		s.forward(ctx, c, conn, req, rec, id, t, &d)
	}
}

// connect runs a CONNECT tunnel whose destination was allowed.
func (s *Server) connect(ctx context.Context, c *tunnel.Conn, conn *net.TCPConn, br *bufio.Reader, rec *accesslog.Record, id *policy.Identity, t target, d *decision) {
	// Bytes the client sent after the CONNECT head (clients may pipeline the ClientHello).
	prefix, _ := br.Peek(br.Buffered())
	prefix = append([]byte(nil), prefix...)

	checkSNI := s.cfg.TLSPorts[t.port] && !t.addr.IsValid()
	if checkSNI {
		// The SNI can only be read once the client believes the tunnel is open; the
		// upstream is still not dialed, so a mismatch reaches nobody.
		if err := writeConnected(conn); err != nil {
			s.finish(rec, 0, 0, tunnel.ReasonReset)
			return
		}
		hello, consumed, err := peek.ReadClientHello(&prefixConn{TCPConn: conn, r: io.MultiReader(bytes.NewReader(prefix), conn)}, peek.MaxClientHello+4096, s.cfg.PeekTimeout)
		prefix = consumed
		if reason := sniVerdict(hello, err, t.host); reason != "" {
			if hello != nil {
				rec.SNI = hello.ServerName
			}
			if id.Mode != policy.ModeAudit {
				rec.Action, rec.Reason, rec.Status = accesslog.ActionDenied, reason, metrics.StatusSNIMismatch
				s.cfg.AccessLog.Decision(rec)
				s.count(rec)
				// No HTTP text inside what the client takes for a TLS stream: reset.
				conn.SetLinger(0)
				s.finish(rec, int64(len(prefix)), 0, reason)
				return
			}
			rec.Action, rec.Reason = accesslog.ActionAudit, reason
		} else {
			rec.SNI = hello.ServerName
		}
	}
	s.logDecision(rec, id)

	// The tracked connection owns the upstream from here; Relay reads it from there.
	if _, err := s.dial(ctx, c, rec, t, d); err != nil {
		if checkSNI {
			conn.SetLinger(0) // the 200 is out; a reset tells the client the tunnel failed
		} else {
			writeStatus(conn, dialStatus(err), "egress-guard: upstream connection failed", nil)
		}
		s.finish(rec, 0, 0, rec.Reason)
		return
	}
	if !checkSNI {
		if err := writeConnected(conn); err != nil {
			s.finish(rec, 0, 0, tunnel.ReasonReset)
			return
		}
	}
	s.count(rec)
	upBytes, downBytes, reason := c.Relay(prefix)
	s.finish(rec, upBytes, downBytes, reason)
}

// sniVerdict returns "" when the ClientHello names host, else the deny reason.
func sniVerdict(hello *peek.ClientHello, err error, host string) string {
	switch {
	case err != nil:
		return ReasonNoClientHello
	case hello.ServerName == "":
		return ReasonSNIMissing
	case hello.ServerName != host:
		return ReasonSNIMismatch
	}
	return ""
}

// dial connects to one of the decision's vetted addresses and attaches it to the tracked
// connection. On failure it sets the record's status and reason.
func (s *Server) dial(ctx context.Context, c *tunnel.Conn, rec *accesslog.Record, t target, d *decision) (*net.TCPConn, error) {
	up, used, err := dialer.Dial(ctx, s.cfg.Dialer, d.addrs, t.port, s.cfg.DialTimeout)
	if err != nil {
		rec.Status, rec.Reason = metrics.StatusConnectionFailed, ReasonDialFailed
		if dialer.IsTimeout(err) {
			rec.Reason = ReasonDialTimeout
		}
		s.count(rec)
		s.cfg.Log.Debug("dial failed", "conn", rec.ID, "target", rec.Target, "err", err)
		return nil, err
	}
	rec.Upstream = used
	if !c.SetUpstream(up) {
		rec.Status, rec.Reason = metrics.StatusConnectionFailed, tunnel.ReasonDrain
		return nil, errors.New("closed while dialing")
	}
	return up, nil
}

func dialStatus(err error) int {
	if dialer.IsTimeout(err) {
		return http.StatusGatewayTimeout
	}
	return http.StatusBadGateway
}

// logDecision logs an allowed (or audited) decision and counts what audit mode let through.
func (s *Server) logDecision(rec *accesslog.Record, id *policy.Identity) {
	s.cfg.AccessLog.Decision(rec)
	if rec.Action == accesslog.ActionAudit {
		s.cfg.Metrics.AuditWouldDeny.WithLabelValues(id.Name, rec.Reason).Inc()
	}
}

// reject answers with an HTTP error before any tunnel exists, and logs both lines.
func (s *Server) reject(conn *net.TCPConn, rec *accesslog.Record, code int, reason, status, msg string) {
	if rec.Action == "" {
		rec.Action = accesslog.ActionDenied
	}
	rec.Reason, rec.Status = reason, status
	s.cfg.AccessLog.Decision(rec)
	s.count(rec)
	var hdr []string
	if code == http.StatusProxyAuthRequired {
		hdr = []string{`Proxy-Authenticate: Basic realm="egress-guard"`}
	}
	writeStatus(conn, code, "egress-guard: "+msg, hdr)
	closeGracefully(conn)
	s.finish(rec, 0, 0, reason)
}

// count adds the connection to egress_proxy_requests_total once, with its final status.
func (s *Server) count(rec *accesslog.Record) {
	s.cfg.Metrics.Requests.WithLabelValues(rec.Identity, rec.Destination, rec.Status).Inc()
}

// finish logs the close line and the byte counters.
func (s *Server) finish(rec *accesslog.Record, upBytes, downBytes int64, reason string) {
	rec.BytesUp, rec.BytesDown, rec.CloseReason = upBytes, downBytes, reason
	s.cfg.AccessLog.Close(rec)
	if upBytes > 0 || downBytes > 0 {
		s.cfg.Metrics.TunnelBytes.WithLabelValues(rec.Identity, "up").Add(float64(upBytes))
		s.cfg.Metrics.TunnelBytes.WithLabelValues(rec.Identity, "down").Add(float64(downBytes))
	}
	s.cfg.Metrics.ConnectionsClosed.WithLabelValues(reason).Inc()
}

// requestTarget extracts the destination from a CONNECT authority or an absolute http URL.
func requestTarget(req *http.Request) (target, error) {
	if req.Method == http.MethodConnect {
		host, port, err := net.SplitHostPort(req.RequestURI)
		if err != nil {
			return target{}, fmt.Errorf("CONNECT target %q: want host:port", req.RequestURI)
		}
		t, err := parseTarget(host, port)
		if err != nil {
			return target{}, fmt.Errorf("CONNECT target %q: %v", req.RequestURI, err)
		}
		return t, nil
	}
	if !req.URL.IsAbs() || req.URL.Host == "" {
		return target{}, errors.New("not a proxy request: the request target must be an absolute http:// URL")
	}
	if req.URL.Scheme != "http" {
		return target{}, fmt.Errorf("scheme %q is not proxied as plain HTTP; use CONNECT", req.URL.Scheme)
	}
	port := req.URL.Port()
	if port == "" {
		port = "80"
	}
	host := req.URL.Hostname()
	if strings.Contains(host, ":") {
		host = "[" + host + "]"
	}
	t, err := parseTarget(host, port)
	if err != nil {
		return target{}, fmt.Errorf("URL host %q: %v", req.URL.Host, err)
	}
	return t, nil
}

// identify returns the sidecar's own identity, or authenticates the request.
func (s *Server) identify(pol *policy.Policy, header string) (*policy.Identity, string) {
	if s.cfg.Identity == "" {
		return authenticate(pol, header)
	}
	if id := pol.Identity(s.cfg.Identity); id != nil {
		return id, ""
	}
	return nil, ReasonUnknownIdentity
}

// authenticate resolves Proxy-Authorization to an identity. The API key is the Basic user
// name (the password is ignored, as in the original egress-guard). It never appears in logs
// or errors.
func authenticate(pol *policy.Policy, header string) (*policy.Identity, string) {
	if header == "" {
		return nil, ReasonNoCredentials
	}
	scheme, cred, ok := strings.Cut(header, " ")
	if !ok || !strings.EqualFold(scheme, "Basic") {
		return nil, ReasonNoCredentials
	}
	raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(cred))
	if err != nil {
		return nil, ReasonNoCredentials
	}
	key, _, _ := strings.Cut(string(raw), ":")
	if key == "" {
		return nil, ReasonNoCredentials
	}
	if id := pol.IdentityByAPIKey(key); id != nil {
		return id, ""
	}
	return nil, ReasonUnknownKey
}

func (s *Server) newRecord(listener string, conn *net.TCPConn) *accesslog.Record {
	return &accesslog.Record{
		ID:          s.nextID.Add(1),
		Listener:    listener,
		Client:      addrPort(conn.RemoteAddr()),
		Identity:    "none",
		Destination: "none",
		Start:       time.Now(),
	}
}

func addrPort(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		return ta.AddrPort()
	}
	return netip.AddrPort{}
}

// shortErr keeps client-controlled text out of responses beyond a short, sanitized prefix.
func shortErr(err error) string {
	msg := err.Error()
	if len(msg) > 80 {
		msg = msg[:80]
	}
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r > 0x7e {
			return '?'
		}
		return r
	}, msg)
}
