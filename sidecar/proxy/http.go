package proxy

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

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

// countingReader counts bytes read through it.
type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// forward proxies one plain-HTTP request whose destination was allowed, then closes the
// client connection. One request per connection keeps the decision and the logs per request
// without a second request on the same connection escaping re-authentication.
func (s *Server) forward(ss *session, req *http.Request, t decision.Target, v decision.Verdict) {
	ss.decide(v)
	if err := ss.dial(v, t.Port); err != nil {
		ss.failDial(err)
		return
	}
	ss.established()
	conn := ss.conn
	up := ss.tc.Upstream()

	removeHopHeaders(req.Header)
	req.Close = true // the upstream connection carries this one request
	upW := &countingWriter{w: up}
	upR := &countingReader{r: up}
	if err := req.Write(upW); err != nil {
		writeStatus(conn, http.StatusBadGateway, "egress-guard: sending the request upstream failed (upstream_error)", nil)
		ss.end(outcome.UpstreamError, upW.n, 0)
		return
	}
	resp, err := http.ReadResponse(bufio.NewReader(upR), req)
	if err != nil {
		writeStatus(conn, http.StatusBadGateway, "egress-guard: malformed or missing upstream response (upstream_error)", nil)
		ss.end(outcome.UpstreamError, upW.n, upR.n)
		return
	}
	defer resp.Body.Close()
	removeHopHeaders(resp.Header)
	resp.Close = true
	reason := outcome.Closed
	if err := resp.Write(conn); err != nil {
		reason = outcome.Reset
	}
	ss.end(reason, upW.n, upR.n)
}
