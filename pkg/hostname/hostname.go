// Package hostname is egress-guard's one definition of a valid, normalised host name.
//
// A normalised name is ASCII, lower-case, without a trailing dot, made of labels of 1-63
// bytes of [a-z0-9-_] (underscores appear in service names such as _sip._tcp), at most 253
// bytes in all, and its last label is not all digits: "foo.123" or "10.0.0.300" is an
// IPv4-like literal, not a name (RFC 3696 §2), and an IP address is never a name.
//
// Normalize is for names that arrive on the wire (TLS SNI, the Host header, a CONNECT
// authority), which are already punycode; NormalizePolicy is for names written by people in a
// policy file, which may be internationalised.
package hostname

import (
	"fmt"
	"net/netip"
	"strings"
	"unicode/utf8"

	"golang.org/x/net/idna"
)

// Limits.
const (
	MaxLength      = 253 // bytes in a name, without the trailing dot
	MaxLabelLength = 63  // bytes in one label
)

// Sentinel errors: every error from this package wraps exactly one of them (test with
// errors.Is).
var (
	ErrEmpty        = sentinel("empty host name")
	ErrTooLong      = sentinel("host name longer than 253 bytes")
	ErrEmptyLabel   = sentinel("empty label in host name")
	ErrLabelTooLong = sentinel("label longer than 63 bytes in host name")
	ErrInvalidChar  = sentinel("invalid character in host name (want letters, digits, '-', '_' and '.')")
	ErrNonASCII     = sentinel("non-ASCII byte in host name (names on the wire are punycode)")
	ErrNumericLabel = sentinel("last label is numeric: an IPv4-like literal, not a host name")
	ErrIPAddress    = sentinel("IP address, not a host name")
	ErrIDNA         = sentinel("invalid internationalised name")
)

type sentinelError string

func sentinel(s string) error         { return sentinelError(s) }
func (e sentinelError) Error() string { return string(e) }

// Error is the error Normalize and NormalizePolicy return. It names the rule that failed (Err,
// one of the sentinels above) and where. It never repeats the input, which callers usually
// print already.
type Error struct {
	Err    error  // one of the Err* sentinels
	Pos    int    // byte offset of the offending byte or label (for a name NormalizePolicy converted: in its punycode form); -1 if none
	Char   byte   // the offending byte, for ErrInvalidChar and ErrNonASCII
	Detail string // the IDNA library's reason, for ErrIDNA
}

func (e *Error) Error() string {
	switch {
	case e.Err == ErrInvalidChar:
		return fmt.Sprintf("invalid character %q in host name at byte %d (want letters, digits, '-', '_' and '.')", e.Char, e.Pos)
	case e.Err == ErrNonASCII:
		return fmt.Sprintf("non-ASCII byte 0x%02x in host name at byte %d (names on the wire are punycode)", e.Char, e.Pos)
	case e.Err == ErrLabelTooLong && e.Pos >= 0:
		return fmt.Sprintf("label at byte %d longer than 63 bytes in host name", e.Pos)
	case e.Err == ErrEmptyLabel && e.Pos >= 0:
		return fmt.Sprintf("empty label in host name at byte %d", e.Pos)
	case e.Detail != "":
		return e.Err.Error() + ": " + e.Detail
	}
	return e.Err.Error()
}

// Unwrap returns the sentinel.
func (e *Error) Unwrap() error { return e.Err }

func fail(err error, pos int) error { return &Error{Err: err, Pos: pos} }

// Character classes for the validating scan, as bits so that a label's classes can be or-ed
// together: a byte is valid in a label when it has cValid; the label is numeric when no byte
// has cNonDigit.
const (
	cValid    = 1 << iota // a-z, A-Z, 0-9, '-', '_'
	cNonDigit             // not 0-9
	cUpper                // A-Z
	cDot                  // '.'
)

var class = func() (t [256]uint8) {
	for c := 'a'; c <= 'z'; c++ {
		t[c] = cValid | cNonDigit
	}
	for c := 'A'; c <= 'Z'; c++ {
		t[c] = cValid | cNonDigit | cUpper
	}
	for c := '0'; c <= '9'; c++ {
		t[c] = cValid
	}
	t['-'], t['_'], t['.'] = cValid|cNonDigit, cValid|cNonDigit, cDot
	return t
}()

// Normalize validates a host name as it arrives on the wire (an SNI, a Host header or CONNECT
// authority without its port and brackets) and returns its normal form: lower-case, without
// one trailing dot. Non-ASCII is rejected: wire names are already punycode. It allocates only
// when the name has upper-case letters; a name that is already normal is returned as is.
func Normalize(s string) (string, error) {
	return normalize(s, true)
}

// NormalizePolicy validates a host name written in a policy file and returns its normal
// form. It is Normalize, except that a name with non-ASCII characters is first converted to
// its ASCII (punycode) form with IDNA's lookup profile (idna.Lookup, UTS #46 mapping), so that
// "Bücher.example" becomes "xn--bcher-kva.example". One trailing dot is removed before the
// conversion, as for ASCII names. Invalid UTF-8 is rejected (a YAML file cannot hold it).
func NormalizePolicy(s string) (string, error) {
	if isASCII(s) {
		return normalize(s, true)
	}
	if !utf8.ValidString(s) {
		return "", &Error{Err: ErrIDNA, Pos: -1, Detail: "invalid UTF-8"}
	}
	a, err := idna.Lookup.ToASCII(strings.TrimSuffix(s, "."))
	if err != nil {
		return "", &Error{Err: ErrIDNA, Pos: -1, Detail: err.Error()}
	}
	return normalize(a, false)
}

func normalize(s string, stripDot bool) (string, error) {
	in := s
	n := len(s)
	if stripDot && n > 0 && s[n-1] == '.' {
		n--
		s = s[:n]
	}
	if n == 0 {
		return "", fail(ErrEmpty, -1)
	}
	if n > MaxLength {
		return "", fail(ErrTooLong, -1)
	}
	var all, label uint8 // classes seen in the name, in the current label
	start := 0           // offset of the current label
	for i := 0; i < n; i++ {
		t := class[s[i]]
		if t&cValid != 0 {
			label |= t
			continue
		}
		if t != cDot {
			return "", badChar(in, s, i)
		}
		if i == start {
			return "", fail(ErrEmptyLabel, i)
		}
		if i-start > MaxLabelLength {
			return "", fail(ErrLabelTooLong, start)
		}
		all |= label
		start, label = i+1, 0
	}
	if start == n {
		return "", fail(ErrEmptyLabel, n)
	}
	if n-start > MaxLabelLength {
		return "", fail(ErrLabelTooLong, start)
	}
	if label&cNonDigit == 0 {
		if _, err := netip.ParseAddr(s); err == nil {
			return "", fail(ErrIPAddress, -1)
		}
		return "", fail(ErrNumericLabel, start)
	}
	if (all|label)&cUpper != 0 {
		s = toLower(s)
	}
	return s, nil
}

// badChar explains the byte at s[i]: an IP literal (IPv6, possibly bracketed or zoned) is
// reported as such rather than as a stray colon.
func badChar(in, s string, i int) error {
	addr := strings.TrimSuffix(strings.TrimPrefix(s, "["), "]")
	if _, err := netip.ParseAddr(addr); err == nil {
		return fail(ErrIPAddress, -1)
	}
	if _, err := netip.ParseAddr(in); err == nil {
		return fail(ErrIPAddress, -1)
	}
	c := s[i]
	if c >= 0x80 {
		return &Error{Err: ErrNonASCII, Pos: i, Char: c}
	}
	return &Error{Err: ErrInvalidChar, Pos: i, Char: c}
}

// toLower lower-cases an ASCII string (validated already).
func toLower(s string) string {
	b := []byte(s)
	for i, c := range b {
		if c >= 'A' && c <= 'Z' {
			b[i] = c + 'a' - 'A'
		}
	}
	return string(b)
}

func isASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			return false
		}
	}
	return true
}
