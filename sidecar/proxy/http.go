package proxy

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/textproto"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/egress-guard/egress-guard/pkg/dialer"
	"github.com/egress-guard/egress-guard/pkg/policy"

	"github.com/egress-guard/egress-guard/pkg/decision"
	"github.com/egress-guard/egress-guard/pkg/outcome"
)

// writeTimeout bounds writing a status line to a client that does not read.
const writeTimeout = 5 * time.Second

// writeStatus writes a complete, closing HTTP response with a short text body.
func writeStatus(conn net.Conn, code int, body string, headers []string) {
	var b strings.Builder
	fmt.Fprintf(&b, "HTTP/1.1 %d %s\r\n", code, http.StatusText(code))
	for _, h := range headers {
		b.WriteString(h)
		b.WriteString("\r\n")
	}
	fmt.Fprintf(&b, "Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s\n", len(body)+1, body)
	conn.SetWriteDeadline(time.Now().Add(writeTimeout))
	io.WriteString(conn, b.String())
	conn.SetWriteDeadline(time.Time{})
}

// closeGracefully half-closes and discards what the client still sends for a moment before
// the socket is closed. Closing with unread input makes the kernel send a RST, which can
// destroy the error response before the client reads it (a client that sent a too-large head
// would then see "connection reset" instead of 431).
func closeGracefully(conn *net.TCPConn) {
	conn.CloseWrite()
	conn.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	io.CopyN(io.Discard, conn, 256<<10)
}

func writeConnected(conn net.Conn) error {
	conn.SetWriteDeadline(time.Now().Add(writeTimeout))
	defer conn.SetWriteDeadline(time.Time{})
	_, err := io.WriteString(conn, "HTTP/1.1 200 Connection established\r\n\r\n")
	return err
}

// prefixConn reads bytes already buffered from the client before reading the socket, while
// deadlines still apply to the socket.
type prefixConn struct {
	*net.TCPConn
	r io.Reader
}

func (p *prefixConn) Read(b []byte) (int, error) { return p.r.Read(b) }

// hopHeaders are meaningful only for one connection and are not forwarded (RFC 9110 §7.6.1),
// plus the proxy's own credentials, which must never reach the destination.
var hopHeaders = []string{
	"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization",
	"Te", "Trailer", "Transfer-Encoding", "Upgrade",
}

func removeHopHeaders(h http.Header) {
	for _, v := range h.Values("Connection") {
		for _, name := range strings.Split(v, ",") {
			if name = strings.TrimSpace(name); name != "" {
				h.Del(name)
			}
		}
	}
	for _, name := range hopHeaders {
		h.Del(name)
	}
}

// countingWriter counts bytes written through it.
type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// transports holds one HTTP client transport per identity, for the active policy: upstream
// connections are reused only by the identity that opened them, and never across a policy
// change (the addresses they were dialed to were vetted under the old one).
type transports struct {
	mu     sync.Mutex
	policy *policy.Policy
	byID   map[string]*http.Transport
}

// verdictKey carries a request's verdict to the transport's dial function.
type verdictKey struct{}

// transportFor returns the identity's transport under pol.
func (s *Server) transportFor(pol *policy.Policy, identity string) *http.Transport {
	ts := &s.transports
	ts.mu.Lock()
	defer ts.mu.Unlock()
	if ts.policy != pol {
		for _, t := range ts.byID {
			t.CloseIdleConnections()
		}
		ts.policy, ts.byID = pol, map[string]*http.Transport{}
	}
	if t := ts.byID[identity]; t != nil {
		return t
	}
	t := &http.Transport{
		Proxy: nil, // never the environment's proxy
		// Only addresses of this request's verdict, with the dial budget.
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			v, _ := ctx.Value(verdictKey{}).(decision.Verdict)
			_, port, err := net.SplitHostPort(addr)
			if err != nil {
				return nil, err
			}
			p, err := strconv.ParseUint(port, 10, 16)
			if err != nil {
				return nil, err
			}
			c, _, err := dialer.Dial(ctx, s.cfg.Dialer, v.Addrs, uint16(p), s.cfg.DialTimeout)
			if err != nil {
				return nil, err
			}
			return c, nil
		},
		DisableCompression:    true, // pass the client's Accept-Encoding and the body through as they are
		MaxIdleConnsPerHost:   16,
		IdleConnTimeout:       90 * time.Second,
		ExpectContinueTimeout: time.Second,
		TLSNextProto:          map[string]func(string, *tls.Conn) http.RoundTripper{}, // HTTP/1.1 only
	}
	ts.byID[identity] = t
	return t
}

// closeIdleUpstreams drops pooled upstream connections (on shutdown).
func (s *Server) closeIdleUpstreams() {
	s.transports.mu.Lock()
	defer s.transports.mu.Unlock()
	for _, t := range s.transports.byID {
		t.CloseIdleConnections()
	}
}

// forward proxies one plain-HTTP request whose destination was allowed and reports whether
// the client connection may carry another request. Upstream connections are pooled per
// identity; interim responses (100 Continue and other 1xx) are relayed before the final one,
// so clients that send Expect: 100-continue get their body through.
func (s *Server) forward(ss *session, pol *policy.Policy, id *policy.Identity, req *http.Request, t decision.Target, v decision.Verdict) (keepAlive bool) {
	ss.decide(v)
	// After a chunked request the connection is closed, not read for another request. The
	// parser drops a Content-Length sent beside Transfer-Encoding, so whether there was one
	// is not known here; RFC 9112 (6.3) requires closing after such a request, since a front
	// end that framed it by the Content-Length disagrees on where the next request starts.
	clientClose := req.Close || len(req.TransferEncoding) > 0
	removeHopHeaders(req.Header)
	req.RequestURI = ""
	req.Close = false
	body := &bodyReader{r: req.Body}
	if req.Body != nil && req.Body != http.NoBody {
		req.Body = body
	} else {
		body.done.Store(true)
	}
	out := &countingWriter{w: ss.conn}
	trace := &httptrace.ClientTrace{
		// A request still streaming when the policy stops allowing it is cut like a tunnel.
		// The question names the upstream address, known only once the transport has a
		// connection (new or pooled): asked before, it would vet the zero address, which
		// every policy allows. GotConn runs on this goroutine, before the request is sent.
		GotConn: func(i httptrace.GotConnInfo) {
			ss.rec.Upstream = addrPort(i.Conn.RemoteAddr())
			ss.watchPolicy(t)
		},
		Got1xxResponse: func(code int, h textproto.MIMEHeader) error {
			var b strings.Builder
			fmt.Fprintf(&b, "HTTP/1.1 %d %s\r\n", code, http.StatusText(code))
			http.Header(h).Write(&b)
			b.WriteString("\r\n")
			_, err := io.WriteString(out, b.String())
			return err
		},
	}
	// The request ends when the tracker closes the client connection (idle, drain, a policy
	// that no longer allows it): closing the client socket alone would leave this goroutine
	// waiting on the upstream for as long as it stays silent, its close line unwritten and
	// the drain waiting for it.
	ctx, cancel := context.WithCancel(context.WithValue(context.Background(), verdictKey{}, v))
	defer cancel()
	ss.tc.SetCancel(cancel)
	defer ss.tc.SetCancel(nil)
	ctx = httptrace.WithClientTrace(ctx, trace)
	resp, err := s.transportFor(pol, id.Name).RoundTrip(req.WithContext(ctx))
	if err != nil {
		if dialer.IsDialError(err) {
			ss.failDial(err)
			return false
		}
		ss.rec.Status = outcome.StatusConnectionFailed
		ss.count()
		writeStatus(ss.conn, http.StatusBadGateway, "egress-guard: malformed or missing upstream response (upstream_error)", nil)
		closeGracefully(ss.conn)
		ss.end(outcome.UpstreamError, body.n.Load(), out.n)
		return false
	}
	ss.established()
	defer resp.Body.Close()
	removeHopHeaders(resp.Header)
	resp.Proto, resp.ProtoMajor, resp.ProtoMinor = "HTTP/1.1", 1, 1
	// A body the upstream answered before reading whole cannot be skipped safely: close after
	// this response rather than read the next request from the middle of it. A response body
	// that only the upstream's close delimits reaches the client the same way: its end is
	// the connection's.
	keepAlive = !clientClose && body.done.Load() && framed(resp, req.Method)
	resp.Close = !keepAlive
	if err := resp.Write(out); err != nil {
		ss.end(outcome.Reset, body.n.Load(), out.n)
		return false
	}
	if !keepAlive {
		ss.end(outcome.Closed, body.n.Load(), out.n)
		return false
	}
	ss.finish(outcome.Closed, body.n.Load(), out.n)
	return true
}

// bodyReader counts a forwarded request body and notes when it was read to the end. The
// transport reads it on its own goroutine.
type bodyReader struct {
	r    io.ReadCloser
	n    atomic.Int64
	done atomic.Bool
}

func (b *bodyReader) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	b.n.Add(int64(n))
	if err == io.EOF {
		b.done.Store(true)
	}
	return n, err
}

func (b *bodyReader) Close() error { return nil } // the client connection outlives the request

// framed reports whether a response's end is marked without closing the connection: a
// Content-Length, chunked coding, or no body at all (HEAD, 1xx, 204, 304).
func framed(resp *http.Response, method string) bool {
	// The transport already gives 1xx, 204 and 304 a ContentLength of 0, and reports a chunked
	// body in TransferEncoding; only HEAD keeps the length its body does not have.
	return method == http.MethodHead || resp.ContentLength >= 0 || len(resp.TransferEncoding) > 0
}
