package hostname

import (
	"errors"
	"strings"
	"testing"
	"unsafe"
)

var (
	l63  = strings.Repeat("a", 63)
	l64  = strings.Repeat("a", 64)
	n253 = strings.Repeat(l63+".", 3) + strings.Repeat("b", 61) // 3*64 + 61 = 253
	n254 = n253 + "b"
)

// normalizeCases apply to Normalize and, being ASCII, to NormalizePolicy alike.
var normalizeCases = []struct {
	in, want string
	err      error // nil: valid
}{
	// case and trailing dot
	{"api.example.com", "api.example.com", nil},
	{"API.Example.COM", "api.example.com", nil},
	{"api.example.com.", "api.example.com", nil},
	{"API.example.com.", "api.example.com", nil},
	{"api.example.com..", "", ErrEmptyLabel},
	{"localhost", "localhost", nil},
	{"a", "a", nil},
	{"A.", "a", nil},
	// empty names and labels
	{"", "", ErrEmpty},
	{".", "", ErrEmpty},
	{"..", "", ErrEmptyLabel},
	{".a", "", ErrEmptyLabel},
	{"a..b", "", ErrEmptyLabel},
	// characters
	{"_sip._tcp.example.com", "_sip._tcp.example.com", nil},
	{"my_service.ns.svc.cluster.local", "my_service.ns.svc.cluster.local", nil},
	{"-a-.example.com", "-a-.example.com", nil},
	{"xn--bcher-kva.example", "xn--bcher-kva.example", nil},
	{"a b.com", "", ErrInvalidChar},
	{"a*.com", "", ErrInvalidChar},
	{"*.example.com", "", ErrInvalidChar},
	{"a.com:443", "", ErrInvalidChar},
	{"a/b.com", "", ErrInvalidChar},
	{"a\x00.com", "", ErrInvalidChar},
	{"a\n.com", "", ErrInvalidChar},
	{"[a.com]", "", ErrInvalidChar},
	{"bücher.example", "", ErrNonASCII},
	{"b\xffcher.example", "", ErrNonASCII},
	// numeric last label and IP literals
	{"foo.123", "", ErrNumericLabel},
	{"123", "", ErrNumericLabel},
	{"1.2", "", ErrNumericLabel},
	{"10.0.0.300", "", ErrNumericLabel},
	{"foo.123.", "", ErrNumericLabel},
	{"123.foo", "123.foo", nil},
	{"1.2.3.com", "1.2.3.com", nil},
	{"foo.1a", "foo.1a", nil},
	{"foo.0x7f", "foo.0x7f", nil},
	{"198.18.1.10", "", ErrIPAddress},
	{"198.18.1.10.", "", ErrIPAddress},
	{"0.0.0.0", "", ErrIPAddress},
	{"::1", "", ErrIPAddress},
	{"2001:db8::1", "", ErrIPAddress},
	{"2001:DB8::1", "", ErrIPAddress},
	{"::ffff:10.0.0.1", "", ErrIPAddress},
	{"fe80::1%eth0", "", ErrIPAddress},
	{"[2001:db8::1]", "", ErrIPAddress},
	{"2001:db8::g", "", ErrInvalidChar},
	// lengths
	{l63 + ".com", l63 + ".com", nil},
	{strings.ToUpper(l63) + ".com", l63 + ".com", nil},
	{l64 + ".com", "", ErrLabelTooLong},
	{"com." + l64, "", ErrLabelTooLong},
	{n253, n253, nil},
	{n253 + ".", n253, nil},
	{strings.ToUpper(n253) + ".", n253, nil},
	{n254, "", ErrTooLong},
	{n254 + ".", "", ErrTooLong},
}

func TestNormalize(t *testing.T) {
	if len(n253) != 253 {
		t.Fatalf("n253 is %d bytes", len(n253))
	}
	for _, tc := range normalizeCases {
		for _, f := range []struct {
			name string
			fn   func(string) (string, error)
		}{{"Normalize", Normalize}, {"NormalizePolicy", NormalizePolicy}} {
			if f.name == "NormalizePolicy" && tc.err == ErrNonASCII {
				continue // converted by IDNA instead; see TestNormalizePolicyIDNA
			}
			got, err := f.fn(tc.in)
			if got != tc.want || !errors.Is(err, tc.err) || (err == nil) != (tc.err == nil) {
				t.Errorf("%s(%q) = %q, %v; want %q, %v", f.name, tc.in, got, err, tc.want, tc.err)
				continue
			}
			if err != nil {
				var e *Error
				if !errors.As(err, &e) || e.Error() == "" || strings.Contains(e.Error(), "%!") {
					t.Errorf("%s(%q): error %#v is not a well-formed *Error", f.name, tc.in, err)
				}
			}
		}
	}
}

func TestErrorMessages(t *testing.T) {
	for in, want := range map[string]string{
		"a b.com":      `invalid character ' ' in host name at byte 1`,
		"bücher.de":    `non-ASCII byte 0xc3 in host name at byte 1`,
		"foo.123":      `last label is numeric`,
		"10.0.0.1":     `IP address, not a host name`,
		"a..b":         `empty label in host name at byte 2`,
		l64 + ".com":   `label at byte 0 longer than 63 bytes`,
		n254:           `longer than 253 bytes`,
		"":             `empty host name`,
		"x." + l64:     `label at byte 2 longer than 63 bytes`,
		"a.b.c.d\x7f.": `invalid character '\x7f'`,
	} {
		_, err := Normalize(in)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Normalize(%q): %v, want %q in the message", in, err, want)
		}
	}
	var e *Error
	if _, err := Normalize("a b"); !errors.As(err, &e) || e.Err != ErrInvalidChar || e.Pos != 1 || e.Char != ' ' {
		t.Errorf("typed error: %#v", err)
	}
}

func TestNormalizePolicyIDNA(t *testing.T) {
	for _, tc := range []struct {
		in, want string
		err      error
	}{
		{"bücher.example", "xn--bcher-kva.example", nil},
		{"Bücher.Example", "xn--bcher-kva.example", nil},
		{"BÜCHER.example.", "xn--bcher-kva.example", nil},
		{"münchen.de", "xn--mnchen-3ya.de", nil},
		{"日本.example", "xn--wgv71a.example", nil},
		{"bücher。example", "xn--bcher-kva.example", nil}, // ideographic full stop
		{"ｅｘａｍｐｌｅ.bücher", "example.xn--bcher-kva", nil}, // full-width letters map to ASCII
		{"bücher.example..", "", ErrEmptyLabel},          // one trailing dot only
		{"bücher.123", "", ErrNumericLabel},
		{"bü cher.example", "", ErrIDNA},
		{"b\xffcher.example", "", ErrIDNA},                          // invalid UTF-8 (IDNA alone would map it to U+FFFD)
		{"-bücher.example", "", ErrIDNA},                            // IDNA's hyphen rule applies to converted names
		{strings.Repeat("ü", 60) + ".example", "", ErrLabelTooLong}, // checked after conversion
	} {
		got, err := NormalizePolicy(tc.in)
		if got != tc.want || !errors.Is(err, tc.err) || (err == nil) != (tc.err == nil) {
			t.Errorf("NormalizePolicy(%q) = %q, %v; want %q, %v", tc.in, got, err, tc.want, tc.err)
		}
		if _, err := Normalize(tc.in); !errors.Is(err, ErrNonASCII) {
			t.Errorf("Normalize(%q): %v, want ErrNonASCII", tc.in, err)
		}
	}
}

func TestNormalizeAllocs(t *testing.T) {
	for _, in := range []string{"api.example.com", "api.example.com.", n253, "_a._tcp.x"} {
		if n := testing.AllocsPerRun(100, func() { Normalize(in) }); n != 0 {
			t.Errorf("Normalize(%q): %v allocations, want 0", in, n)
		}
	}
	if n := testing.AllocsPerRun(100, func() { Normalize("API.example.com") }); n != 1 {
		t.Errorf("Normalize with upper case: %v allocations, want 1", n)
	}
	// A normal name comes back as the same string, not a copy.
	in := "api.example.com."
	if out, _ := Normalize(in); unsafe.StringData(out) != unsafe.StringData(in) || out != in[:len(in)-1] {
		t.Errorf("Normalize(%q) = %q, a copy", in, out)
	}
}

func BenchmarkNormalize(b *testing.B) {
	for _, in := range []string{"api.example.com", "API.Example.com.", "a.b.zone-7.team-4242.example.net"} {
		b.Run(in, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				Normalize(in)
			}
		})
	}
}
