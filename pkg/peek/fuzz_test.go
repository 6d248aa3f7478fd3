package peek

import (
	"crypto/tls"
	"errors"
	"strings"
	"testing"

	"github.com/egress-guard/egress-guard/pkg/hostname"
)

// FuzzParseClientHello: no panic; a success is stable under truncation (every shorter
// prefix is incomplete or an error, never a different name), and the name is the raw
// host_name's normal form, or "" when that is not a valid host name.
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
		if want, err := hostname.Normalize(h.RawServerName); err != nil && h.ServerName != "" || err == nil && h.ServerName != want {
			t.Fatalf("raw SNI %q gave name %q; Normalize: %q, %v", h.RawServerName, h.ServerName, want, err)
		}
		if h.ServerName != "" {
			if again, err := hostname.Normalize(h.ServerName); err != nil || again != h.ServerName {
				t.Fatalf("name %q is not normal: %q, %v", h.ServerName, again, err)
			}
		}
		for _, cut := range []int{len(data) / 2, len(data) - 1} {
			if cut < 0 {
				continue
			}
			if h2, err := ParseClientHello(data[:cut]); err == nil && (h2.ServerName != h.ServerName || h2.RawServerName != h.RawServerName) {
				t.Fatalf("prefix %d parsed to %q (%q), whole to %q (%q)", cut, h2.ServerName, h2.RawServerName, h.ServerName, h.RawServerName)
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
		if r.Name != "" {
			if again, err := hostname.Normalize(r.Name); err != nil || again != r.Name || !strings.Contains(strings.ToLower(r.Host), r.Name) {
				t.Fatalf("Host %q gave name %q: %q, %v", r.Host, r.Name, again, err)
			}
		}
		end, _ := headEnd(data)
		if _, err := ParseHTTPRequestHead(data[:end], 4096); !errors.Is(err, ErrNeedMore) {
			t.Fatalf("head without its blank line: %v", err)
		}
	})
}
