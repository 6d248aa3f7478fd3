package hostname

import (
	"errors"
	"strings"
	"testing"
)

// FuzzNormalize: no panic; an accepted name is normal (Normalize of it is itself), lower-case,
// ASCII and at most 253 bytes, and equals what it was given up to case and one trailing dot;
// a rejected one fails with exactly one of the sentinels. For ASCII input NormalizePolicy
// agrees with Normalize.
func FuzzNormalize(f *testing.F) {
	for _, tc := range normalizeCases {
		f.Add(tc.in)
	}
	f.Fuzz(func(t *testing.T, s string) {
		out, err := Normalize(s)
		if pout, perr := NormalizePolicy(s); isASCII(s) && (pout != out || (perr == nil) != (err == nil)) {
			t.Fatalf("%q: Normalize %q, %v; NormalizePolicy %q, %v", s, out, err, pout, perr)
		}
		if err != nil {
			if out != "" {
				t.Fatalf("%q: error %v with output %q", s, err, out)
			}
			n := 0
			for _, e := range []error{ErrEmpty, ErrTooLong, ErrEmptyLabel, ErrLabelTooLong, ErrInvalidChar, ErrNonASCII, ErrNumericLabel, ErrIPAddress} {
				if errors.Is(err, e) {
					n++
				}
			}
			if n != 1 {
				t.Fatalf("%q: error %v matches %d sentinels", s, err, n)
			}
			return
		}
		if again, err := Normalize(out); err != nil || again != out {
			t.Fatalf("%q -> %q -> %q, %v: not idempotent", s, out, again, err)
		}
		if out != strings.ToLower(out) || len(out) > MaxLength || len(out) == 0 || !isASCII(out) {
			t.Fatalf("%q -> %q: not a normal name", s, out)
		}
		if !strings.EqualFold(out, strings.TrimSuffix(s, ".")) {
			t.Fatalf("%q -> %q: changed more than case and one trailing dot", s, out)
		}
	})
}
