package main

import (
	"bytes"
	"fmt"
	"net/netip"
)

// maxHead bounds a request head; a floor must not grow without limit either.
const maxHead = 8 << 10

var (
	endOfHead   = []byte("\r\n\r\n")
	established = []byte("HTTP/1.1 200 Connection established\r\n\r\n")
	badRequest  = []byte("HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
	badGateway  = []byte("HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\n\r\n")
)

// headEnd returns the length of the head in buf (through the blank line), or 0 while it is
// incomplete.
func headEnd(buf []byte) int {
	if i := bytes.Index(buf, endOfHead); i >= 0 {
		return i + len(endOfHead)
	}
	return 0
}

// parseConnect reads the target of "CONNECT ip:port HTTP/1.x". The floors dial IP literals
// only: resolving names is not what they measure.
func parseConnect(head []byte) (netip.AddrPort, error) {
	line, _, _ := bytes.Cut(head, []byte("\r\n"))
	method, rest, ok1 := bytes.Cut(line, []byte(" "))
	target, proto, ok2 := bytes.Cut(rest, []byte(" "))
	if !ok1 || !ok2 || string(method) != "CONNECT" || !bytes.HasPrefix(proto, []byte("HTTP/1.")) {
		return netip.AddrPort{}, fmt.Errorf("not a CONNECT request line: %.80q", line)
	}
	ap, err := netip.ParseAddrPort(string(target))
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("CONNECT target: %w", err)
	}
	return ap, nil
}
