package proxy

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/netip"
	"time"

	"github.com/egress-guard/egress-guard/pkg/accesslog"
	"github.com/egress-guard/egress-guard/pkg/decision"
	"github.com/egress-guard/egress-guard/pkg/dialer"
	"github.com/egress-guard/egress-guard/pkg/outcome"
	"github.com/egress-guard/egress-guard/pkg/policy"
	"github.com/egress-guard/egress-guard/sidecar/tunnel"
)

type listenerKind uint8

const (
	listenerExplicit listenerKind = iota + 1
	listenerTransparent
)

func (k listenerKind) String() string {
	if k == listenerTransparent {
		return "transparent"
	}
	return "explicit"
}

// session is one client connection from accept to close. It owns the connection's record
// and everything that is written about it, in this order and at most once each:
//
//	decide      the decision line (and the audit metric), before anything is dialed
//	count       egress_proxy_requests_total, once, with the final status
//	refuse      the answer to a refused connection: an HTTP status while the explicit
//	            listener's client still expects one, a reset otherwise (never HTTP text in
//	            what a client takes for a TLS, SSH or SMTP stream)
//	end         the close line, byte counters and close-reason metric, and the release of the
//	            tracked connection
//
// Handlers only say what happened (refuse, failDial, established, end); they never order the
// bookkeeping themselves.
type session struct {
	srv  *Server
	conn *net.TCPConn
	tc   *tunnel.Conn // nil when the tracker refused the connection (cap, drain)
	kind listenerKind
	rec  accesslog.Record

	// cred is what the explicit client authenticated with (never logged): a tunnel is
	// re-checked against it when the policy changes.
	cred credential

	// httpAnswer is true while an HTTP status can still be written to the client: on the
	// explicit listener until "200 Connection established" has gone out.
	httpAnswer bool
	decided    bool
	counted    bool
	ended      bool
}

func (s *Server) newSession(kind listenerKind, conn *net.TCPConn, tc *tunnel.Conn) *session {
	ss := &session{
		srv:        s,
		conn:       conn,
		tc:         tc,
		kind:       kind,
		httpAnswer: kind == listenerExplicit,
		rec: accesslog.Record{
			ID:          s.nextID.Add(1),
			Listener:    kind.String(),
			Client:      addrPort(conn.RemoteAddr()),
			Identity:    "none",
			Destination: "none",
			Start:       time.Now(),
		},
	}
	if tc != nil {
		s.cfg.Metrics.ActiveTunnels.Inc()
	}
	return ss
}

// decide records the verdict and writes the decision line.
func (ss *session) decide(v decision.Verdict) {
	if ss.decided {
		return
	}
	ss.decided = true
	ss.rec.Action, ss.rec.Reason, ss.rec.Status, ss.rec.Destination = v.Action, v.Reason, v.Status(), v.Destination()
	ss.srv.cfg.AccessLog.Decision(&ss.rec)
	if v.Action == outcome.Audit {
		ss.srv.cfg.Metrics.AuditWouldDeny.WithLabelValues(ss.rec.Identity, v.Reason.String()).Inc()
	}
}

// count adds the connection to egress_proxy_requests_total with its status, once.
func (ss *session) count() {
	if ss.counted {
		return
	}
	ss.counted = true
	ss.srv.cfg.Metrics.Requests.WithLabelValues(ss.rec.Identity, ss.rec.Destination, ss.rec.Status.String()).Inc()
}

// refuse answers a refused connection, logs and counts it, and ends it. detail, when not
// empty, replaces the standard wording in an HTTP answer (a parse error, for instance).
func (ss *session) refuse(v decision.Verdict, detail string) {
	ss.decide(v)
	ss.count() // before the answer: whoever sees the answer sees the count
	ss.srv.cfg.Metrics.Refusals.WithLabelValues(v.Reason.String()).Inc()
	if ss.httpAnswer {
		code := httpStatus(v.Reason)
		var hdr []string
		if code == http.StatusProxyAuthRequired {
			hdr = []string{`Proxy-Authenticate: Basic realm="egress-guard"`}
		}
		if detail == "" {
			detail = refusalText(v.Reason)
		}
		writeStatus(ss.conn, code, "egress-guard: "+detail+" ("+v.Reason.String()+")", hdr)
		closeGracefully(ss.conn)
	} else {
		ss.reset()
	}
	ss.end(outcome.Refused, 0, 0)
}

// admit counts an allowed connection toward the tunnel cap and the identity's limit (it was
// only pending until now). It refuses the connection and reports false at either limit.
func (ss *session) admit() bool {
	err := ss.tc.Admit(ss.rec.Identity)
	if err == nil {
		return true
	}
	reason := outcome.IdentityLimit
	if errors.Is(err, tunnel.ErrLimit) {
		reason = outcome.TunnelLimit
		ss.srv.cfg.Metrics.TunnelsRejected.Inc()
	}
	ss.refuse(decision.Refuse(reason), "")
	return false
}

// watchPolicy registers the question a policy change asks of an established tunnel: does
// the new policy still allow this identity (for the explicit listener, this credential) to
// reach this target at this upstream address? Only immutable copies are captured.
func (ss *session) watchPolicy(t decision.Target) {
	s, identity, cred, upstream := ss.srv, ss.rec.Identity, ss.cred, ss.rec.Upstream
	ss.tc.SetStillAllowed(func() bool {
		pol := s.cfg.Policy()
		if pol == nil {
			return true // no policy is not a new policy: keep the last decision
		}
		var id *policy.Identity
		if s.cfg.Identity != nil {
			id = s.cfg.Identity(pol)
		} else {
			id = cred.identity(pol)
		}
		if id == nil || id.Name != identity {
			return false
		}
		return s.decider.StillAllows(id, t, upstream.Addr(), s.known.Load())
	})
}

// tunnelOpen records that the explicit client was told the tunnel is open: from here on a
// refusal can only be a reset.
func (ss *session) tunnelOpen() { ss.httpAnswer = false }

// errClosedWhileDialing reports that the tracker closed the connection (drain, idle) while
// its upstream was being dialed.
var errClosedWhileDialing = errors.New("connection closed while dialing")

// dial connects to one of the verdict's vetted addresses, with its own time budget, and
// hands the upstream to the tracked connection.
func (ss *session) dial(v decision.Verdict, port uint16) error {
	cfg := &ss.srv.cfg
	up, used, err := dialer.Dial(context.Background(), cfg.Dialer, v.Addrs, port, cfg.DialTimeout)
	if err != nil {
		cfg.Log.Debug("dial failed", "conn", ss.rec.ID, "target", ss.rec.Target, "err", err)
		return err
	}
	ss.rec.Upstream = used
	if !ss.tc.SetUpstream(up) {
		return errClosedWhileDialing
	}
	return nil
}

// failDial ends a connection whose upstream could not be connected: 502 or 504 while the
// client expects an HTTP answer, a reset otherwise. The decision stays what it was; the close
// line says why the connection ended.
func (ss *session) failDial(err error) {
	ss.rec.Status = outcome.StatusConnectionFailed
	reason := outcome.DialFailed
	code := http.StatusBadGateway
	switch {
	case errors.Is(err, errClosedWhileDialing):
		reason = ss.tc.CloseReason()
	case dialer.IsTimeout(err):
		reason, code = outcome.DialTimeout, http.StatusGatewayTimeout
	}
	ss.count()
	if ss.httpAnswer && !errors.Is(err, errClosedWhileDialing) {
		writeStatus(ss.conn, code, "egress-guard: upstream connection failed ("+reason.String()+")", nil)
		closeGracefully(ss.conn)
	} else {
		ss.reset()
	}
	ss.end(reason, 0, 0)
}

// established counts a connection whose upstream is connected, before its bytes are
// relayed, so that long tunnels are counted when they open.
func (ss *session) established() { ss.count() }

// discard ends a connection without a request to log: one that sent nothing at all (a TCP
// health probe), or a keep-alive connection closed between requests.
func (ss *session) discard() {
	ss.ended = true
	ss.release()
}

// relayed ends a tunnel when its relay is over (tunnel.Conn.Start's done).
func (ss *session) relayed(up, down int64, reason outcome.CloseReason) { ss.end(reason, up, down) }

// end writes the close line and releases the connection.
func (ss *session) end(reason outcome.CloseReason, up, down int64) {
	ss.finish(reason, up, down)
	ss.release()
}

// next starts the record of the next request on a keep-alive connection: it is decided,
// counted and logged on its own, under the same connection number.
func (ss *session) next() {
	prev := ss.rec
	ss.rec = accesslog.Record{ID: prev.ID, Listener: prev.Listener, Client: prev.Client, Protocol: prev.Protocol,
		Identity: "none", Destination: "none", Start: time.Now(), Request: prev.Request + 1}
	ss.decided, ss.counted, ss.ended = false, false, false
}

// finish writes the close line of the current request or connection. When the tracker
// closed the sockets (idle timeout, drain) its reason wins: that is why the connection ended.
func (ss *session) finish(reason outcome.CloseReason, up, down int64) {
	if ss.ended {
		return
	}
	ss.ended = true
	if ss.tc != nil {
		if r := ss.tc.CloseReason(); r != 0 {
			reason = r
		}
	}
	if !ss.decided {
		// Every path decides before it ends; a connection that got here without a decision
		// (a client gone before its 200) is logged as allowed up to that point.
		ss.decide(decision.Verdict{Action: outcome.Allowed, Reason: outcome.Rule})
	}
	ss.count()
	m := ss.srv.cfg.Metrics
	ss.rec.BytesUp, ss.rec.BytesDown, ss.rec.CloseReason = up, down, reason
	ss.srv.cfg.AccessLog.Close(&ss.rec)
	if up > 0 || down > 0 {
		m.TunnelBytes.WithLabelValues(ss.rec.Identity, "up").Add(float64(up))
		m.TunnelBytes.WithLabelValues(ss.rec.Identity, "down").Add(float64(down))
	}
	m.ConnectionsClosed.WithLabelValues(reason.String()).Inc()
}

func (ss *session) release() {
	if ss.tc == nil {
		ss.conn.Close()
		return
	}
	ss.srv.cfg.Metrics.ActiveTunnels.Dec()
	ss.tc.Done()
}

// reset makes the coming close send a RST: the way to refuse a connection that has no HTTP
// channel.
func (ss *session) reset() { ss.conn.SetLinger(0) }

// httpStatus is the explicit listener's answer to a refusal.
func httpStatus(r outcome.Reason) int {
	switch r {
	case outcome.NoCredentials, outcome.UnknownAPIKey, outcome.InvalidToken, outcome.UnknownServiceAccount:
		return http.StatusProxyAuthRequired
	case outcome.MalformedRequest:
		return http.StatusBadRequest
	case outcome.HeaderTooLarge:
		return http.StatusRequestHeaderFieldsTooLarge
	case outcome.NoPolicy, outcome.TunnelLimit, outcome.Draining, outcome.PendingLimit, outcome.ClientLimit, outcome.IdentityLimit, outcome.AuthUnavailable:
		return http.StatusServiceUnavailable
	case outcome.NoSuchHost, outcome.ResolveFailed:
		return http.StatusBadGateway
	}
	return http.StatusForbidden
}

// refusalText is the one wording of each refusal, on every listener and in every answer.
func refusalText(r outcome.Reason) string {
	switch r {
	case outcome.NoCredentials, outcome.UnknownAPIKey, outcome.InvalidToken, outcome.UnknownServiceAccount:
		return "proxy authentication required"
	case outcome.AuthUnavailable:
		return "credentials cannot be verified now"
	case outcome.UnknownIdentity:
		return "this identity is not in the policy"
	case outcome.InternalAddress:
		return "destination resolves only to addresses this identity may not reach"
	case outcome.NoPolicy:
		return "no policy loaded yet"
	case outcome.TunnelLimit, outcome.PendingLimit:
		return "too many concurrent connections"
	case outcome.ClientLimit:
		return "too many connections from this client"
	case outcome.IdentityLimit:
		return "too many concurrent connections for this identity"
	case outcome.Draining:
		return "shutting down"
	case outcome.NoSuchHost:
		return "destination name does not exist"
	case outcome.ResolveFailed:
		return "destination name could not be resolved"
	case outcome.HeaderTooLarge:
		return "request head too large"
	case outcome.MalformedRequest:
		return "malformed request"
	}
	return "destination not allowed"
}

func addrPort(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		return ta.AddrPort()
	}
	return netip.AddrPort{}
}
