package peek

import (
	"crypto/tls"
	"errors"
	"testing"
)

// FuzzParseClientHello: no panic; a success is stable under truncation (every shorter
// prefix is incomplete or an error, never a different name), and the name obeys the rules.
func FuzzParseClientHello(f *testing.F) {
	f.Add(captureHello(f, &tls.Config{ServerName: "api.example.com", NextProtos: []string{"h2"}}))
	f.Add(captureHello(f, &tls.Config{InsecureSkipVerify: true}))
	f.Add(reframe(captureHello(f, &tls.Config{ServerName: "split.example.com"}), 64))
	f.Add([]byte{22, 3, 1, 0, 4, 1, 0, 0, 0})
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		h, err := ParseClientHello(data)
		if err != nil {
			return
		}
		if h.ServerName != "" {
			if _, err := validSNI([]byte(h.ServerName)); err != nil {
				t.Fatalf("accepted invalid SNI %q: %v", h.ServerName, err)
			}
		}
		for _, cut := range []int{len(data) / 2, len(data) - 1} {
			if cut < 0 {
				continue
			}
			if h2, err := ParseClientHello(data[:cut]); err == nil && h2.ServerName != h.ServerName {
				t.Fatalf("prefix %d parsed to %q, whole to %q", cut, h2.ServerName, h.ServerName)
			}
		}
	})
}

// FuzzParseHTTPRequestHead: no panic; a success reports a sane method and protocol, and an
// incomplete head never succeeds.
func FuzzParseHTTPRequestHead(f *testing.F) {
	f.Add([]byte("GET /x HTTP/1.1\r\nHost: api.example.com\r\n\r\n"))
	f.Add([]byte("GET http://a.example.com/ HTTP/1.1\r\nHost: a.example.com\r\n\r\n"))
	f.Add([]byte("POST / HTTP/1.0\n\n"))
	f.Add([]byte("GET / HTTP/1.1\r\nHost: a\r\n b\r\n\r\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := ParseHTTPRequestHead(data, 4096)
		if err != nil {
			return
		}
		if r.Proto != "HTTP/1.0" && r.Proto != "HTTP/1.1" || r.Method == "" || r.Target == "" {
			t.Fatalf("accepted %+v", r)
		}
		end, _ := headEnd(data)
		if _, err := ParseHTTPRequestHead(data[:end], 4096); !errors.Is(err, ErrNeedMore) {
			t.Fatalf("head without its blank line: %v", err)
		}
	})
}
