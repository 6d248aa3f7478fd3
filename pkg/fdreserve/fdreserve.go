// Package fdreserve keeps a listener accepting while the process is out of file descriptors:
// the admin endpoints (/health, /ready, /metrics) of the proxy and of the control plane.
// Without it, many clients can take every descriptor: the proxy's accept loops back off and
// recover once the clients go, but the admin listener cannot accept either, the kubelet's
// liveness probe on /health fails, and the kubelet restarts the container, cutting every live
// tunnel (or every sidecar's policy connection): an outage made of an exhaustion that would
// otherwise pass.
package fdreserve

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// AdminReserve is how many descriptors an admin listener keeps in reserve: enough for the
// kubelet's liveness and readiness probes and a scrape at once, few enough to cost the
// process almost nothing of its budget.
const AdminReserve = 4

// Listen wraps ln with a reserve of size descriptors (see reserveListener).
func Listen(ln net.Listener, size int) net.Listener { return newReserveListener(ln, size, nil, nil) }

// reserveListener holds a few descriptors (of /dev/null) that nothing else can take. When
// Accept fails because the process (EMFILE) or the system (ENFILE) is out of descriptors, it
// waits until a connection is queued, closes one reserve descriptor and accepts again at once,
// into the descriptor just freed. When that connection closes, its descriptor goes back into
// the reserve. With the reserve spent, Accept returns the error as before (net/http backs off
// and retries).
//
// The wait matters: accept(2) takes a descriptor before it looks at the queue, so it fails
// with EMFILE even when no connection is waiting, as it does each time net/http calls Accept
// again during an exhaustion. Freeing a descriptor then would leave it free while Accept
// blocks, for the proxy's accept loops to take.
//
// Another thread of the process (a proxy accept loop retrying) may still take a freed
// descriptor in the instant before the accept: the accept then fails again and spends the
// next one. A descriptor lost that way is taken back later: every Accept and every close of a
// connection that used the reserve tops the reserve up, which costs nothing while it is full.
type reserveListener struct {
	net.Listener
	size int
	take func() (io.Closer, error) // takes one descriptor for the reserve
	wait func() error              // returns once a connection is queued (nil: do not wait)

	mu     sync.Mutex
	spare  []io.Closer
	closed bool
}

// newReserveListener wraps ln with a reserve of size descriptors, taken with take (nil: open
// /dev/null), and waits for queued connections with wait (nil: poll ln). The reserve is
// filled now, as far as it can be.
func newReserveListener(ln net.Listener, size int, take func() (io.Closer, error), wait func() error) *reserveListener {
	if take == nil {
		take = func() (io.Closer, error) { return os.Open(os.DevNull) }
	}
	if wait == nil {
		wait = queueWaiter(ln)
	}
	l := &reserveListener{Listener: ln, size: size, take: take, wait: wait}
	l.refill()
	return l
}

// Accept accepts a connection, spending the reserve one descriptor at a time when the
// process is out of them.
func (l *reserveListener) Accept() (net.Conn, error) {
	l.refill()
	c, err := l.Listener.Accept()
	for err != nil && outOfDescriptors(err) && l.spares() > 0 {
		if l.wait != nil {
			if werr := l.wait(); werr != nil {
				return nil, werr
			}
		}
		r := l.pop()
		if r == nil {
			break
		}
		r.Close()
		if c, err = l.Listener.Accept(); err == nil {
			return &reserveConn{Conn: c, l: l}, nil
		}
		// Not accepted: someone else took the freed descriptor (try the next one), or a
		// different error (returned).
	}
	return c, err
}

// Close closes the listener and gives the reserve back.
func (l *reserveListener) Close() error {
	l.mu.Lock()
	l.closed = true
	spare := l.spare
	l.spare = nil
	l.mu.Unlock()
	for _, r := range spare {
		r.Close()
	}
	return l.Listener.Close()
}

// refill tops the reserve up to its size, stopping at the first descriptor it cannot take.
func (l *reserveListener) refill() {
	l.mu.Lock()
	defer l.mu.Unlock()
	for !l.closed && len(l.spare) < l.size {
		r, err := l.take()
		if err != nil {
			return
		}
		l.spare = append(l.spare, r)
	}
}

// pop removes a descriptor from the reserve, or returns nil when it is spent.
func (l *reserveListener) pop() io.Closer {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.spare) == 0 {
		return nil
	}
	r := l.spare[len(l.spare)-1]
	l.spare = l.spare[:len(l.spare)-1]
	return r
}

// spares is the number of descriptors in the reserve.
func (l *reserveListener) spares() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.spare)
}

// reserveConn is a connection accepted on a reserve descriptor: its first Close frees that
// descriptor and takes it back into the reserve (a second Close takes nothing).
type reserveConn struct {
	net.Conn
	l    *reserveListener
	once sync.Once
}

func (c *reserveConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.l.refill)
	return err
}

// outOfDescriptors reports whether err is the process's or the system's descriptor limit.
func outOfDescriptors(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE)
}

// queuePoll bounds one poll(2) of the listener while waiting: how long a Close of the
// listener may wait for the waiter to let go of its descriptor.
const queuePoll = 100 // ms

// queueWaiter returns a function that waits until a connection is queued on ln, or ln is
// closed (an error). It polls the socket itself, since the runtime's poller is not available
// for a listener's raw descriptor (its RawConn only supports Control). Nil when ln has no
// descriptor (Accept then does not wait).
func queueWaiter(ln net.Listener) func() error {
	sc, ok := ln.(syscall.Conn)
	if !ok {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return func() error {
		for {
			queued := false
			err := rc.Control(func(fd uintptr) {
				fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
				n, err := unix.Poll(fds, queuePoll)
				// EINTR (the runtime's preemption signals) polls again; any other error
				// stops waiting rather than wait forever.
				queued = n > 0 || (err != nil && err != unix.EINTR)
			})
			if err != nil {
				return err // closed
			}
			if queued {
				return nil
			}
		}
	}
}
