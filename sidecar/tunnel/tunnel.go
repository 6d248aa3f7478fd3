// Package tunnel tracks the proxy's client connections and relays tunnel bytes.
//
// The proxy accepts connections itself (it does not hand them to net/http), so nothing else
// knows they exist: http.Server.Shutdown would not wait for them. The Tracker is the one place
// that does. It enforces the cap on concurrent connections, closes idle ones, and drains on
// shutdown.
//
// Relaying copies the first bytes of each direction with read(2) and write(2), then
// *net.TCPConn to *net.TCPConn with io.Copy so that the runtime uses splice(2): bulk bytes
// never enter user space. (A splice holds a pipe, two descriptors, for as long as it waits
// for its socket; the first bytes need none, so the many short or quiet tunnels hold only
// their two sockets.) Because splice hides individual reads from us,
// idleness is measured from the kernel's own per-socket counters (TCP_INFO bytes received and
// bytes acked on the client socket) by one reaper goroutine, instead of resetting deadlines on
// every read.
package tunnel

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/egress-guard/egress-guard/pkg/outcome"
)

// Errors of Add and Admit: which limit refused the connection.
var (
	ErrLimit         = errors.New("tunnel: concurrent connection limit reached")
	ErrPendingLimit  = errors.New("tunnel: too many undecided connections")
	ErrClientLimit   = errors.New("tunnel: too many undecided connections from this client")
	ErrIdentityLimit = errors.New("tunnel: this identity's connection limit reached")
)

// ErrDraining is returned by Add once Drain has started.
var ErrDraining = errors.New("tunnel: proxy is draining")

// Config sets the tracker's limits. Every connection is first pending (accepted, not yet
// decided), then admitted (decided and allowed). Only admitted connections count toward
// MaxConns, so that clients that never authenticate cannot take the cap from those that do;
// pending ones have their own, smaller budgets. Zero means no limit.
type Config struct {
	// MaxConns caps the admitted connections.
	MaxConns int
	// MaxPending caps the connections accepted but not yet decided.
	MaxPending int
	// MaxPendingPerClient caps the undecided connections of one client address.
	MaxPendingPerClient int
	// MaxPerIdentity caps the admitted connections of one identity.
	MaxPerIdentity int
	// IdleTimeout closes a connection on which no byte moved for this long.
	IdleTimeout time.Duration
	// DrainIdleTimeout is the idle timeout while draining: idle keep-alive and pooled
	// connections should not hold shutdown for the whole drain budget.
	DrainIdleTimeout time.Duration
	// Tick is how often idleness is sampled; defaults to one second.
	Tick time.Duration
}

// Tracker tracks live connections. The zero value is not usable; call NewTracker.
type Tracker struct {
	cfg      Config
	mu       sync.Mutex
	conns    map[*Conn]struct{}
	draining bool
	wg       sync.WaitGroup
	count    atomic.Int64

	// Under mu: undecided connections, in all and per client address; admitted ones, in all
	// and per identity.
	pending     int
	perClient   map[netip.Addr]int
	admitted    int
	perIdentity map[string]int

	// probe reads a socket's activity counter; a field so tests can observe the reaper.
	probe func(*net.TCPConn) (uint64, bool)
	// snapshot is the reaper's reusable list of connections to probe.
	snapshot []*Conn
}

// NewTracker returns a tracker with cfg.
func NewTracker(cfg Config) *Tracker {
	if cfg.Tick <= 0 {
		cfg.Tick = time.Second
	}
	return &Tracker{cfg: cfg, conns: make(map[*Conn]struct{}), probe: socketBytes,
		perClient: map[netip.Addr]int{}, perIdentity: map[string]int{}}
}

// Conn is a tracked client connection and, once dialed, its upstream.
type Conn struct {
	t        *Tracker
	client   *net.TCPConn
	mu       sync.Mutex // guards upstream, reason and cancel
	upstream *net.TCPConn
	reason   outcome.CloseReason // set when the tracker closes the connection
	cancel   func()              // SetCancel's

	// Under Tracker.mu.
	clientAddr netip.Addr
	identity   string // set by Admit
	admitted   bool
	// stillAllowed, when set, is asked after a policy change whether the connection may go
	// on (Revalidate).
	stillAllowed func() bool

	// Owned by the reaper goroutine alone.
	lastBytes  uint64
	lastChange time.Time
}

// Add starts tracking client as pending (not yet decided). It fails with ErrDraining once
// draining, and with ErrPendingLimit or ErrClientLimit at those budgets; the caller still owns
// client then.
func (t *Tracker) Add(client *net.TCPConn) (*Conn, error) {
	var addr netip.Addr
	if ta, ok := client.RemoteAddr().(*net.TCPAddr); ok {
		addr = ta.AddrPort().Addr().Unmap()
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.draining {
		return nil, ErrDraining
	}
	if t.cfg.MaxPending > 0 && t.pending >= t.cfg.MaxPending {
		return nil, ErrPendingLimit
	}
	if t.cfg.MaxPendingPerClient > 0 && t.perClient[addr] >= t.cfg.MaxPendingPerClient {
		return nil, ErrClientLimit
	}
	c := &Conn{t: t, client: client, clientAddr: addr}
	t.conns[c] = struct{}{}
	t.pending++
	t.perClient[addr]++
	t.wg.Add(1)
	t.count.Add(1)
	return c, nil
}

// Admit moves a decided, allowed connection from the pending budget to the admitted ones. It
// fails with ErrLimit or ErrIdentityLimit; the connection stays pending then. Admitting twice
// is a no-op (a keep-alive connection is admitted by its first request).
func (c *Conn) Admit(identity string) error {
	t := c.t
	t.mu.Lock()
	defer t.mu.Unlock()
	if c.admitted {
		return nil
	}
	if t.cfg.MaxConns > 0 && t.admitted >= t.cfg.MaxConns {
		return ErrLimit
	}
	if t.cfg.MaxPerIdentity > 0 && t.perIdentity[identity] >= t.cfg.MaxPerIdentity {
		return ErrIdentityLimit
	}
	t.unpend(c)
	c.admitted, c.identity = true, identity
	t.admitted++
	t.perIdentity[identity]++
	return nil
}

// unpend removes c from the pending counts; under t.mu.
func (t *Tracker) unpend(c *Conn) {
	t.pending--
	if t.perClient[c.clientAddr]--; t.perClient[c.clientAddr] <= 0 {
		delete(t.perClient, c.clientAddr)
	}
}

// SetStillAllowed registers the question Revalidate asks after a policy change.
func (c *Conn) SetStillAllowed(f func() bool) {
	c.t.mu.Lock()
	c.stillAllowed = f
	c.t.mu.Unlock()
}

// Revalidate asks every connection that registered a question whether it may go on, and
// closes those that may not with reason policy_revoked. The questions are asked outside the
// tracker lock. It returns how many it closed.
func (t *Tracker) Revalidate() int {
	t.mu.Lock()
	var list []*Conn
	var checks []func() bool
	for c := range t.conns {
		if c.stillAllowed != nil {
			list, checks = append(list, c), append(checks, c.stillAllowed)
		}
	}
	t.mu.Unlock()
	closed := 0
	for i, c := range list {
		if !checks[i]() {
			c.closeWith(outcome.PolicyRevoked)
			closed++
		}
	}
	return closed
}

// Len returns the number of tracked connections.
func (t *Tracker) Len() int { return int(t.count.Load()) }

// Done stops tracking c and closes both of its sockets. It must be called exactly once per
// successful Add.
func (c *Conn) Done() {
	t := c.t
	t.mu.Lock()
	delete(t.conns, c)
	if c.admitted {
		t.admitted--
		if t.perIdentity[c.identity]--; t.perIdentity[c.identity] <= 0 {
			delete(t.perIdentity, c.identity)
		}
	} else {
		t.unpend(c)
	}
	t.mu.Unlock()
	c.closeSockets()
	t.count.Add(-1)
	t.wg.Done()
}

// SetUpstream attaches the dialed upstream so that the tracker closes it with the client. If
// the tracker already closed the connection, the upstream is closed at once and false is
// returned.
func (c *Conn) SetUpstream(u *net.TCPConn) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.reason != 0 {
		u.Close()
		return false
	}
	c.upstream = u
	return true
}

// SetCancel registers what to call when the tracker closes the connection, for what its
// goroutine waits on besides its two sockets: a plain-HTTP request on a pooled upstream
// connection, which closing the client does not end. nil unregisters. If the tracker already
// closed the connection, cancel is called at once and false is returned.
func (c *Conn) SetCancel(cancel func()) bool {
	c.mu.Lock()
	closed := c.reason != 0
	if !closed {
		c.cancel = cancel
	}
	c.mu.Unlock()
	if closed && cancel != nil {
		cancel()
	}
	return !closed
}

// Upstream returns the upstream attached with SetUpstream, or nil.
func (c *Conn) Upstream() *net.TCPConn {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.upstream
}

// CloseReason returns why the tracker closed the connection, or 0 if it did not.
func (c *Conn) CloseReason() outcome.CloseReason {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.reason
}

// closeWith closes both sockets, recording reason unless one was recorded already.
func (c *Conn) closeWith(reason outcome.CloseReason) {
	c.mu.Lock()
	if c.reason == 0 {
		c.reason = reason
	}
	cancel := c.cancel
	c.cancel = nil
	c.mu.Unlock()
	c.closeSockets()
	if cancel != nil {
		cancel()
	}
}

func (c *Conn) closeSockets() {
	c.mu.Lock()
	u := c.upstream
	c.mu.Unlock()
	c.client.Close()
	if u != nil {
		u.Close()
	}
}

// Start writes prefix (bytes already read from the client, such as a peeked ClientHello) to
// the upstream, then starts the two directions on goroutines of their own and returns. A
// clean EOF from one side is propagated as a half-close (shutdown SHUT_WR) to the other, so
// request/response protocols that close their sending side keep working. done runs once, on
// the goroutine that finishes last, with the bytes moved each way (prefix included) and why
// the relay ended. The goroutine that parsed, decided and dialed does not wait: an open
// tunnel costs two small stacks, not that goroutine's grown one besides them.
func (c *Conn) Start(prefix []byte, done func(up, down int64, reason outcome.CloseReason)) {
	c.mu.Lock()
	u := c.upstream
	c.mu.Unlock()
	if u == nil {
		done(0, 0, outcome.Reset)
		return
	}
	var n [2]int64 // up (client to upstream, prefix included), down
	var errs [2]error
	if len(prefix) > 0 {
		w, err := u.Write(prefix)
		n[0] = int64(w)
		if err != nil {
			c.closeWith(outcome.Reset)
			done(n[0], 0, c.finalReason(err, nil))
			return
		}
	}
	// The last of the two directions to finish reports; the atomic orders each one's results
	// before the report.
	var left atomic.Int32
	left.Store(2)
	relay := func(i int, dst, src *net.TCPConn) {
		m, err := copyHalf(dst, src)
		n[i], errs[i] = n[i]+m, err
		if err == nil {
			dst.CloseWrite()
		} else {
			// The other direction cannot usefully go on once one side failed.
			c.closeWith(outcome.Reset)
		}
		if left.Add(-1) == 0 {
			done(n[0], n[1], c.finalReason(errs[0], errs[1]))
		}
	}
	go relay(0, u, c.client)
	go relay(1, c.client, u)
}

// plainFirst is how many bytes of each direction may be copied through user space with
// read(2) and write(2) before the relay hands the rest to splice(2). A read that fills the
// whole buffer means bulk data, which goes to splice at once. Small exchanges cost the same
// CPU either way (the same number of calls; the kernel's TCP work dominates), but a splice
// keeps a pipe (two descriptors and its buffers) for as long as it waits on its socket, so a
// quiet tunnel held four pipe descriptors besides its two sockets: 2,000 idle tunnels held
// 12,000 descriptors, against 4,000 now, under a hard limit of 20,000. Zero splices from the
// first byte.
var plainFirst int64 = 64 << 10

// plainBufSize is the user-space buffer of the first bytes; it is taken from a pool only
// once the socket is readable, so an idle tunnel holds none.
const plainBufSize = 16 << 10

var plainBufs = sync.Pool{New: func() any { b := make([]byte, plainBufSize); return &b }}

// copyHalf copies src to dst until EOF (nil error) or an error: the first bytes by read and
// write, the rest (io.Copy between two *net.TCPConn) by splice(2).
func copyHalf(dst, src *net.TCPConn) (int64, error) {
	var n int64
	if plainFirst > 0 {
		rc, err := src.SyscallConn()
		if err != nil {
			return 0, err
		}
		var r plainRead
		read := r.read // one closure for every read of this direction
		for n < plainFirst {
			r.buf = nil // the last one went back to the pool
			err := rc.Read(read)
			if err == nil && r.err != nil {
				err = os.NewSyscallError("read", r.err)
			}
			if err != nil {
				if r.buf != nil {
					plainBufs.Put(r.buf)
				}
				return n, err
			}
			if r.n <= 0 {
				plainBufs.Put(r.buf)
				return n, nil // EOF
			}
			nw, werr := dst.Write((*r.buf)[:r.n])
			plainBufs.Put(r.buf)
			n += int64(nw)
			if werr != nil {
				return n, werr
			}
			if r.n == plainBufSize {
				break // bulk: splice the rest
			}
		}
	}
	// dst.ReadFrom(src) splices.
	m, err := io.Copy(dst, src)
	return n + m, err
}

// plainRead is one read(2) of copyHalf, run by RawConn.Read once the socket is readable.
type plainRead struct {
	buf *[]byte
	n   int
	err error
}

// read takes a buffer only for a read that finds bytes (or EOF): a socket with nothing to read
// gives it back before RawConn.Read waits, so an idle tunnel holds no buffer.
func (r *plainRead) read(fd uintptr) bool {
	r.buf = plainBufs.Get().(*[]byte)
	for {
		r.n, r.err = unix.Read(int(fd), *r.buf)
		if r.err != unix.EINTR {
			break
		}
	}
	if r.err == unix.EAGAIN {
		plainBufs.Put(r.buf)
		r.buf = nil
		return false
	}
	return true
}

func (c *Conn) finalReason(upErr, downErr error) outcome.CloseReason {
	if r := c.CloseReason(); r != 0 {
		return r
	}
	if upErr != nil || downErr != nil {
		return outcome.Reset
	}
	return outcome.Closed
}

// Run samples idleness every tick until ctx is done, closing connections on which no byte
// moved for the idle timeout (or the drain idle timeout while draining).
func (t *Tracker) Run(ctx context.Context) {
	tick := time.NewTicker(t.cfg.Tick)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-tick.C:
			t.reap(now)
		}
	}
}

// reap closes the connections on which no byte moved for the idle limit. The tracker lock is
// held only to copy the list: one getsockopt per connection at 10,000 tunnels would otherwise
// hold up every accept and close for the whole sweep.
func (t *Tracker) reap(now time.Time) {
	t.mu.Lock()
	limit := t.cfg.IdleTimeout
	if t.draining && t.cfg.DrainIdleTimeout > 0 && (limit <= 0 || t.cfg.DrainIdleTimeout < limit) {
		limit = t.cfg.DrainIdleTimeout
	}
	draining := t.draining
	conns := t.snapshot[:0]
	if limit > 0 {
		for c := range t.conns {
			conns = append(conns, c)
		}
	}
	t.mu.Unlock()

	reason := outcome.IdleTimeout
	if draining {
		reason = outcome.Drain
	}
	for i, c := range conns {
		conns[i] = nil // do not keep finished connections reachable until the next sweep
		b, ok := t.probe(c.client)
		if !ok || b != c.lastBytes || c.lastChange.IsZero() {
			c.lastBytes = b
			c.lastChange = now
			continue
		}
		if now.Sub(c.lastChange) >= limit {
			c.closeWith(reason)
		}
	}
	t.snapshot = conns[:0]
}

// socketBytes returns bytes received plus bytes acknowledged on the socket: the sum moves
// whenever data flows in either direction through it. ok is false when the counters cannot be
// read (the socket is closing), which the caller treats as activity.
func socketBytes(conn *net.TCPConn) (uint64, bool) {
	rc, err := conn.SyscallConn()
	if err != nil {
		return 0, false
	}
	var info *unix.TCPInfo
	var serr error
	err = rc.Control(func(fd uintptr) {
		info, serr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
	})
	if err != nil || serr != nil {
		return 0, false
	}
	return info.Bytes_received + info.Bytes_acked, true
}

// Drain refuses new connections, waits for the tracked ones to end by themselves (idle ones
// are closed after the drain idle timeout by Run), and when ctx ends closes the rest with
// reason drain. It returns once every tracked connection is done, so that each one's close
// line has been logged before the process exits.
func (t *Tracker) Drain(ctx context.Context) {
	t.mu.Lock()
	t.draining = true
	t.mu.Unlock()

	done := make(chan struct{})
	go func() { t.wg.Wait(); close(done) }()
	select {
	case <-done:
		return
	case <-ctx.Done():
	}
	t.mu.Lock()
	rest := make([]*Conn, 0, len(t.conns))
	for c := range t.conns {
		rest = append(rest, c)
	}
	t.mu.Unlock()
	for _, c := range rest {
		c.closeWith(outcome.Drain)
	}
	<-done
}

// Draining reports whether Drain has started.
func (t *Tracker) Draining() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.draining
}
