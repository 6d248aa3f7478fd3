package addrclass

import (
	"net/netip"
	"testing"
)

func TestClassify(t *testing.T) {
	c := New([]netip.Prefix{netip.MustParsePrefix("203.0.113.0/24")}, []netip.Addr{netip.MustParseAddr("198.18.0.1"), netip.MustParseAddr("127.0.0.1")})
	for _, tc := range []struct {
		addr string
		want Class
	}{
		{"8.8.8.8", Public},
		{"198.18.1.10", Public}, // benchmarking range: the project's test hosts
		{"192.0.2.1", Public},   // documentation
		{"127.0.0.1", Loopback}, // loopback beats self
		{"127.255.255.255", Loopback},
		{"169.254.169.254", LinkLocal},
		{"0.0.0.0", Unspecified},
		{"0.1.2.3", Unspecified},
		{"224.0.0.1", Multicast},
		{"255.255.255.255", Multicast},
		{"240.0.0.1", Reserved},
		{"192.0.0.8", Reserved},
		{"10.0.0.1", Private},
		{"172.15.255.255", Public},
		{"172.16.0.0", Private},
		{"172.31.255.255", Private},
		{"172.32.0.0", Public},
		{"192.168.1.100", Private},
		{"100.63.255.255", Public},
		{"100.64.0.0", CGNAT},
		{"100.127.255.255", CGNAT},
		{"100.128.0.0", Public},
		{"203.0.113.9", Configured},
		{"198.18.0.1", Self},
		{"::", Unspecified},
		{"::1", Loopback},
		{"fe80::1", LinkLocal},
		{"fe80::1%eth0", LinkLocal},
		{"fd00:18::1", ULA},
		{"fc00::1", ULA},
		{"ff02::1", Multicast},
		{"2001:4860:4860::8888", Public},
		// Embeddings of 169.254.169.254, 10.0.0.1 and a public address.
		{"::ffff:169.254.169.254", LinkLocal},
		{"::ffff:10.0.0.1", Private},
		{"::ffff:8.8.8.8", Public},
		{"::169.254.169.254", LinkLocal},
		{"::ffff:0:a00:1", Private}, // IPv4-translated 10.0.0.1
		{"64:ff9b::a9fe:a9fe", LinkLocal},
		{"64:ff9b::808:808", Public},
		{"64:ff9b:1::a00:1", Private},
		{"2002:a9fe:a9fe::1", LinkLocal},
		{"2002:0a00:0001::", Private},
		{"2002:0808:0808::1", Public},
		// Teredo: server 65.54.227.120 (public), client = ^last32.
		{"2001:0:4136:e378:8000:63bf:f5ff:fffe", Private},   // client ^f5fffffe = 10.0.0.1
		{"2001:0:4136:e378:8000:63bf:3fff:fdd2", Public},    // client 192.0.2.45
		{"2001:0:a9fe:a9fe:8000:63bf:3fff:fdd2", LinkLocal}, // server 169.254.169.254
	} {
		got, p := c.Classify(netip.MustParseAddr(tc.addr))
		if got != tc.want {
			t.Errorf("Classify(%s) = %v (%v), want %v", tc.addr, got, p, tc.want)
		}
		if got.Internal() != p.IsValid() {
			t.Errorf("Classify(%s): internal=%v but prefix %v", tc.addr, got.Internal(), p)
		}
	}
}

func TestNamedBy(t *testing.T) {
	c := New([]netip.Prefix{netip.MustParsePrefix("203.0.113.0/24")}, []netip.Addr{netip.MustParseAddr("198.18.0.1")})
	for _, tc := range []struct {
		rule, addr string
		want       bool
	}{
		{"10.0.0.0/24", "10.0.0.5", true},
		{"10.0.0.0/8", "10.0.0.5", true},
		{"10.0.0.5/32", "10.0.0.5", true},
		{"0.0.0.0/0", "10.0.0.5", false},
		{"8.0.0.0/5", "10.0.0.5", false},
		{"10.0.1.0/24", "10.0.0.5", false},
		{"169.254.169.254/32", "169.254.169.254", true},
		{"169.254.0.0/16", "169.254.169.254", true},
		{"128.0.0.0/1", "169.254.169.254", false},
		{"127.0.0.0/8", "127.0.0.1", true},
		{"203.0.113.0/25", "203.0.113.9", true},
		{"203.0.0.0/16", "203.0.113.9", false},
		{"198.18.0.1/32", "198.18.0.1", true},
		{"198.18.0.0/15", "198.18.0.1", false},
		{"::/0", "fd00::1", false},
		{"fd00::/8", "fd00::1", true},
		{"10.0.0.0/24", "::ffff:10.0.0.5", false}, // callers unmap; the v6 form needs a v6 rule
	} {
		a := netip.MustParseAddr(tc.addr)
		_, internal := c.Classify(a)
		if got := NamedBy(netip.MustParsePrefix(tc.rule), a, internal); got != tc.want {
			t.Errorf("NamedBy(%s, %s [%v]) = %v, want %v", tc.rule, tc.addr, internal, got, tc.want)
		}
	}
	if NamedBy(netip.MustParsePrefix("10.0.0.0/8"), netip.MustParseAddr("8.8.8.8"), netip.Prefix{}) {
		t.Error("a public address has no internal range to name")
	}
}

func BenchmarkClassify(b *testing.B) {
	c := New(nil, []netip.Addr{netip.MustParseAddr("198.18.0.1")})
	addrs := []netip.Addr{netip.MustParseAddr("93.184.216.34"), netip.MustParseAddr("2606:2800:220:1::1"), netip.MustParseAddr("10.1.2.3")}
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		c.Classify(addrs[i%len(addrs)])
	}
}
