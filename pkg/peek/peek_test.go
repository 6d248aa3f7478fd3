package peek

import (
	"bytes"
	"crypto/tls"
	"errors"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/egress-guard/egress-guard/internal/tlstest"
)

var (
	captureHello  = tlstest.CaptureHello
	reframe       = tlstest.Reframe
	withExtension = tlstest.WithExtension
)

func TestParseRealClientHello(t *testing.T) {
	raw := captureHello(t, &tls.Config{ServerName: "API.Example.com", NextProtos: []string{"h2", "http/1.1"}})
	h, err := ParseClientHello(raw)
	if err != nil {
		t.Fatal(err)
	}
	if h.ServerName != "api.example.com" || len(h.ALPN) != 2 || h.ALPN[0] != "h2" || h.ECH {
		t.Fatalf("parsed %+v", h)
	}
	if len(raw) < 1000 {
		t.Logf("note: ClientHello is %d bytes (expected a post-quantum key share)", len(raw))
	}
	// Every strict prefix is incomplete, never a different answer.
	for i := 0; i < len(raw); i++ {
		if _, err := ParseClientHello(raw[:i]); !errors.Is(err, ErrNeedMore) {
			t.Fatalf("prefix of %d/%d bytes: %v, want ErrNeedMore", i, len(raw), err)
		}
	}
}

func TestNoSNIAndIPServerName(t *testing.T) {
	for _, name := range []string{"", "198.18.1.10"} {
		raw := captureHello(t, &tls.Config{ServerName: name, InsecureSkipVerify: true})
		h, err := ParseClientHello(raw)
		if err != nil || h.ServerName != "" {
			t.Fatalf("ServerName %q: got %+v %v; Go sends no SNI for IPs", name, h, err)
		}
	}
}

func TestMultiRecordAndLargeHello(t *testing.T) {
	raw := captureHello(t, &tls.Config{ServerName: "big.example.com"})
	// A padding extension pushes the message past one 16 KiB record.
	big := withExtension(raw, 21, make([]byte, 20000))
	if len(big) < 1<<14+recordHeaderLen {
		t.Fatalf("test hello only %d bytes", len(big))
	}
	for _, frag := range []int{100, 1 << 14} {
		data := reframe(joinRecords(big), frag)
		h, err := ParseClientHello(data)
		if err != nil || h.ServerName != "big.example.com" {
			t.Fatalf("records of %d: %+v %v", frag, h, err)
		}
	}
	// Deliver it one byte at a time through a real connection.
	data := reframe(joinRecords(big), 100)
	a, b := net.Pipe()
	defer a.Close()
	go func() {
		for i := range data {
			if _, err := b.Write(data[i : i+1]); err != nil {
				return
			}
		}
	}()
	h, consumed, err := ReadClientHello(a, MaxClientHello+4096, 5*time.Second)
	if err != nil || h.ServerName != "big.example.com" || !bytes.Equal(consumed, data) {
		t.Fatalf("byte-at-a-time: %+v %v, consumed %d/%d", h, err, len(consumed), len(data))
	}
}

// joinRecords returns a one-record framing of a possibly multi-record hello (the record
// length may exceed 16 KiB; reframe splits it again).
func joinRecords(data []byte) []byte {
	var msg []byte
	for len(data) >= recordHeaderLen {
		n := int(data[3])<<8 | int(data[4])
		msg = append(msg, data[recordHeaderLen:recordHeaderLen+n]...)
		data = data[recordHeaderLen+n:]
	}
	return append([]byte{typeHandshake, 3, 1, 0, 0}, msg...)
}

func TestECHMarked(t *testing.T) {
	raw := captureHello(t, &tls.Config{ServerName: "public.example.com"})
	h, err := ParseClientHello(withExtension(raw, extECH, []byte{0, 1, 2, 3}))
	if err != nil || !h.ECH || h.ServerName != "public.example.com" {
		t.Fatalf("ECH: %+v %v", h, err)
	}
}

func TestRejects(t *testing.T) {
	raw := captureHello(t, &tls.Config{ServerName: "ok.example.com"})
	cases := map[string]struct {
		data []byte
		want error
	}{
		"http":         {[]byte("GET / HTTP/1.1\r\n"), ErrNotTLS},
		"ssh":          {[]byte("SSH-2.0-OpenSSH_9.2\r\n"), ErrNotTLS},
		"alert record": {[]byte{21, 3, 3, 0, 2, 2, 40}, ErrNotTLS},
		"too large":    {[]byte{22, 3, 1, 0, 4, 1, 0x10, 0, 0}, ErrTooLarge},
	}
	for name, tc := range cases {
		if _, err := ParseClientHello(tc.data); !errors.Is(err, tc.want) {
			t.Errorf("%s: %v, want %v", name, err, tc.want)
		}
	}
	// Length fields that lie are errors, not panics.
	bad := append([]byte(nil), raw...)
	bad[recordHeaderLen+handshakeHeaderLen+2+32] = 200 // session id length past its limit
	if _, err := ParseClientHello(bad); err == nil || errors.Is(err, ErrNeedMore) {
		t.Errorf("lying session id length: %v", err)
	}
	// An empty host_name is malformed framing.
	if _, err := parseSNI(reader([]byte{0, 3, 0, 0, 0})); err == nil {
		t.Error("empty host_name accepted")
	}
	if _, err := ParseClientHello(withExtension(raw, extServerName, []byte{0, 3, 0, 0, 0})); err == nil {
		t.Error("duplicate server_name extension accepted")
	}
}

// A host_name that is not a valid host name is kept raw but never becomes ServerName.
func TestInvalidSNINotAName(t *testing.T) {
	raw := captureHello(t, &tls.Config{InsecureSkipVerify: true}) // no server_name extension
	for sni, want := range map[string]string{
		"a..b":                                   "",
		"a b":                                    "",
		"\x00evil":                               "",
		strings.Repeat("a", 64) + ".com":         "",
		"198.18.1.10":                            "",
		"foo.123":                                "",
		"2001:db8::1":                            "",
		"b\xc3\xbccher.example":                  "",
		"OK.Example.com.":                        "ok.example.com",
		"_svc._tcp.example.com":                  "_svc._tcp.example.com",
		strings.Repeat("a", 63) + ".example.com": strings.Repeat("a", 63) + ".example.com",
	} {
		body := []byte{byte((len(sni) + 3) >> 8), byte(len(sni) + 3), 0, byte(len(sni) >> 8), byte(len(sni))}
		h, err := ParseClientHello(withExtension(raw, extServerName, append(body, sni...)))
		if err != nil || h.ServerName != want || h.RawServerName != sni {
			t.Errorf("SNI %q: %+v %v, want name %q", sni, h, err, want)
		}
	}
}

func TestReadClientHelloTimeoutAndBound(t *testing.T) {
	raw := captureHello(t, &tls.Config{ServerName: "slow.example.com"})
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	go b.Write(raw[:10])
	_, consumed, err := ReadClientHello(a, MaxClientHello, 200*time.Millisecond)
	if !errors.Is(err, os.ErrDeadlineExceeded) || len(consumed) != 10 {
		t.Fatalf("timeout: %v, consumed %d", err, len(consumed))
	}
	c, d := net.Pipe()
	defer c.Close()
	go d.Write(raw)
	if _, _, err := ReadClientHello(c, 100, time.Second); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("bound: %v", err)
	}
}

func TestParseHTTPRequestHead(t *testing.T) {
	good := map[string]HTTPRequest{
		"GET /x HTTP/1.1\r\nHost: api.example.com\r\nAccept: */*\r\n\r\n":      {Method: "GET", Target: "/x", Host: "api.example.com", Proto: "HTTP/1.1", Name: "api.example.com"},
		"POST /x HTTP/1.1\nHost: a.example.com:8080\n\nbody":                   {Method: "POST", Target: "/x", Host: "a.example.com:8080", Proto: "HTTP/1.1", Name: "a.example.com"},
		"GET http://a.example.com/p HTTP/1.1\r\nHost: a.example.com\r\n\r\n":   {Method: "GET", Target: "http://a.example.com/p", Host: "a.example.com", Proto: "HTTP/1.1", Name: "a.example.com"},
		"GET http://b.example.com/p HTTP/1.1\r\n\r\n":                          {Method: "GET", Target: "http://b.example.com/p", Host: "b.example.com", Proto: "HTTP/1.1", Name: "b.example.com"},
		"GET / HTTP/1.0\r\n\r\n":                                               {Method: "GET", Target: "/", Host: "", Proto: "HTTP/1.0"},
		"GET / HTTP/1.1\r\nHost: a.example.com\r\nhost: A.example.com\r\n\r\n": {Method: "GET", Target: "/", Host: "a.example.com", Proto: "HTTP/1.1", Name: "a.example.com"},
		"GET / HTTP/1.1\r\nHost: API.Example.COM.:443\r\n\r\n":                 {Method: "GET", Target: "/", Host: "API.Example.COM.:443", Proto: "HTTP/1.1", Name: "api.example.com"},
		"GET / HTTP/1.1\r\nHost: 198.18.0.1:80\r\n\r\n":                        {Method: "GET", Target: "/", Host: "198.18.0.1:80", Proto: "HTTP/1.1"},
		"GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n":                     {Method: "GET", Target: "/", Host: "[2001:db8::1]:80", Proto: "HTTP/1.1"},
		"GET / HTTP/1.1\r\nHost: foo.123\r\n\r\n":                              {Method: "GET", Target: "/", Host: "foo.123", Proto: "HTTP/1.1"},
		"GET / HTTP/1.1\r\nHost: a..b\r\n\r\n":                                 {Method: "GET", Target: "/", Host: "a..b", Proto: "HTTP/1.1"},
		"GET / HTTP/1.1\r\nHost: a.example.com:x\r\n\r\n":                      {Method: "GET", Target: "/", Host: "a.example.com:x", Proto: "HTTP/1.1"},
		"GET / HTTP/1.1\r\nHost: b\xc3\xbccher.example\r\n\r\n":                {Method: "GET", Target: "/", Host: "b\xc3\xbccher.example", Proto: "HTTP/1.1"},
	}
	for in, want := range good {
		got, err := ParseHTTPRequestHead([]byte(in), 8192)
		if err != nil || *got != want {
			t.Errorf("%q: %+v %v, want %+v", in, got, err, want)
		}
	}
	bad := map[string]error{
		"GET / HTTP/1.1\r\nHost: a.example.com\r\n": ErrNeedMore,
		"GE":                     ErrNeedMore,
		"get / HTTP/1.1\r\n\r\n": ErrNotHTTP,
		"\x16\x03\x01":           ErrNotHTTP,
		"GET / HTTP/1.1\r\nX: " + strings.Repeat("a", 9000):                 ErrTooLarge,
		"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n":                      nil,
		"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n":                      nil,
		"GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n":                            nil,
		"GET / HTTP/1.1\r\n\r\n":                                            nil,
		"GET http://a.example.com/ HTTP/1.1\r\nHost: b.example.com\r\n\r\n": nil,
		"GET / HTTP/2.0\r\nHost: a\r\n\r\n":                                 nil,
	}
	for in, want := range bad {
		_, err := ParseHTTPRequestHead([]byte(in), 8192)
		if err == nil || (want != nil && !errors.Is(err, want)) || (want == nil && (errors.Is(err, ErrNeedMore) || errors.Is(err, ErrNotHTTP))) {
			t.Errorf("%q: %v, want %v (or a definite error)", in, err, want)
		}
	}
}

func TestSniff(t *testing.T) {
	for in, want := range map[string]Protocol{"\x16\x03\x01": ProtoTLS, "GET ": ProtoHTTP, "CONNECT x": ProtoHTTP, "SSH-2.0": ProtoUnknown, "": ProtoUnknown, "GET": ProtoUnknown} {
		if got := Sniff([]byte(in)); got != want {
			t.Errorf("Sniff(%q) = %v, want %v", in, got, want)
		}
	}
}

func BenchmarkParseClientHello(b *testing.B) {
	raw := captureHello(b, &tls.Config{ServerName: "api.example.com"})
	b.SetBytes(int64(len(raw)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := ParseClientHello(raw); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkParseHTTPRequestHead(b *testing.B) {
	raw := []byte("GET /index.html HTTP/1.1\r\nHost: api.example.com\r\nUser-Agent: curl/8.0\r\nAccept: */*\r\n\r\n")
	b.ReportAllocs()
	for b.Loop() {
		if _, err := ParseHTTPRequestHead(raw, 8192); err != nil {
			b.Fatal(err)
		}
	}
}
