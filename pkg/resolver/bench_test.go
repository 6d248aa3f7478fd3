package resolver

import (
	"context"
	"fmt"
	"testing"
)

// BenchmarkLookupCached is a lookup the cache answers (A and AAAA).
func BenchmarkLookupCached(b *testing.B) {
	s := newTestServer(b, testRecords)
	r, _ := newTest(b, s, "", Config{})
	ctx := context.Background()
	if _, err := r.LookupNetIP(ctx, "ip", "dual.test."); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := r.LookupNetIP(ctx, "ip", "dual.test."); err != nil {
			b.Fatal(err)
		}
	}
	if n := s.queries(); n != 2 {
		b.Fatalf("%d queries, want the first 2 only", n)
	}
}

// BenchmarkLookupCold is a lookup that asks the in-process server (A and AAAA in parallel,
// over UDP on 127.0.0.1): every iteration looks up a name not seen before.
func BenchmarkLookupCold(b *testing.B) {
	recs := map[string]record{}
	for i := range 1 << 16 {
		recs[fmt.Sprintf("n%d.test.", i)] = record{addrs: []string{"198.18.1.10", "fd00:18:1::10"}, ttl: 60}
	}
	s := newTestServer(b, recs)
	r, _ := newTest(b, s, "", Config{MaxEntries: 1}) // no name stays cached
	ctx := context.Background()
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if _, err := r.LookupNetIP(ctx, "ip", fmt.Sprintf("n%d.test.", i%(1<<16))); err != nil {
			b.Fatal(err)
		}
		i++
	}
}
