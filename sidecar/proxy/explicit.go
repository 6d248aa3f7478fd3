package proxy

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"io"
	"math"
	"net/http"
	"strings"
	"time"

	"github.com/egress-guard/egress-guard/pkg/decision"
	"github.com/egress-guard/egress-guard/pkg/outcome"
	"github.com/egress-guard/egress-guard/pkg/peek"
	"github.com/egress-guard/egress-guard/pkg/policy"
)

// serveExplicit runs one connection of the explicit listener: bounded request head, target,
// authentication, decision, then a CONNECT tunnel or one forwarded plain-HTTP request.
func (s *Server) serveExplicit(ss *session) {
	conn := ss.conn
	conn.SetReadDeadline(time.Now().Add(s.cfg.HeaderTimeout))
	head := &io.LimitedReader{R: conn, N: int64(s.cfg.MaxHeaderBytes)}
	br := bufio.NewReaderSize(head, 4096)
	req, err := http.ReadRequest(br)
	if err != nil {
		switch {
		case head.N == int64(s.cfg.MaxHeaderBytes) && br.Buffered() == 0:
			ss.discard() // connected and sent nothing (a TCP probe): no request, no log
		case head.N <= 0:
			ss.refuse(decision.Refuse(outcome.HeaderTooLarge), "")
		default:
			ss.refuse(decision.Refuse(outcome.MalformedRequest), "malformed request: "+shortErr(err))
		}
		return
	}
	conn.SetReadDeadline(time.Time{})
	head.N = math.MaxInt64 // the head was bounded; a forwarded request body is not
	ss.rec.Method = req.Method

	t, err := requestTarget(req)
	if err != nil {
		ss.refuse(decision.Refuse(outcome.MalformedRequest), err.Error())
		return
	}
	ss.rec.Target = t.String()

	pol := s.cfg.Policy()
	if pol == nil {
		ss.refuse(decision.Refuse(outcome.NoPolicy), "")
		return
	}
	id, reason := s.identify(pol, req.Header.Get("Proxy-Authorization"))
	if id == nil {
		if reason == outcome.UnknownAPIKey {
			ss.rec.Identity = "unknown"
		}
		ss.refuse(decision.Refuse(reason), "")
		return
	}
	ss.rec.Identity = id.Name

	v := s.decide(id, t, nil)
	if !v.Proceeds() {
		ss.refuse(v, "")
		return
	}
	if req.Method == http.MethodConnect {
		s.connect(ss, br, id, t, v)
	} else {
		s.forward(ss, req, t, v)
	}
}

// connect runs a CONNECT tunnel whose destination was allowed.
func (s *Server) connect(ss *session, br *bufio.Reader, id *policy.Identity, t decision.Target, v decision.Verdict) {
	conn := ss.conn
	// Bytes the client sent after the CONNECT head (clients may pipeline the ClientHello).
	prefix, _ := br.Peek(br.Buffered())
	prefix = append([]byte(nil), prefix...)

	checkSNI := s.cfg.TLSPorts[t.Port] && t.IsName()
	if checkSNI {
		// The SNI can only be read once the client believes the tunnel is open; the
		// upstream is still not dialed, so a mismatch reaches nobody.
		ss.tunnelOpen()
		if err := writeConnected(conn); err != nil {
			ss.decide(v)
			ss.end(outcome.Reset, 0, 0)
			return
		}
		hello, consumed, err := peek.ReadClientHello(&prefixConn{TCPConn: conn, r: io.MultiReader(bytes.NewReader(prefix), conn)}, peek.MaxClientHello+4096, s.cfg.PeekTimeout)
		prefix = consumed
		if hello != nil {
			ss.rec.SNI = hello.ServerName
		}
		v = decision.CheckSNI(v, id.Mode, sniVerdict(hello, err, t.Host))
		if !v.Proceeds() {
			ss.refuse(v, "") // a reset: no HTTP text inside what the client takes for TLS
			return
		}
	}
	ss.decide(v)
	if err := ss.dial(v, t.Port); err != nil {
		ss.failDial(err)
		return
	}
	if !checkSNI {
		ss.tunnelOpen()
		if err := writeConnected(conn); err != nil {
			ss.end(outcome.Reset, 0, 0)
			return
		}
	}
	ss.established()
	up, down, reason := ss.tc.Relay(prefix)
	ss.end(reason, up, down)
}

// sniVerdict returns 0 when the ClientHello names host, else the deny reason.
func sniVerdict(hello *peek.ClientHello, err error, host string) outcome.Reason {
	switch {
	case err != nil:
		return outcome.NoClientHello
	case hello.ServerName == "":
		return outcome.SNIMissing
	case hello.ServerName != host:
		return outcome.SNIMismatch
	}
	return 0
}

// identify returns the sidecar's own identity, or authenticates the request.
func (s *Server) identify(pol *policy.Policy, header string) (*policy.Identity, outcome.Reason) {
	if s.cfg.Identity == "" {
		return authenticate(pol, header)
	}
	if id := pol.Identity(s.cfg.Identity); id != nil {
		return id, 0
	}
	return nil, outcome.UnknownIdentity
}

// authenticate resolves Proxy-Authorization to an identity. The API key is the Basic user
// name (the password is ignored, as in the original egress-guard). It never appears in logs
// or errors.
func authenticate(pol *policy.Policy, header string) (*policy.Identity, outcome.Reason) {
	if header == "" {
		return nil, outcome.NoCredentials
	}
	scheme, cred, ok := strings.Cut(header, " ")
	if !ok || !strings.EqualFold(scheme, "Basic") {
		return nil, outcome.NoCredentials
	}
	raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(cred))
	if err != nil {
		return nil, outcome.NoCredentials
	}
	key, _, _ := strings.Cut(string(raw), ":")
	if key == "" {
		return nil, outcome.NoCredentials
	}
	if id := pol.IdentityByAPIKey(key); id != nil {
		return id, 0
	}
	return nil, outcome.UnknownAPIKey
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
