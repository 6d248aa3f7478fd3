package policyserver

import (
	"bufio"
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/egress-guard/egress-guard/pkg/acceptretry"
	"github.com/egress-guard/egress-guard/pkg/tokenreview"
)

// Bounds of a sidecar connection.
const (
	firstRequestTimeout = 10 * time.Second // TLS handshake and the first request head
	idleTimeout         = 2 * time.Minute  // between requests
	writeTimeout        = 10 * time.Second
	maxRequestHead      = 16 << 10
	reviewTimeout       = 10 * time.Second
)

// conn is one sidecar connection and its reader, which survive while it is parked.
type conn struct {
	c  net.Conn
	lr *io.LimitedReader
	br *bufio.Reader
}

// waiter is a parked connection: the sidecar's ServiceAccount, the document it has, and
// when to answer 304 if nothing changes.
type waiter struct {
	conn     *conn
	who      tokenreview.Result
	etag     string
	deadline time.Time
	keep     bool
}

// Serve answers sidecars on ln (wrap it with tls.NewListener) until ln is closed.
func (s *Server) Serve(ln net.Listener) error {
	go s.sweep(ln)
	log := s.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	// Out of descriptors (every sidecar holds a connection here) is waited out: returning
	// would stop the control plane.
	var failing acceptretry.Episode
	for {
		c, err := ln.Accept()
		if err != nil {
			if acceptretry.Retryable(err) {
				time.Sleep(failing.Failed(log, err, "listener", "policy", "addr", ln.Addr().String()))
				continue
			}
			return err
		}
		if failing.Failing() {
			failing.Recovered(log, "listener", "policy", "addr", ln.Addr().String())
		}
		lr := &io.LimitedReader{R: c, N: maxRequestHead}
		go s.serveConn(&conn{c: c, lr: lr, br: bufio.NewReaderSize(lr, 2048)}, true)
	}
}

// serveConn reads and answers requests until the connection ends or is parked.
func (s *Server) serveConn(pc *conn, first bool) {
	for {
		if pc.br == nil {
			pc.br = bufio.NewReaderSize(pc.lr, 2048)
		}
		timeout := idleTimeout
		if first {
			timeout = firstRequestTimeout
		}
		first = false
		pc.lr.N = maxRequestHead
		pc.c.SetReadDeadline(time.Now().Add(timeout))
		req, err := http.ReadRequest(pc.br)
		if err != nil {
			pc.c.Close()
			return
		}
		pc.c.SetReadDeadline(time.Time{})
		if req.ContentLength != 0 || len(req.TransferEncoding) > 0 {
			s.send(pc, answer{code: http.StatusBadRequest, reason: "bad_request", msg: "a policy request has no body"}, false)
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), reviewTimeout)
		a, who, etag, wait := s.evaluate(req.WithContext(ctx))
		cancel()
		// A refused token ends the connection: otherwise one connection could send request
		// after request with new tokens, each a TokenReview against the API server.
		keep := !req.Close && a.code != http.StatusUnauthorized
		if wait > 0 {
			if pc.br.Buffered() == 0 {
				pc.br = nil // a parked connection keeps no read buffer; resume makes a new one
			}
			if s.park(&waiter{conn: pc, who: who, etag: etag, deadline: time.Now().Add(wait), keep: keep}) {
				return // the goroutine ends; SetPolicy, sweep or Stop answers it
			}
		}
		if !s.send(pc, a, keep) {
			return
		}
	}
}

// send writes an answer and reports whether the connection stays open.
func (s *Server) send(pc *conn, a answer, keep bool) bool {
	pc.c.SetWriteDeadline(time.Now().Add(writeTimeout))
	if err := s.write(pc.c, a, keep); err != nil || !keep {
		pc.c.Close()
		return false
	}
	pc.c.SetWriteDeadline(time.Time{})
	return true
}

// resume answers a parked sidecar and goes on serving its connection.
func (s *Server) resume(w *waiter, a answer) {
	if s.send(w.conn, a, w.keep) {
		s.serveConn(w.conn, false)
	}
}

// park files a current sidecar among the waiters; false when the server is stopping.
func (s *Server) park(w *waiter) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopping {
		return false
	}
	if s.waiters == nil {
		s.waiters = map[*waiter]struct{}{}
	}
	s.waiters[w] = struct{}{}
	s.Metrics.Waiting.Set(float64(len(s.waiters)))
	return true
}

// sweep answers 304 to the waiters whose wait ended, until ln is closed (Stop).
func (s *Server) sweep(ln net.Listener) {
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for now := range tick.C {
		s.mu.Lock()
		if s.stopping {
			s.mu.Unlock()
			return
		}
		var due []*waiter
		for w := range s.waiters {
			if !now.Before(w.deadline) {
				delete(s.waiters, w)
				due = append(due, w)
			}
		}
		s.Metrics.Waiting.Set(float64(len(s.waiters)))
		g := s.gen
		s.mu.Unlock()
		for _, w := range due {
			a := s.lookup(g, w.who)
			if a.code == http.StatusNotModified && a.doc.etag != w.etag {
				a.code = http.StatusOK // changed at the last moment
			}
			go s.resume(w, a)
		}
	}
}

// Stop answers every waiting sidecar at once with 503 and closes its connection, so that it
// goes to another replica without waiting out its long-poll; new requests are answered
// without waiting. Close the listener too.
func (s *Server) Stop() {
	s.mu.Lock()
	s.stopping = true
	waiters := s.waiters
	s.waiters = nil
	s.Metrics.Waiting.Set(0)
	s.mu.Unlock()
	for w := range waiters {
		go s.send(w.conn, answer{code: http.StatusServiceUnavailable, reason: "shutting_down", msg: "this replica is shutting down"}, false)
	}
}
