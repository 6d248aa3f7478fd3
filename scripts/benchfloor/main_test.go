package main

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// startFloor serves one engine on a loopback port and returns its address.
func startFloor(t *testing.T, engine string) string {
	t.Helper()
	switch engine {
	case "goroutine":
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		go serveGoroutines(ln)
		return ln.Addr().String()
	default:
		p, err := listenEpoll("127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		go p.serve() // runs until the test binary exits: it has no stop, like the bench's
		addr, err := p.addr()
		if err != nil {
			t.Fatal(err)
		}
		return addr
	}
}

// echoServer echoes every connection until EOF, then half-closes.
func echoServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.Copy(c, c)
				c.(*net.TCPConn).CloseWrite()
			}()
		}
	}()
	return ln.Addr().String()
}

// connect sends head and returns the connection and the status line of the answer.
func connect(t *testing.T, proxy, head string) (*net.TCPConn, *bufio.Reader, string) {
	t.Helper()
	c, err := net.Dial("tcp", proxy)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := io.WriteString(c, head); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	status, err := br.ReadString('\n')
	if err != nil {
		t.Fatalf("reading the status line: %v", err)
	}
	for {
		l, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("reading the answer's head: %v", err)
		}
		if l == "\r\n" {
			break
		}
	}
	return c.(*net.TCPConn), br, strings.TrimSpace(status)
}

func TestFloors(t *testing.T) {
	echo := echoServer(t)
	for _, engine := range []string{"goroutine", "epoll"} {
		t.Run(engine, func(t *testing.T) {
			proxy := startFloor(t, engine)

			t.Run("bytes behind the head and half-close", func(t *testing.T) {
				c, br, status := connect(t, proxy, "CONNECT "+echo+" HTTP/1.1\r\nHost: x\r\n\r\nearly")
				if status != "HTTP/1.1 200 Connection established" {
					t.Fatalf("status %q", status)
				}
				if _, err := io.WriteString(c, "+late"); err != nil {
					t.Fatal(err)
				}
				c.CloseWrite()
				got, err := io.ReadAll(br)
				if err != nil || string(got) != "early+late" {
					t.Fatalf("echo %q, %v; want %q and EOF", got, err, "early+late")
				}
			})

			t.Run("32 MiB both ways at once", func(t *testing.T) {
				c, br, status := connect(t, proxy, "CONNECT "+echo+" HTTP/1.1\r\n\r\n")
				if status != "HTTP/1.1 200 Connection established" {
					t.Fatalf("status %q", status)
				}
				data := make([]byte, 32<<20)
				rand.Read(data)
				go func() {
					c.Write(data)
					c.CloseWrite()
				}()
				got, err := io.ReadAll(br)
				if err != nil || !bytes.Equal(got, data) {
					t.Fatalf("echoed %d bytes (equal %v), %v; want the %d sent and EOF", len(got), bytes.Equal(got, data), err, len(data))
				}
			})

			for _, tc := range []struct{ name, head, status string }{
				{"not CONNECT", "GET http://x/ HTTP/1.1\r\n\r\n", "HTTP/1.1 400 Bad Request"},
				{"a name, not an IP", "CONNECT example.com:443 HTTP/1.1\r\n\r\n", "HTTP/1.1 400 Bad Request"},
				{"nothing listening", "CONNECT 127.0.0.1:1 HTTP/1.1\r\n\r\n", "HTTP/1.1 502 Bad Gateway"},
				{"head over 8 KiB", "CONNECT " + echo + " HTTP/1.1\r\nX: " + strings.Repeat("a", maxHead) + "\r\n\r\n", "HTTP/1.1 400 Bad Request"},
			} {
				t.Run(tc.name, func(t *testing.T) {
					if _, _, status := connect(t, proxy, tc.head); status != tc.status {
						t.Fatalf("status %q, want %q", status, tc.status)
					}
				})
			}
		})
	}
}
