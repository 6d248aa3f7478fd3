package resolver

import (
	"testing"

	"golang.org/x/net/dns/dnsmessage"
)

// FuzzParseResponse feeds untrusted bytes to the response parser: it must never panic, and
// whatever it accepts must answer the question asked (addresses of the asked family only).
func FuzzParseResponse(f *testing.F) {
	s := &testServer{records: testRecords, counts: map[string]int{}}
	for _, name := range []string{"dual.test.", "alias.test.", "missing.test."} {
		for _, typ := range []dnsmessage.Type{dnsmessage.TypeA, dnsmessage.TypeAAAA} {
			q := dnsmessage.Question{Name: dnsmessage.MustNewName(name), Type: typ, Class: dnsmessage.ClassINET}
			msg, err := buildQuery(0x1234, q)
			if err != nil {
				f.Fatal(err)
			}
			f.Add(s.answer(msg[2:], false), typ == dnsmessage.TypeA)
		}
	}
	f.Add([]byte{}, true)
	f.Add([]byte{0x12, 0x34, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0}, true)
	f.Fuzz(func(t *testing.T, msg []byte, v4 bool) {
		typ := dnsmessage.TypeAAAA
		if v4 {
			typ = dnsmessage.TypeA
		}
		for _, name := range []string{"dual.test.", "alias.test."} {
			q := dnsmessage.Question{Name: dnsmessage.MustNewName(name), Type: typ, Class: dnsmessage.ClassINET}
			a, err := parseResponse(msg, 0x1234, q)
			if err != nil {
				continue
			}
			for _, addr := range a.addrs {
				if addr.Is4() != v4 {
					t.Fatalf("%s answer for a %v question", addr, typ)
				}
			}
			if a.ttl < 0 {
				t.Fatalf("negative TTL %v", a.ttl)
			}
		}
	})
}
