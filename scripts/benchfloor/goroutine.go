package main

import (
	"io"
	"net"
	"time"
)

// serveGoroutines is the plain Go proxy: one goroutine per connection, blocking calls on the
// net package's netpoller, io.Copy (splice) in both directions.
func serveGoroutines(ln net.Listener) error {
	for {
		c, err := ln.Accept()
		if err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				continue
			}
			// Out of descriptors and the like: wait rather than spin.
			time.Sleep(10 * time.Millisecond)
			continue
		}
		go tunnel(c.(*net.TCPConn))
	}
}

func tunnel(c *net.TCPConn) {
	defer c.Close()
	buf := make([]byte, maxHead)
	n, end := 0, 0
	for end == 0 {
		if n == len(buf) {
			c.Write(badRequest)
			return
		}
		m, err := c.Read(buf[n:])
		if err != nil {
			return
		}
		n += m
		end = headEnd(buf[:n])
	}
	target, err := parseConnect(buf[:end])
	if err != nil {
		c.Write(badRequest)
		return
	}
	up, err := net.DialTCP("tcp", nil, net.TCPAddrFromAddrPort(target))
	if err != nil {
		c.Write(badGateway)
		return
	}
	defer up.Close()
	if _, err := c.Write(established); err != nil {
		return
	}
	if end < n { // bytes the client sent behind the head
		if _, err := up.Write(buf[end:n]); err != nil {
			return
		}
	}
	done := make(chan struct{})
	go func() {
		io.Copy(c, up)
		c.CloseWrite()
		close(done)
	}()
	io.Copy(up, c)
	up.CloseWrite()
	<-done
}
