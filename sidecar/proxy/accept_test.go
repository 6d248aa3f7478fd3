package proxy

import (
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"
)

// exhaustedListener fails its next Accepts with EMFILE, as the kernel does when the process
// is out of descriptors, then accepts normally.
type exhaustedListener struct {
	net.Listener
	mu    sync.Mutex
	fails int // failures still to return
	calls int // failed accepts returned so far
}

func (l *exhaustedListener) Accept() (net.Conn, error) {
	l.mu.Lock()
	if l.fails > 0 {
		l.fails--
		l.calls++
		l.mu.Unlock()
		return nil, &net.OpError{Op: "accept", Net: "tcp", Addr: l.Addr(), Err: os.NewSyscallError("accept4", syscall.EMFILE)}
	}
	l.mu.Unlock()
	return l.Listener.Accept()
}

func (l *exhaustedListener) exhaust(n int) {
	l.mu.Lock()
	l.fails += n
	l.mu.Unlock()
}

func (l *exhaustedListener) failed() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.calls
}

// Out of descriptors, the accept loop backs off and keeps serving; each episode is logged
// once when it starts and once when accepting works again, with the count of failed accepts.
func TestAcceptOutOfDescriptorsBacksOffAndRecovers(t *testing.T) {
	f := start(t, loopPolicy)
	port, _ := echoServer(t)
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := &exhaustedListener{Listener: inner}

	for round, n := range []int{6, 3} {
		mark := f.logs.mark()
		before := ln.failed()
		ln.exhaust(n)
		if round == 0 {
			go f.server.Serve(ln)
		} else {
			// The loop waits in an accept that works: one more connection (silent, so it
			// writes no line) brings it back to the failing ones.
			c, err := net.Dial("tcp", inner.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			c.Close()
		}
		// Every failure is returned (the loop backs off: 5+10+20+40+80+160ms for six).
		waitFor(t, func() bool { return ln.failed() == before+n })
		time.Sleep(50 * time.Millisecond)
		if recs := f.logs.records(mark, "accept failing; backing off"); len(recs) != 1 {
			t.Fatalf("round %d: %d 'accept failing' lines for %d failed accepts, want 1: %v", round, len(recs), n, recs)
		}
		if recs := f.logs.records(mark, "accepting again"); len(recs) != 0 {
			t.Fatalf("round %d: 'accepting again' before any accept worked: %v", round, recs)
		}
		expect(t, f.logs.one(t, mark, "accept failing; backing off"), "level", "WARN", "listener", "explicit",
			"addr", inner.Addr().String(), "fd_exhausted", true, "err", "accept tcp "+inner.Addr().String()+": accept4: too many open files")

		// A connection made now is served.
		code, br, c := rawRequest(t, inner.Addr().String(), connectReq("127.0.0.1:"+port, basic("k1")))
		if code != http.StatusOK {
			t.Fatalf("round %d: CONNECT after the exhaustion = %d", round, code)
		}
		io.WriteString(c, "ping")
		buf := make([]byte, 4)
		if _, err := io.ReadFull(br, buf); err != nil || string(buf) != "ping" {
			t.Fatalf("round %d: echo through the tunnel: %q %v", round, buf, err)
		}
		c.Close()
		expect(t, f.logs.one(t, mark, "accepting again"), "level", "INFO", "listener", "explicit",
			"addr", inner.Addr().String(), "failed_accepts", n)
		// Still one line each after the connection.
		if recs := f.logs.records(mark, "accept failing; backing off"); len(recs) != 1 {
			t.Fatalf("round %d: %d 'accept failing' lines, want 1", round, len(recs))
		}
	}
}
