package fdreserve

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"
)

// fdTable stands for the process's descriptor table: free descriptors, taken and given back
// by the fake listener, its connections and the reserve. Exhausting the real table is not
// safe in a shared test process.
type fdTable struct {
	mu    sync.Mutex
	free  int
	takes int // reserve takes attempted (refills)
}

func (t *fdTable) get() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.free == 0 {
		return syscall.EMFILE
	}
	t.free--
	return nil
}

func (t *fdTable) put() {
	t.mu.Lock()
	t.free++
	t.mu.Unlock()
}

func (t *fdTable) counts() (free, takes int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.free, t.takes
}

// take is the reserve's take: one descriptor of the table, given back by its Close. A
// descriptor whose stolen flag is set when it is closed goes to "another thread" instead of
// the table (it is not freed for the accept that follows).
func (t *fdTable) take(stolen *int) func() (io.Closer, error) {
	return func() (io.Closer, error) {
		t.mu.Lock()
		t.takes++
		t.mu.Unlock()
		if err := t.get(); err != nil {
			return nil, &os.PathError{Op: "open", Path: os.DevNull, Err: err}
		}
		return closerFunc(func() error {
			t.mu.Lock()
			defer t.mu.Unlock()
			if *stolen > 0 {
				*stolen--
				return nil
			}
			t.free++
			return nil
		}), nil
	}
}

type closerFunc func() error

func (f closerFunc) Close() error { return f() }

// fakeListener accepts like accept(2): it takes a descriptor first (EMFILE when there is
// none, whether or not a connection is queued), then waits for a queued connection.
type fakeListener struct {
	fds    *fdTable
	queue  chan struct{}
	closed chan struct{}
	once   sync.Once
}

func newFakeListener(fds *fdTable) *fakeListener {
	return &fakeListener{fds: fds, queue: make(chan struct{}, 16), closed: make(chan struct{})}
}

func (l *fakeListener) Accept() (net.Conn, error) {
	if err := l.fds.get(); err != nil {
		return nil, &net.OpError{Op: "accept", Net: "tcp", Err: os.NewSyscallError("accept4", err)}
	}
	select {
	case <-l.queue:
		return &fakeConn{fds: l.fds}, nil
	case <-l.closed:
		l.fds.put()
		return nil, net.ErrClosed
	}
}

// waitQueued is the fake's queue waiter: it returns once a connection is queued.
func (l *fakeListener) waitQueued() error {
	for len(l.queue) == 0 {
		select {
		case <-l.closed:
			return net.ErrClosed
		case <-time.After(time.Millisecond):
		}
	}
	return nil
}

func (l *fakeListener) Close() error   { l.once.Do(func() { close(l.closed) }); return nil }
func (l *fakeListener) Addr() net.Addr { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 9090} }

// fakeConn gives its descriptor back on its first Close only, as a socket does.
type fakeConn struct {
	net.Conn
	fds  *fdTable
	once sync.Once
}

func (c *fakeConn) Close() error {
	err := net.ErrClosed
	c.once.Do(func() { c.fds.put(); err = nil })
	return err
}

// reserveSetup: a table of free descriptors, all taken by a reserve of size free.
func reserveSetup(t *testing.T, free int, stolen *int) (*fdTable, *fakeListener, *reserveListener) {
	t.Helper()
	fds := &fdTable{free: free}
	fl := newFakeListener(fds)
	l := newReserveListener(fl, free, fds.take(stolen), fl.waitQueued)
	t.Cleanup(func() { l.Close() })
	if got, takes := fds.counts(); got != 0 || takes != free || l.spares() != free {
		t.Fatalf("after setup: free %d, takes %d, spares %d; want 0, %d, %d", got, takes, l.spares(), free, free)
	}
	return fds, fl, l
}

func checkReserve(t *testing.T, what string, fds *fdTable, l *reserveListener, free, takes, spares int) {
	t.Helper()
	if f, tk := fds.counts(); f != free || tk != takes || l.spares() != spares {
		t.Fatalf("%s: free %d, takes %d, spares %d; want %d, %d, %d", what, f, tk, l.spares(), free, takes, spares)
	}
}

// Out of descriptors, a queued connection is accepted on a reserve descriptor, which its
// Close takes back, once.
func TestReserveListenerAcceptsOutOfDescriptors(t *testing.T) {
	var stolen int
	fds, fl, l := reserveSetup(t, 4, &stolen)

	fl.queue <- struct{}{}
	a, err := l.Accept()
	if err != nil {
		t.Fatalf("accept out of descriptors: %v", err)
	}
	if _, ok := a.(*reserveConn); !ok {
		t.Fatalf("accepted %T, want *reserveConn", a)
	}
	// The reserve was full: no take before the accept.
	checkReserve(t, "one accepted", fds, l, 0, 4, 3)
	fl.queue <- struct{}{}
	b, err := l.Accept()
	if err != nil {
		t.Fatalf("second accept: %v", err)
	}
	checkReserve(t, "two accepted", fds, l, 0, 5, 2) // one failed take before it

	if err := a.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	checkReserve(t, "a closed", fds, l, 0, 7, 3)
	if err := a.Close(); err == nil {
		t.Fatal("second close: no error")
	}
	checkReserve(t, "a closed twice", fds, l, 0, 7, 3) // no second take
	b.Close()
	checkReserve(t, "b closed", fds, l, 0, 8, 4)
}

// With the reserve spent, Accept fails at once with EMFILE, as the plain listener does, and
// the next Accept after a connection closed works again.
func TestReserveListenerSpent(t *testing.T) {
	var stolen int
	fds, fl, l := reserveSetup(t, 2, &stolen)
	var conns []net.Conn
	for range 2 {
		fl.queue <- struct{}{}
		c, err := l.Accept()
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	checkReserve(t, "two accepted", fds, l, 0, 3, 0)
	// Nothing queued: no waiting either.
	done := make(chan error, 1)
	go func() {
		c, err := l.Accept()
		if c != nil {
			err = errors.New("accepted a connection")
		}
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, syscall.EMFILE) {
			t.Fatalf("accept with the reserve spent: %v; want EMFILE", err)
		}
	case <-time.After(time.Second):
		t.Fatal("accept with the reserve spent did not return")
	}
	conns[0].Close()
	checkReserve(t, "one closed", fds, l, 0, 6, 1)
	fl.queue <- struct{}{}
	c, err := l.Accept()
	if err != nil {
		t.Fatalf("accept after a close: %v", err)
	}
	checkReserve(t, "accepted again", fds, l, 0, 7, 0)
	c.Close()
	conns[1].Close()
	checkReserve(t, "all closed", fds, l, 0, 10, 2)
}

// Out of descriptors with no connection queued, Accept waits without spending the reserve:
// a descriptor freed then would be free for the proxy's accept loops while Accept blocks.
func TestReserveListenerWaitsForAQueuedConnection(t *testing.T) {
	var stolen int
	fds, fl, l := reserveSetup(t, 4, &stolen)
	type result struct {
		c   net.Conn
		err error
	}
	done := make(chan result, 1)
	go func() {
		c, err := l.Accept()
		done <- result{c, err}
	}()
	time.Sleep(50 * time.Millisecond)
	select {
	case r := <-done:
		t.Fatalf("accept returned with nothing queued: %v, %v", r.c, r.err)
	default:
	}
	checkReserve(t, "waiting", fds, l, 0, 4, 4)
	fl.queue <- struct{}{}
	var r result
	select {
	case r = <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("accept did not return once a connection was queued")
	}
	if r.err != nil {
		t.Fatal(r.err)
	}
	checkReserve(t, "accepted", fds, l, 0, 4, 3)
	r.c.Close()
	checkReserve(t, "closed", fds, l, 0, 5, 4)
}

// A freed descriptor taken by another thread before the accept costs the next one; the
// reserve is topped up once descriptors are free again.
func TestReserveListenerStolenDescriptor(t *testing.T) {
	stolen := 1
	fds, fl, l := reserveSetup(t, 4, &stolen)
	fl.queue <- struct{}{}
	c, err := l.Accept()
	if err != nil {
		t.Fatalf("accept after a stolen descriptor: %v", err)
	}
	checkReserve(t, "accepted", fds, l, 0, 4, 2)
	c.Close()
	checkReserve(t, "closed", fds, l, 0, 6, 3)
	fds.put() // the other thread closes what it took
	fl.queue <- struct{}{}
	c, err = l.Accept() // tops the reserve up with it, then accepts on a reserve descriptor
	if err != nil {
		t.Fatal(err)
	}
	checkReserve(t, "topped up and accepted", fds, l, 0, 7, 3)
	c.Close()
	checkReserve(t, "closed again", fds, l, 0, 8, 4)
}

// With descriptors to spare, the reserve is not touched and connections are not wrapped.
func TestReserveListenerNotExhausted(t *testing.T) {
	var stolen int
	fds := &fdTable{free: 10}
	fl := newFakeListener(fds)
	l := newReserveListener(fl, 4, fds.take(&stolen), fl.waitQueued)
	fl.queue <- struct{}{}
	c, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := c.(*fakeConn); !ok {
		t.Fatalf("accepted %T, want the listener's own connection", c)
	}
	checkReserve(t, "accepted", fds, l, 5, 4, 4)
	c.Close()
	checkReserve(t, "closed", fds, l, 6, 4, 4)
	// Close gives the reserve back.
	l.Close()
	checkReserve(t, "listener closed", fds, l, 10, 4, 0)
}

// A reserve connection closed after the listener takes nothing back.
func TestReserveListenerClosedListener(t *testing.T) {
	var stolen int
	fds, fl, l := reserveSetup(t, 2, &stolen)
	fl.queue <- struct{}{}
	c, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	l.Close()
	checkReserve(t, "listener closed", fds, l, 1, 2, 0)
	c.Close()
	checkReserve(t, "conn closed", fds, l, 2, 2, 0)
}

// The real queue waiter returns once a connection is queued on a real listener, not before,
// and with an error once the listener is closed.
func TestQueueWaiter(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	wait := queueWaiter(ln)
	if wait == nil {
		t.Fatal("no waiter for a TCP listener")
	}
	done := make(chan error, 1)
	go func() { done <- wait() }()
	select {
	case err := <-done:
		t.Fatalf("returned with nothing queued: %v", err)
	case <-time.After(250 * time.Millisecond):
	}
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("queued: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("did not return once a connection was queued")
	}
	// Still queued: returns at once.
	if err := wait(); err != nil {
		t.Fatal(err)
	}
	a, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	a.Close()

	go func() { done <- wait() }()
	time.Sleep(50 * time.Millisecond)
	ln.Close()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("returned nil after the listener closed")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("did not return after the listener closed")
	}
}

// The real reserve: descriptors of /dev/null, given back by Close.
func TestReserveListenerDevNull(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := newReserveListener(ln, 3, nil, nil)
	if l.spares() != 3 {
		t.Fatalf("spares %d, want 3", l.spares())
	}
	for _, r := range l.spare {
		if f, ok := r.(*os.File); !ok || f.Name() != os.DevNull {
			t.Fatalf("reserve holds %v", r)
		}
	}
	f := l.spare[0].(*os.File)
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	a, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	a.Close()
	l.Close()
	if l.spares() != 0 {
		t.Fatalf("spares %d after Close", l.spares())
	}
	if _, err := f.Stat(); !errors.Is(err, os.ErrClosed) {
		t.Fatalf("reserve descriptor after Close: %v", err)
	}
}
