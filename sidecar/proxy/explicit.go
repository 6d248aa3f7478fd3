package proxy

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/egress-guard/egress-guard/pkg/decision"
	"github.com/egress-guard/egress-guard/pkg/outcome"
	"github.com/egress-guard/egress-guard/pkg/peek"
	"github.com/egress-guard/egress-guard/pkg/policy"
	"github.com/egress-guard/egress-guard/pkg/tokenreview"
)

// serveExplicit runs one connection of the explicit listener: bounded request head, target,
// authentication, decision, then a CONNECT tunnel or one forwarded plain-HTTP request.
func (s *Server) serveExplicit(ss *session) { s.serveExplicitFrom(ss, nil) }

// serveExplicitFrom is serveExplicit for a connection whose first bytes were already read
// (a captured app talking to its own proxy): they are read again before the socket.
//
// Plain-HTTP requests may follow one another on the connection (keep-alive); each is
// authenticated, decided and logged on its own. A CONNECT, a refusal or a request that
// asks to close ends the connection.
func (s *Server) serveExplicitFrom(ss *session, prefix []byte) {
	conn := ss.conn
	var src io.Reader = conn
	if len(prefix) > 0 {
		src = io.MultiReader(bytes.NewReader(prefix), conn)
	}
	head := &io.LimitedReader{R: src, N: int64(s.cfg.MaxHeaderBytes)}
	// Large enough that the replayed bytes are buffered whole by the first read: what
	// follows the head is then in the buffer, and the rest comes from the socket.
	var br *bufio.Reader
	if len(prefix) <= headBufSize {
		br = headReaders.Get().(*bufio.Reader)
		br.Reset(head)
	} else {
		br = bufio.NewReaderSize(head, len(prefix))
	}
	// The buffer goes back to the pool once nothing reads it any more: when a CONNECT has
	// copied what followed its head (before its tunnel runs, so an idle tunnel holds no
	// buffer), or on a refusal. Never after a forwarded request, whose body the transport
	// may still be reading.
	h := &headReader{br: br}
	reuse := false
	defer func() {
		if reuse {
			h.release()
		}
	}()
	conn.SetReadDeadline(time.Now().Add(s.cfg.HeaderTimeout))
	for first := true; ; first = false {
		if !first {
			// Between requests: wait for the next one's first byte, then give it the head
			// timeout. A client that goes away here ends the connection with no line.
			ss.next()
			head.N = int64(s.cfg.MaxHeaderBytes)
			conn.SetReadDeadline(time.Now().Add(s.cfg.KeepAliveTimeout))
			if _, err := br.Peek(1); err != nil {
				ss.discard()
				return
			}
			conn.SetReadDeadline(time.Now().Add(s.cfg.HeaderTimeout))
		}
		req, err := http.ReadRequest(br)
		if err != nil {
			switch {
			case first && head.N == int64(s.cfg.MaxHeaderBytes) && br.Buffered() == 0:
				ss.discard() // connected and sent nothing (a TCP probe): no request, no log
			case head.N <= 0:
				ss.refuse(decision.Refuse(outcome.HeaderTooLarge), "")
			default:
				ss.refuse(decision.Refuse(outcome.MalformedRequest), "malformed request: "+shortErr(err))
			}
			reuse = true
			return
		}
		conn.SetReadDeadline(time.Time{})
		head.N = math.MaxInt64 // the head was bounded; a forwarded request body is not
		// Read before serving: req must not stay reachable from this frame for the
		// lifetime of a tunnel.
		isConnect := req.Method == http.MethodConnect
		if !s.serveRequest(ss, h, req) {
			reuse = isConnect
			return
		}
	}
}

// headBufSize is the buffer of a request head, taken from headReaders: every explicit
// connection needs one, and most (CONNECT) only until the head is parsed.
const headBufSize = 4096

var headReaders = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, headBufSize) }}

// headReader is a connection's request-head reader and whether it went back to the pool.
type headReader struct {
	br       *bufio.Reader
	released bool
}

// release returns the reader to the pool (once; a reader sized for a long replayed prefix
// is left to the GC). The caller must not read it afterwards.
func (h *headReader) release() {
	if h.released {
		return
	}
	h.released = true
	if h.br.Size() == headBufSize {
		h.br.Reset(nil)
		headReaders.Put(h.br)
	}
}

// serveRequest authenticates and decides one request, then runs its CONNECT tunnel or
// forwards it. It reports whether the connection may carry another request.
func (s *Server) serveRequest(ss *session, h *headReader, req *http.Request) bool {
	ss.rec.Method = req.Method
	t, err := requestTarget(req)
	if err != nil {
		ss.refuse(decision.Refuse(outcome.MalformedRequest), err.Error())
		return false
	}
	ss.rec.Target = t.String()

	pol := s.cfg.Policy()
	if pol == nil {
		ss.refuse(decision.Refuse(outcome.NoPolicy), "")
		return false
	}
	id, cred, reason := s.identify(req.Context(), pol, req.Header.Get("Proxy-Authorization"))
	ss.cred = cred
	if id == nil {
		switch reason {
		case outcome.UnknownAPIKey, outcome.InvalidToken, outcome.UnknownServiceAccount:
			ss.rec.Identity = "unknown"
		}
		ss.refuse(decision.Refuse(reason), "")
		return false
	}
	ss.rec.Identity = id.Name

	v := s.decide(id, t, nil)
	if !v.Proceeds() {
		ss.refuse(v, "")
		return false
	}
	if !ss.admit() {
		return false
	}
	if req.Method == http.MethodConnect {
		s.connect(ss, h, id, t, v)
		return false
	}
	if ss.rec.Request == 0 {
		ss.rec.Request = 1
	}
	return s.forward(ss, pol, id, req, t, v)
}

// connect runs a CONNECT tunnel whose destination was allowed.
func (s *Server) connect(ss *session, h *headReader, id *policy.Identity, t decision.Target, v decision.Verdict) {
	conn := ss.conn
	// Bytes the client sent after the CONNECT head (clients may pipeline the ClientHello).
	var prefix []byte
	if n := h.br.Buffered(); n > 0 {
		prefix, _ = h.br.Peek(n)
		prefix = append([]byte(nil), prefix...)
	}
	h.release()

	checkSNI := s.cfg.TLSPorts[t.Port] && t.IsName()
	if checkSNI {
		// The SNI can only be read once the client believes the tunnel is open; the
		// upstream is still not dialed, so a mismatch reaches nobody.
		ss.tunnelOpen()
		if err := sendConnected(conn); err != nil {
			ss.decide(v)
			ss.end(outcome.Reset, 0, 0)
			return
		}
		tlsFirst := true
		if v.Rule != nil && v.Rule.TLSOptional {
			// The rule lets this tunnel carry another protocol (ssh over 443): look at the
			// first bytes, waiting no longer than for a server-first protocol. If they are
			// TLS, the SNI must still name the host.
			prefix = readFirst(conn, prefix, s.cfg.ServerFirstTimeout)
			switch {
			case len(prefix) == 0:
				ss.rec.Protocol, tlsFirst = "server-first", false
			case peek.Sniff(prefix) != peek.ProtoTLS:
				ss.rec.Protocol, tlsFirst = "tcp", false
			}
		}
		if tlsFirst {
			hello, consumed, err := peek.ReadClientHello(&prefixConn{TCPConn: conn, r: io.MultiReader(bytes.NewReader(prefix), conn)}, peek.MaxClientHello+4096, s.cfg.PeekTimeout)
			prefix = consumed
			if hello != nil {
				ss.rec.SNI, ss.rec.ECH = hello.ServerName, hello.ECH
			}
			v = decision.CheckSNI(v, id.Mode, sniVerdict(hello, err, t.Host))
			if v.Proceeds() && hello != nil {
				v = decision.CheckECH(v, id.Mode, hello.ECH, s.cfg.DenyECH)
			}
			if !v.Proceeds() {
				ss.refuse(v, "") // a reset: no HTTP text inside what the client takes for TLS
				return
			}
		}
	}
	ss.decide(v)
	if err := ss.dial(v, t.Port); err != nil {
		ss.failDial(err)
		return
	}
	if !checkSNI {
		ss.tunnelOpen()
		if err := sendConnected(conn); err != nil {
			ss.end(outcome.Reset, 0, 0)
			return
		}
	}
	ss.established()
	ss.watchPolicy(t)
	// The relay goes on without this goroutine (see tunnel.Conn.Start); its last direction
	// to finish writes the close line.
	ss.tc.Start(prefix, ss.relayed)
}

// connectedLine is the answer that opens a CONNECT tunnel.
var connectedLine = []byte("HTTP/1.1 200 Connection established\r\n\r\n")

// sendConnected writes the 200 to a CONNECT client, as writeConnected does. The send buffer
// of a client socket that has had (next to) nothing written to it takes these 39 bytes at
// once, so a single write(2) is tried first, without the write deadline (two timer updates
// per tunnel). Only a short or refused write, from a client that does not read, falls back to
// a blocking write under writeTimeout.
func sendConnected(conn *net.TCPConn) error {
	rc, err := conn.SyscallConn()
	if err != nil {
		return err
	}
	var n int
	var werr error
	if err := rc.Write(func(fd uintptr) bool {
		n, werr = unix.Write(int(fd), connectedLine)
		return true
	}); err != nil {
		return err
	}
	switch {
	case werr == nil && n == len(connectedLine):
		return nil
	case werr != nil && werr != unix.EAGAIN && werr != unix.EINTR:
		return os.NewSyscallError("write", werr)
	}
	n = max(n, 0)
	conn.SetWriteDeadline(time.Now().Add(writeTimeout))
	defer conn.SetWriteDeadline(time.Time{})
	_, err = conn.Write(connectedLine[n:])
	return err
}

// readFirst returns prefix if it is not empty, else whatever the client sends first within
// wait (nothing, for a server-first protocol).
func readFirst(conn *net.TCPConn, prefix []byte, wait time.Duration) []byte {
	if len(prefix) > 0 {
		return prefix
	}
	buf := make([]byte, 4096)
	conn.SetReadDeadline(time.Now().Add(wait))
	n, _ := conn.Read(buf)
	conn.SetReadDeadline(time.Time{})
	return buf[:n]
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

// identify returns the sidecar's own identity, or authenticates the request. The credential
// it used stays in the session's memory (never logged) so that a tunnel can be re-checked
// when the policy changes.
func (s *Server) identify(ctx context.Context, pol *policy.Policy, header string) (*policy.Identity, credential, outcome.Reason) {
	if s.cfg.Identity != nil {
		if id := s.cfg.Identity(pol); id != nil {
			return id, credential{}, 0
		}
		return nil, credential{}, outcome.UnknownIdentity
	}
	cred, reason := s.credentialFrom(ctx, header)
	if reason != 0 {
		return nil, cred, reason
	}
	if id := cred.identity(pol); id != nil {
		return id, cred, 0
	}
	if cred.apiKey != "" {
		return nil, credential{}, outcome.UnknownAPIKey
	}
	return nil, credential{}, outcome.UnknownServiceAccount
}

// credential is what a client proved: an API key, or a ServiceAccount through its token.
type credential struct {
	apiKey            string
	namespace, saName string
}

// identity is the identity the credential selects in pol, or nil.
func (c credential) identity(pol *policy.Policy) *policy.Identity {
	switch {
	case c.apiKey != "":
		return pol.IdentityByAPIKey(c.apiKey)
	case c.saName != "":
		return pol.IdentityForServiceAccount(c.namespace, c.saName)
	}
	return nil
}

// TokenUser is the Basic user name that says "the password is a ServiceAccount token", for
// clients that can only put credentials in HTTPS_PROXY=http://user:password@host:port.
const TokenUser = "token"

// credentialFrom reads Proxy-Authorization: Basic with an API key as the user name (the
// password is ignored, as in the original egress-guard), Bearer with a ServiceAccount token,
// or Basic with the user name "token" and a ServiceAccount token as the password. Tokens are
// verified with a (cached) TokenReview. Credentials never appear in logs or errors.
func (s *Server) credentialFrom(ctx context.Context, header string) (credential, outcome.Reason) {
	scheme, value, ok := strings.Cut(header, " ")
	if header == "" || !ok {
		return credential{}, outcome.NoCredentials
	}
	value = strings.TrimSpace(value)
	var token string
	switch {
	case strings.EqualFold(scheme, "Bearer"):
		token = value
	case strings.EqualFold(scheme, "Basic"):
		raw, err := base64.StdEncoding.DecodeString(value)
		if err != nil {
			return credential{}, outcome.NoCredentials
		}
		user, pass, _ := strings.Cut(string(raw), ":")
		if user == TokenUser && strings.Count(pass, ".") == 2 {
			token = pass
			break
		}
		if user == "" {
			return credential{}, outcome.NoCredentials
		}
		return credential{apiKey: user}, 0
	default:
		return credential{}, outcome.NoCredentials
	}
	if s.cfg.Tokens == nil || token == "" {
		return credential{}, outcome.NoCredentials // token authentication is not configured
	}
	res := s.cfg.Tokens.Authenticate(ctx, token)
	switch {
	case res.OK():
		return credential{namespace: res.Namespace, saName: res.ServiceAccount}, 0
	case res.Failure == tokenreview.FailureUnavailable:
		return credential{}, outcome.AuthUnavailable
	}
	return credential{}, outcome.InvalidToken
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
