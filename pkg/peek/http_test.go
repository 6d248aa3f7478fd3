package peek

import (
	"strings"
	"testing"
)

// Undecided: the prefixes Sniff cannot classify yet, which may still become TLS or HTTP.
func TestUndecided(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want bool
	}{
		{"", true},
		{"\x16", true},      // a handshake record's first byte
		{"\x16\x03", false}, // TLS (Sniff knows)
		{"\x17", false},     // another record type
		{"G", true},
		{"GE", true},
		{"GET", true},
		{"GET ", false},                  // HTTP (Sniff knows)
		{"get", false},                   // methods are upper case
		{"SSH-2.0-x", false},             // another protocol
		{"\x00\x00\x00", false},          // a binary protocol
		{strings.Repeat("A", 21), false}, // longer than any method
	} {
		if got := Undecided([]byte(tc.in)); got != tc.want {
			t.Errorf("Undecided(%q) = %v, want %v", tc.in, got, tc.want)
		}
	}
}
