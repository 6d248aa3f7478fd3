package proxy

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"time"

	"github.com/egress-guard/egress-guard/pkg/decision"
	"github.com/egress-guard/egress-guard/pkg/origdst"
	"github.com/egress-guard/egress-guard/pkg/outcome"
	"github.com/egress-guard/egress-guard/pkg/peek"
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
	id := pol.Identity(s.cfg.Identity)
	if id == nil {
		ss.refuse(decision.Refuse(outcome.UnknownIdentity), "")
		return
	}
	ss.rec.Identity = id.Name

	name, proto, prefix := s.peekName(conn)
	ss.rec.Protocol = proto
	origAddr := orig.Addr().Unmap()
	t := decision.Target{Addr: origAddr, Port: orig.Port()}
	if name != "" {
		if nt, err := parseTarget(name, strconv.Itoa(int(orig.Port()))); err == nil && nt.IsName() {
			t = nt
			ss.rec.SNI = name
			ss.rec.Target = t.String()
		}
	}

	v := s.decide(id, t, s.known.Load())
	if !v.Proceeds() {
		ss.refuse(v, "")
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
	up, down, reason := ss.tc.Relay(prefix)
	ss.end(reason, up, down)
}

// isOwnListener reports a connection whose original destination is this listener itself: a
// redirect loop, or a client that connected to the transparent port directly.
func (s *Server) isOwnListener(conn *net.TCPConn, orig netip.AddrPort) bool {
	local := addrPort(conn.LocalAddr())
	return orig.Port() == local.Port() && (orig.Addr().Unmap() == local.Addr().Unmap() || orig.Addr().IsLoopback())
}

// peekName reads the client's first bytes to learn the name it is asking for: the SNI of a TLS
// ClientHello or the Host of an HTTP/1.x request. It returns what it read so it can be replayed
// upstream. A client that sends nothing within ServerFirstTimeout (a server-first protocol), or
// bytes of another protocol, yields no name; the decision then rests on the original address.
// A name is never inferred from a partial or malformed message.
func (s *Server) peekName(conn *net.TCPConn) (name, proto string, consumed []byte) {
	buf := make([]byte, 0, 2048)
	conn.SetReadDeadline(time.Now().Add(s.cfg.ServerFirstTimeout))
	defer conn.SetReadDeadline(time.Time{})
	proto = "tcp"
	first := true
	for len(buf) < maxPeek {
		if len(buf) == cap(buf) {
			buf = slices.Grow(buf, min(cap(buf), maxPeek-len(buf)))
		}
		n, err := conn.Read(buf[len(buf):min(cap(buf), maxPeek)])
		buf = buf[:len(buf)+n]
		if n > 0 {
			if first {
				first = false
				// The client speaks first: give it the full peek budget for its message.
				conn.SetReadDeadline(time.Now().Add(s.cfg.PeekTimeout))
			}
			switch peek.Sniff(buf) {
			case peek.ProtoTLS:
				proto = "tls"
				hello, perr := peek.ParseClientHello(buf)
				if perr == nil {
					return hello.ServerName, proto, buf
				}
				if !errors.Is(perr, peek.ErrNeedMore) {
					return "", proto, buf
				}
			case peek.ProtoHTTP:
				proto = "http"
				req, perr := peek.ParseHTTPRequestHead(buf, maxPeek)
				if perr == nil {
					return req.Name, proto, buf
				}
				if !errors.Is(perr, peek.ErrNeedMore) {
					return "", proto, buf
				}
			default:
				return "", proto, buf
			}
		}
		if err != nil {
			if len(buf) == 0 && errors.Is(err, os.ErrDeadlineExceeded) {
				proto = "server-first"
			}
			return "", proto, buf
		}
	}
	return "", proto, buf
}
