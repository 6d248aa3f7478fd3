package proxy

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/egress-guard/egress-guard/pkg/accesslog"
	"github.com/egress-guard/egress-guard/pkg/metrics"
	"github.com/egress-guard/egress-guard/pkg/origdst"
	"github.com/egress-guard/egress-guard/pkg/peek"
	"github.com/egress-guard/egress-guard/sidecar/tunnel"
)

// maxPeek bounds what the transparent listener buffers before deciding: a ClientHello with
// post-quantum key shares and every record header, or an HTTP request head.
const maxPeek = peek.MaxClientHello + 4096

// handleTransparent runs one connection that the capture rules redirected here. The app chose
// both the original address and, in its first bytes, a name (SNI or Host). The name is what the
// policy allows, so the name decides and the proxy dials an address it resolved for that name
// itself, never the app's address unless it is in that answer: otherwise a ClientHello naming
// an allowed host could reach any server.
//
// A denied connection is reset: there is no HTTP channel to answer on.
func (s *Server) handleTransparent(c *tunnel.Conn, conn *net.TCPConn) {
	defer c.Done()
	s.cfg.Metrics.ActiveTunnels.Inc()
	defer s.cfg.Metrics.ActiveTunnels.Dec()
	rec := s.newRecord("transparent", conn)

	orig, err := origdst.OriginalDst(conn)
	if err != nil || s.isOwnListener(conn, orig) {
		reason := ReasonNoOriginalDst
		if err == nil {
			reason = ReasonProxyLoop
		}
		s.resetDenied(conn, rec, reason, metrics.StatusBadRequest)
		return
	}
	rec.Target = orig.String()

	pol := s.cfg.Policy()
	if pol == nil {
		s.resetDenied(conn, rec, ReasonNoPolicy, metrics.StatusDenied)
		return
	}
	id := pol.Identity(s.cfg.Identity)
	if id == nil {
		s.resetDenied(conn, rec, ReasonUnknownIdentity, metrics.StatusDenied)
		return
	}
	rec.Identity = id.Name

	name, proto, prefix := s.peekName(conn)
	rec.Method = proto
	origAddr := orig.Addr().Unmap()
	t := target{host: origAddr.String(), addr: origAddr, port: orig.Port()}
	if name != "" {
		if nt, err := parseTarget(name, strconv.Itoa(int(orig.Port()))); err == nil && !nt.addr.IsValid() {
			t = nt
			rec.SNI = name
			rec.Target = t.display()
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.DialTimeout)
	defer cancel()
	d := s.decide(ctx, id, t, s.known.cur.Load())
	rec.Destination, rec.Action, rec.Reason, rec.Status = d.destination(), d.action, d.reason, d.status
	if !d.allow {
		s.resetDenied(conn, rec, d.reason, d.status)
		return
	}
	// Prefer the app's own choice when the proxy's answer contains it (keeps the app's view
	// of which replica it talks to); otherwise dial what the proxy resolved.
	if i := slices.Index(d.addrs, origAddr); i > 0 {
		d.addrs[0], d.addrs[i] = d.addrs[i], d.addrs[0]
	}
	s.logDecision(rec, id)
	if _, err := s.dial(ctx, c, rec, t, &d); err != nil {
		conn.SetLinger(0)
		s.finish(rec, 0, 0, rec.Reason)
		return
	}
	s.count(rec)
	up, down, reason := c.Relay(prefix)
	s.finish(rec, up, down, reason)
}

// resetDenied logs and counts a refused transparent connection and resets it.
func (s *Server) resetDenied(conn *net.TCPConn, rec *accesslog.Record, reason, status string) {
	rec.Action, rec.Reason, rec.Status = accesslog.ActionDenied, reason, status
	s.cfg.AccessLog.Decision(rec)
	s.count(rec)
	conn.SetLinger(0)
	s.finish(rec, 0, 0, reason)
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
					return hostOnly(req.Host), proto, buf
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

// hostOnly strips the port from a Host header value; an IP literal is not a name.
func hostOnly(h string) string {
	if host, _, err := net.SplitHostPort(h); err == nil {
		h = host
	}
	h = strings.TrimSuffix(strings.TrimPrefix(h, "["), "]")
	if _, err := netip.ParseAddr(h); err == nil {
		return ""
	}
	return h
}
