package main

import (
	"errors"
	"fmt"
	"net/netip"
	"runtime"

	"golang.org/x/sys/unix"
)

// epollProxy is the event-loop proxy: every socket non-blocking in one level-triggered epoll
// set, served by one locked thread. Each tunnel is two ends; an end's pending bytes are those
// read from its peer and not yet written to it, and while an end has pending bytes its peer is
// not read (the backpressure that keeps memory bounded).
type epollProxy struct {
	ep, ln int
	ends   map[int]*end
	buf    []byte
}

type endState uint8

const (
	readingHead endState = iota // client: until the blank line
	waiting                     // client: until the upstream connects
	connecting                  // upstream: non-blocking connect in progress
	relaying
)

type end struct {
	fd      int
	state   endState
	peer    *end
	head    []byte // readingHead only
	pending []byte
	readEOF bool // this end sent FIN
	shut    bool // FIN sent to this end
	inSet   bool // in the epoll set
	mask    uint32
}

func listenEpoll(addr string) (*epollProxy, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return nil, fmt.Errorf("listen address: %w", err)
	}
	ln, err := socketTo(ap)
	if err != nil {
		return nil, err
	}
	unix.SetsockoptInt(ln, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
	if err := unix.Bind(ln, sockaddr(ap)); err != nil {
		unix.Close(ln)
		return nil, fmt.Errorf("bind %s: %w", ap, err)
	}
	if err := unix.Listen(ln, 4096); err != nil {
		unix.Close(ln)
		return nil, fmt.Errorf("listen %s: %w", ap, err)
	}
	ep, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll_create1: %w", err)
	}
	p := &epollProxy{ep: ep, ln: ln, ends: map[int]*end{}, buf: make([]byte, 64<<10)}
	if err := unix.EpollCtl(ep, unix.EPOLL_CTL_ADD, ln, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(ln)}); err != nil {
		return nil, fmt.Errorf("epoll_ctl listener: %w", err)
	}
	return p, nil
}

func socketTo(ap netip.AddrPort) (int, error) {
	family := unix.AF_INET
	if ap.Addr().Is6() && !ap.Addr().Is4In6() {
		family = unix.AF_INET6
	}
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("socket: %w", err)
	}
	return fd, nil
}

func sockaddr(ap netip.AddrPort) unix.Sockaddr {
	a := ap.Addr().Unmap()
	if a.Is4() {
		return &unix.SockaddrInet4{Port: int(ap.Port()), Addr: a.As4()}
	}
	return &unix.SockaddrInet6{Port: int(ap.Port()), Addr: a.As16()}
}

func (p *epollProxy) serve() error {
	// The loop is the proxy: keep it on one thread, as an event-driven server in C would be.
	runtime.LockOSThread()
	events := make([]unix.EpollEvent, 256)
	for {
		n, err := unix.EpollWait(p.ep, events, -1)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return fmt.Errorf("epoll_wait: %w", err)
		}
		for _, ev := range events[:n] {
			if int(ev.Fd) == p.ln {
				p.accept()
				continue
			}
			if e := p.ends[int(ev.Fd)]; e != nil {
				p.handle(e, ev.Events)
			}
		}
	}
}

func (p *epollProxy) accept() {
	for {
		fd, _, err := unix.Accept4(p.ln, unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC)
		if err != nil {
			// EAGAIN; or out of descriptors, when the listener stays readable and the loop
			// retries at once (a floor has no back-off; the bench stays under its limit).
			return
		}
		unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
		e := &end{fd: fd, state: readingHead}
		p.ends[fd] = e
		p.watch(e, unix.EPOLLIN)
	}
}

func (p *epollProxy) handle(e *end, events uint32) {
	switch e.state {
	case readingHead:
		p.readHead(e)
	case connecting:
		p.connected(e)
	case waiting:
		p.closeTunnel(e) // only an error or hang-up reaches a client that is not watched
	case relaying:
		if events&unix.EPOLLERR != 0 {
			p.closeTunnel(e)
			return
		}
		if events&unix.EPOLLOUT != 0 && !p.flush(e) {
			return
		}
		// A hang-up cannot be masked, so it is read even while the peer is full: the read
		// that sees EOF ends the loop.
		room := len(e.peer.pending) == 0 || events&unix.EPOLLHUP != 0
		readable := events&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP) != 0
		if readable && !e.readEOF && room && !p.relay(e) {
			return
		}
		p.settle(e)
	}
}

func (p *epollProxy) readHead(c *end) {
	n, err := unix.Read(c.fd, p.buf)
	if errors.Is(err, unix.EAGAIN) {
		return
	}
	if err != nil || n == 0 {
		p.close(c)
		return
	}
	c.head = append(c.head, p.buf[:n]...)
	headLen := headEnd(c.head)
	if headLen > maxHead || headLen == 0 && len(c.head) >= maxHead {
		p.refuse(c, badRequest)
		return
	}
	if headLen == 0 {
		return
	}
	target, err := parseConnect(c.head[:headLen])
	if err != nil {
		p.refuse(c, badRequest)
		return
	}
	fd, err := socketTo(target)
	if err != nil {
		p.refuse(c, badGateway)
		return
	}
	if err := unix.Connect(fd, sockaddr(target)); err != nil && !errors.Is(err, unix.EINPROGRESS) {
		unix.Close(fd)
		p.refuse(c, badGateway)
		return
	}
	up := &end{fd: fd, state: connecting, peer: c, pending: append([]byte(nil), c.head[headLen:]...)}
	c.peer, c.state, c.head = up, waiting, nil
	p.ends[fd] = up
	p.watch(c, 0)
	p.watch(up, unix.EPOLLOUT)
}

func (p *epollProxy) connected(up *end) {
	c := up.peer
	if soErr, err := unix.GetsockoptInt(up.fd, unix.SOL_SOCKET, unix.SO_ERROR); err != nil || soErr != 0 {
		p.close(up)
		p.refuse(c, badGateway)
		return
	}
	unix.SetsockoptInt(up.fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	up.state, c.state = relaying, relaying
	c.pending = append(c.pending, established...)
	// The 200 first, then whatever the client sent behind its head.
	if p.flush(c) && p.flush(up) {
		p.settle(c)
	}
}

// relay reads what e sent and writes it to its peer; what the peer cannot take now stays
// pending there. False when the tunnel was closed.
func (p *epollProxy) relay(e *end) bool {
	n, err := unix.Read(e.fd, p.buf)
	switch {
	case errors.Is(err, unix.EAGAIN):
		return true
	case err != nil:
		p.closeTunnel(e)
		return false
	case n == 0:
		e.readEOF = true
		if len(e.peer.pending) == 0 {
			p.shutdown(e.peer)
		}
		return true
	}
	e.peer.pending = append(e.peer.pending, p.buf[:n]...)
	return p.flush(e.peer)
}

// settle closes a tunnel both of whose ends have sent FIN and received everything, and
// otherwise re-registers what the two ends wait for.
func (p *epollProxy) settle(e *end) {
	if e.readEOF && e.peer.readEOF && len(e.pending) == 0 && len(e.peer.pending) == 0 {
		p.closeTunnel(e)
		return
	}
	p.rewatch(e)
	p.rewatch(e.peer)
}

// flush writes e's pending bytes; false when the tunnel was closed on a write error.
func (p *epollProxy) flush(e *end) bool {
	for len(e.pending) > 0 {
		n, err := unix.Write(e.fd, e.pending)
		if errors.Is(err, unix.EAGAIN) {
			break
		}
		if err != nil {
			p.closeTunnel(e)
			return false
		}
		e.pending = e.pending[n:]
	}
	if len(e.pending) == 0 {
		e.pending = nil
		if e.peer.readEOF {
			p.shutdown(e)
		}
	}
	return true
}

func (p *epollProxy) shutdown(e *end) {
	if !e.shut {
		unix.Shutdown(e.fd, unix.SHUT_WR)
		e.shut = true
	}
}

// rewatch registers the events e waits for: readable while it has not sent FIN and its peer
// has room, writable while it has pending bytes. An end that is finished both ways leaves the
// set, or its hang-up, which no mask hides, would wake the loop until the peer finishes.
func (p *epollProxy) rewatch(e *end) {
	if e.readEOF && e.shut && len(e.pending) == 0 {
		if e.inSet {
			unix.EpollCtl(p.ep, unix.EPOLL_CTL_DEL, e.fd, nil)
			e.inSet = false
		}
		return
	}
	var mask uint32
	if !e.readEOF && len(e.peer.pending) == 0 {
		mask |= unix.EPOLLIN | unix.EPOLLRDHUP
	}
	if len(e.pending) > 0 {
		mask |= unix.EPOLLOUT
	}
	p.watch(e, mask)
}

func (p *epollProxy) watch(e *end, mask uint32) {
	if e.inSet && mask == e.mask {
		return
	}
	op := unix.EPOLL_CTL_MOD
	if !e.inSet {
		op, e.inSet = unix.EPOLL_CTL_ADD, true
	}
	e.mask = mask
	unix.EpollCtl(p.ep, op, e.fd, &unix.EpollEvent{Events: mask, Fd: int32(e.fd)})
}

// refuse answers the client with a status and closes it (best effort: a floor does not wait
// for a slow reader of an error).
func (p *epollProxy) refuse(c *end, status []byte) {
	unix.Write(c.fd, status)
	p.close(c)
}

func (p *epollProxy) closeTunnel(e *end) {
	if e.peer != nil {
		p.close(e.peer)
	}
	p.close(e)
}

func (p *epollProxy) close(e *end) {
	if p.ends[e.fd] == e {
		delete(p.ends, e.fd)
		unix.Close(e.fd) // closing removes it from the epoll set
	}
}

// addr is the address the proxy listens on (a port 0 made real).
func (p *epollProxy) addr() (string, error) {
	sa, err := unix.Getsockname(p.ln)
	if err != nil {
		return "", fmt.Errorf("getsockname: %w", err)
	}
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port)).String(), nil
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(sa.Port)).String(), nil
	}
	return "", fmt.Errorf("listener address of type %T", sa)
}
