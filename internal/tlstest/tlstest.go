// Package tlstest builds TLS ClientHello bytes for tests: the first flight of a real
// crypto/tls client, re-framed over several records or extended with extensions that Go's
// client does not send (such as encrypted_client_hello), with every length fixed.
package tlstest

import (
	"crypto/tls"
	"io"
	"net"
	"testing"
	"time"
)

const (
	recordHeaderLen    = 5
	handshakeHeaderLen = 4
	typeHandshake      = 22
)

// ExtECH is the encrypted_client_hello extension type.
const ExtECH = 0xfe0d

// CaptureHello returns the first TLS record a real crypto/tls client sends: its ClientHello.
func CaptureHello(t testing.TB, cfg *tls.Config) []byte {
	t.Helper()
	client, server := net.Pipe()
	defer server.Close()
	go func() {
		tls.Client(client, cfg).Handshake()
		client.Close()
	}()
	server.SetReadDeadline(time.Now().Add(5 * time.Second))
	hdr := make([]byte, recordHeaderLen)
	if _, err := io.ReadFull(server, hdr); err != nil {
		t.Fatalf("capturing ClientHello: %v", err)
	}
	body := make([]byte, int(hdr[3])<<8|int(hdr[4]))
	if _, err := io.ReadFull(server, body); err != nil {
		t.Fatalf("capturing ClientHello: %v", err)
	}
	return append(hdr, body...)
}

// Reframe splits the handshake message of a one-record hello into records of size n.
func Reframe(hello []byte, n int) []byte {
	msg := hello[recordHeaderLen:]
	var out []byte
	for len(msg) > 0 {
		k := min(n, len(msg))
		out = append(out, typeHandshake, 3, 1, byte(k>>8), byte(k))
		out = append(out, msg[:k]...)
		msg = msg[k:]
	}
	return out
}

// WithExtension appends an extension to a one-record ClientHello, fixing every length.
func WithExtension(hello []byte, typ uint16, body []byte) []byte {
	msg := append([]byte(nil), hello[recordHeaderLen:]...)
	// Locate the extensions length: walk the fixed fields (version, random, session id,
	// cipher suites, compression methods).
	p := handshakeHeaderLen + 2 + 32
	p += 1 + int(msg[p])
	p += 2 + (int(msg[p])<<8 | int(msg[p+1]))
	p += 1 + int(msg[p])
	extLen := int(msg[p])<<8 | int(msg[p+1])
	ext := append([]byte{byte(typ >> 8), byte(typ), byte(len(body) >> 8), byte(len(body))}, body...)
	extLen += len(ext)
	msg[p], msg[p+1] = byte(extLen>>8), byte(extLen)
	msg = append(msg, ext...)
	n := len(msg) - handshakeHeaderLen
	msg[1], msg[2], msg[3] = byte(n>>16), byte(n>>8), byte(n)
	return Reframe(append(make([]byte, recordHeaderLen), msg...), 1<<14)
}
