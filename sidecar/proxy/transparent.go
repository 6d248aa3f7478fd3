package proxy

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/egress-guard/egress-guard/pkg/decision"
	"github.com/egress-guard/egress-guard/pkg/origdst"
	"github.com/egress-guard/egress-guard/pkg/outcome"
	"github.com/egress-guard/egress-guard/pkg/peek"
	"github.com/egress-guard/egress-guard/pkg/policy"
)

// maxPeek bounds what the transparent listener buffers before deciding: a ClientHello with
// post-quantum key shares and every record header, or an HTTP request head.
const maxPeek = peek.MaxClientHello + 4096

// serveTransparent runs one connection that the capture rules redirected here. The app chose
// both the original address and, in its first bytes, a name (SNI or Host). The name is what the
// policy allows, so the name decides and the proxy dials an address it resolved for that name
// itself, never the app's address unless it is in that answer: otherwise a ClientHello naming
// an allowed host could reach any server.
//
// Every refusal is a reset: there is no HTTP channel to answer on.
func (s *Server) serveTransparent(ss *session) {
	conn := ss.conn
	orig, err := origdst.OriginalDst(conn)
	if err != nil {
		ss.refuse(decision.Refuse(outcome.NoOriginalDst), "")
		return
	}
	ss.rec.Target = orig.String()
	if s.isOwnListener(conn, orig) {
		ss.refuse(decision.Refuse(outcome.ProxyLoop), "")
		return
	}

	pol := s.cfg.Policy()
	if pol == nil {
		ss.refuse(decision.Refuse(outcome.NoPolicy), "")
		return
	}
	var id *policy.Identity
	if s.cfg.Identity != nil {
		id = s.cfg.Identity(pol)
	}
	if id == nil {
		ss.refuse(decision.Refuse(outcome.UnknownIdentity), "")
		return
	}
	ss.rec.Identity = id.Name

	p := s.peekName(conn)
	ss.rec.Protocol, ss.rec.ECH = p.protocol, p.ech
	if p.protocol == "http-proxy" {
		// The app has its own proxy settings and speaks to its proxy: answer as that proxy,
		// with this pod's identity and the explicit listener's rules (HTTP statuses included).
		ss.httpAnswer = true
		s.serveExplicitFrom(ss, p.prefix)
		return
	}
	origAddr := orig.Addr().Unmap()
	t := decision.Target{Addr: origAddr, Port: orig.Port()}
	if p.name != "" {
		if nt, err := parseTarget(p.name, strconv.Itoa(int(orig.Port()))); err == nil && nt.IsName() {
			t = nt
			ss.rec.SNI = p.name
			ss.rec.Target = t.String()
		}
	}

	// The addresses resolved for exact names stand in for a name only when the client sent
	// none because its protocol carries none. A client that spoke, or may have been about to
	// speak, TLS or HTTP and gave no valid name (one byte and a stall, a stall mid-message, a
	// message over the peek budget, a malformed or invalid name) is decided on IP rules
	// alone: else an SNI or Host for any site could reach an allowed name's shared address.
	known := s.known.Load()
	if p.mayName() && !t.IsName() {
		known = nil
	}
	v := s.decide(id, t, known)
	if v.Proceeds() {
		v = decision.CheckECH(v, id.Mode, p.ech, s.cfg.DenyECH)
	}
	if !v.Proceeds() {
		ss.rec.Hint = namelessHint(id, t, v, p.mayName())
		ss.refuse(v, "")
		return
	}
	if !ss.admit() {
		return
	}
	// Prefer the app's own choice when the proxy's answer contains it (keeps the app's view
	// of which replica it talks to); otherwise dial what the proxy resolved.
	if i := slices.Index(v.Addrs, origAddr); i > 0 {
		v.Addrs[0], v.Addrs[i] = v.Addrs[i], v.Addrs[0]
	}
	ss.decide(v)
	if err := ss.dial(v, t.Port); err != nil {
		ss.failDial(err)
		return
	}
	ss.established()
	ss.watchPolicy(t)
	// The relay goes on without this goroutine (see tunnel.Conn.Start); its last direction
	// to finish writes the close line.
	ss.tc.Start(p.prefix, ss.relayed)
}

// isOwnListener reports a connection whose original destination is this listener itself: a
// redirect loop, or a client that connected to the transparent port directly.
func (s *Server) isOwnListener(conn *net.TCPConn, orig netip.AddrPort) bool {
	local := addrPort(conn.LocalAddr())
	return orig.Port() == local.Port() && (orig.Addr().Unmap() == local.Addr().Unmap() || orig.Addr().IsLoopback())
}

// peeked is what the first bytes of a captured connection said.
type peeked struct {
	name     string // the SNI or Host name, normalised; "" when none was sent
	protocol string // tls, http, http-proxy, server-first or tcp
	ech      bool   // the ClientHello carries encrypted_client_hello
	prefix   []byte // every byte read, to replay upstream
}

// mayName reports whether the bytes were, or could still have become, TLS or HTTP, protocols
// that name their host.
func (p peeked) mayName() bool {
	return p.protocol == "tls" || p.protocol == "http" || len(p.prefix) > 0 && peek.Undecided(p.prefix)
}

// peekName reads the client's first bytes to learn the name it is asking for: the SNI of a TLS
// ClientHello or the Host of an HTTP/1.x request. It returns what it read so it can be replayed
// upstream. A client that sends nothing within ServerFirstTimeout (a server-first protocol), or
// bytes of another protocol, yields no name; the decision then rests on the original address.
// A name is never inferred from a partial or malformed message.
//
// A request in proxy form (CONNECT, or an absolute URL) is an app with its own proxy
// settings: it is marked http-proxy, and served as the explicit listener would serve it.
func (s *Server) peekName(conn *net.TCPConn) peeked {
	p := peeked{protocol: "tcp", prefix: make([]byte, 0, 2048)}
	conn.SetReadDeadline(time.Now().Add(s.cfg.ServerFirstTimeout))
	defer conn.SetReadDeadline(time.Time{})
	first := true
	for len(p.prefix) < maxPeek {
		buf := p.prefix
		if len(buf) == cap(buf) {
			buf = slices.Grow(buf, min(cap(buf), maxPeek-len(buf)))
		}
		n, err := conn.Read(buf[len(buf):min(cap(buf), maxPeek)])
		p.prefix = buf[:len(buf)+n]
		if n > 0 {
			if first {
				first = false
				// The client speaks first: give it the full peek budget for its message.
				conn.SetReadDeadline(time.Now().Add(s.cfg.PeekTimeout))
			}
			switch peek.Sniff(p.prefix) {
			case peek.ProtoTLS:
				p.protocol = "tls"
				hello, perr := peek.ParseClientHello(p.prefix)
				if perr == nil {
					p.name, p.ech = hello.ServerName, hello.ECH
					return p
				}
				if !errors.Is(perr, peek.ErrNeedMore) {
					return p
				}
			case peek.ProtoHTTP:
				p.protocol = "http"
				req, perr := peek.ParseHTTPRequestHead(p.prefix, maxPeek)
				if perr == nil {
					if isProxyRequest(req) {
						p.protocol = "http-proxy"
						return p
					}
					p.name = req.Name
					return p
				}
				if !errors.Is(perr, peek.ErrNeedMore) {
					return p
				}
			default:
				if !peek.Undecided(p.prefix) {
					return p // another protocol
				}
				// One byte of a TLS record header, or the start of a method: read on.
			}
		}
		if err != nil {
			if len(p.prefix) == 0 && errors.Is(err, os.ErrDeadlineExceeded) {
				p.protocol = "server-first"
			}
			return p
		}
	}
	return p
}

// isProxyRequest reports a request meant for a forward proxy: CONNECT, or an absolute URL as
// the request target.
func isProxyRequest(req *peek.HTTPRequest) bool {
	if req.Method == "CONNECT" {
		return true
	}
	t := strings.ToLower(req.Target)
	return strings.HasPrefix(t, "http://") || strings.HasPrefix(t, "https://")
}

// namelessHint explains a denied captured connection that named no host. A client that spoke
// TLS or HTTP without a valid name is held to IP rules. Otherwise, when the identity has
// wildcard rules for its port: a wildcard cannot match an address, and only exact-name rules
// are resolved ahead. Without the hint such a denial is hard to tell from a missing rule.
func namelessHint(id *policy.Identity, t decision.Target, v decision.Verdict, mayName bool) string {
	if t.IsName() || v.Reason != outcome.NoMatchingRule {
		return ""
	}
	if mayName {
		return "the client spoke TLS or HTTP but gave no valid host name within the peek budget (time, size or syntax): only IP rules apply to it"
	}
	for _, r := range id.Rules {
		if r.Kind == policy.KindSuffix && r.AllowsPort(t.Port) {
			return "the client sent no host name (a server-first protocol such as SMTP, PostgreSQL, Redis or SSH); " +
				"wildcard rules such as " + r.Entry + " cannot match an address: add an exact-name rule for this host"
		}
	}
	return ""
}
