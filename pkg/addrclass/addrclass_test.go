package addrclass

import (
	"fmt"
	"net/netip"
	"sync"
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
		{"127.0.0.1", Loopback}, // an own loopback address stays loopback (a 127.0.0.0/8 rule names it)
		{"127.0.0.2", Loopback},
		{"127.255.255.255", Loopback},
		{"169.254.169.254", LinkLocal},
		// Cloud platform endpoints: the one in public space is Platform, the others are
		// internal through their range already.
		{"168.63.129.16", Platform}, // Azure WireServer
		{"168.63.129.15", Public},
		{"168.63.129.17", Public},
		{"::ffff:168.63.129.16", Platform},
		{"64:ff9b::a83f:8110", Platform},
		{"2002:a83f:8110::1", Platform},
		{"169.254.169.123", LinkLocal}, // AWS Time Sync
		{"169.254.169.253", LinkLocal}, // AWS Route 53 Resolver
		{"169.254.170.2", LinkLocal},   // ECS task metadata
		{"fd00:ec2::254", Platform},    // AWS IMDS over IPv6
		{"fd00:ec2::255", ULA},         // its neighbour is an ordinary ULA
		{"fd20:ce::254", Platform},     // GCP metadata over IPv6
		{"100.100.100.200", Platform},  // Alibaba Cloud metadata
		{"100.100.100.201", CGNAT},
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
		{"fec0::1", ULA},                              // deprecated site-local
		{"64:ff9b:1::a00:1", Private},                 // local-use NAT64, /96 layout
		{"64:ff9b:1::808:808", Public},                // 8.8.8.8, /96 layout
		{"64:ff9b:1:a9fe:a9:fe00::", LinkLocal},       // /48 layout: 169.254.169.254
		{"64:ff9b:1:a9fe:a9:fe00:808:808", LinkLocal}, // the same, with a suffix a translator ignores
		{"64:ff9b:1:a00:0:100::", Private},            // /48 layout: 10.0.0.1
		{"64:ff9b:1:a:0:1:0:0", Private},              // /56 layout: 10.0.0.1
		{"64:ff9b:1:0:a:0:100:0", Private},            // /64 layout: 10.0.0.1
		{"64:ff9b:1:0:8:808:800:0", Public},           // /64 layout: 8.8.8.8
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
		{"168.63.129.16/32", "168.63.129.16", true}, // platform: only the exact address
		{"168.63.129.0/24", "168.63.129.16", false},
		{"0.0.0.0/0", "168.63.129.16", false},
		{"128.0.0.0/1", "168.63.129.16", false},
		{"::ffff:168.63.129.16/128", "::ffff:168.63.129.16", true},
		{"::ffff:0:0/96", "::ffff:168.63.129.16", false}, // a platform endpoint: only the exact address
		{"::ffff:0:0/96", "::ffff:10.0.0.5", false},      // the mapped prefix as a whole names nothing
		{"::ffff:10.0.0.0/104", "::ffff:10.0.0.5", true}, // the image of 10.0.0.0/8
		// NAT64 (an IPv6-only cluster with DNS64): a rule for the whole prefix, which reaches
		// the IPv4 internet, names no internal address through it.
		{"64:ff9b::/96", "64:ff9b::a9fe:a9fe", false}, // metadata
		{"64:ff9b::/96", "64:ff9b::a83f:8110", false}, // Azure WireServer
		{"64:ff9b::/96", "64:ff9b::6464:64c8", false}, // Alibaba metadata
		{"64:ff9b::/96", "64:ff9b::a00:5", false},
		{"64:ff9b::a9fe:a9fe/128", "64:ff9b::a9fe:a9fe", true},
		{"64:ff9b::a00:0/104", "64:ff9b::a00:5", true},
		{"64:ff9b::a00:0/120", "64:ff9b::a00:5", true},
		{"2002::/16", "2002:a83f:8110::1", false},
		{"2002::/16", "2002:a00:5::1", false},
		{"2002:a00::/24", "2002:a00:5::1", true},
		{"64:ff9b:1::/48", "64:ff9b:1:a9fe:a9:fe00::", false}, // /48 layout: 169.254.169.254
		{"64:ff9b:1:a9fe:a9:fe00::/128", "64:ff9b:1:a9fe:a9:fe00::", true},
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

// The proxy's own addresses are Self before anything else: a pod IP is RFC 1918 or ULA, and
// its embeddings carry the same address. Their range is the address alone.
func TestClassifySelfWins(t *testing.T) {
	c := New([]netip.Prefix{netip.MustParsePrefix("10.0.0.0/24"), netip.MustParsePrefix("198.51.100.0/24")}, []netip.Addr{
		netip.MustParseAddr("10.0.0.7"), netip.MustParseAddr("198.51.100.7"), netip.MustParseAddr("fd12::7"), netip.MustParseAddr("fe80::7%eth0"),
		netip.MustParseAddr("::ffff:100.64.0.7"), netip.MustParseAddr("168.63.129.16"),
	})
	for _, tc := range []struct {
		addr   string
		want   Class
		prefix string
	}{
		{"10.0.0.7", Self, "10.0.0.7/32"}, // private, yet self
		{"10.0.0.8", Private, "10.0.0.0/8"},
		{"10.1.0.7", Private, "10.0.0.0/8"},
		{"198.51.100.7", Self, "198.51.100.7/32"}, // in INTERNAL_CIDRS, yet self
		{"198.51.100.8", Configured, "198.51.100.0/24"},
		{"fd12::7", Self, "fd12::7/128"},
		{"fd12::8", ULA, "fc00::/7"},
		{"fe80::7", Self, "fe80::7/128"},
		{"fe80::7%eth1", Self, "fe80::7/128"},
		{"100.64.0.7", Self, "100.64.0.7/32"}, // stored unmapped
		{"168.63.129.16", Self, "168.63.129.16/32"},
		{"::ffff:10.0.0.7", Self, "::ffff:10.0.0.7/128"},
		{"::ffff:10.0.0.8", Private, "::ffff:10.0.0.0/104"},
		{"::a00:7", Self, "::a00:7/128"},
		{"::ffff:0:a00:7", Self, "::ffff:0:a00:7/128"},
		{"64:ff9b::a00:7", Self, "64:ff9b::a00:7/128"},
		{"64:ff9b:1::a00:7", Self, "64:ff9b:1::a00:7/128"},
		{"2002:a00:7::1", Self, "2002:a00:7::1/128"},
		{"2002:a00:8::1", Private, "2002:a00::/24"},
		// Teredo: client ^f5fffff8 = 10.0.0.7; a self server beats a private client.
		{"2001:0:4136:e378:8000:63bf:f5ff:fff8", Self, "2001:0:4136:e378:8000:63bf:f5ff:fff8/128"},
		{"2001:0:a00:7:8000:63bf:f5ff:fffe", Self, "2001:0:a00:7:8000:63bf:f5ff:fffe/128"},
	} {
		got, p := c.Classify(netip.MustParseAddr(tc.addr))
		if got != tc.want || p.String() != tc.prefix {
			t.Errorf("Classify(%s) = %v %v, want %v %s", tc.addr, got, p, tc.want, tc.prefix)
		}
	}
}

func TestSetSelf(t *testing.T) {
	var zero Classifier
	if got, _ := zero.Classify(netip.MustParseAddr("10.0.0.7")); got != Private {
		t.Fatalf("zero Classifier: %v", got)
	}
	c := New(nil, nil)
	a := netip.MustParseAddr("10.0.0.7")
	if got, _ := c.Classify(a); got != Private {
		t.Fatalf("before SetSelf: %v", got)
	}
	own := []netip.Addr{netip.MustParseAddr("fd12::7"), a, a, {}}
	c.SetSelf(own)
	if got, _ := c.Classify(a); got != Self {
		t.Fatalf("after SetSelf: %v", got)
	}
	own[1] = netip.MustParseAddr("10.0.0.9") // SetSelf copied its argument
	if got, _ := c.Classify(a); got != Self {
		t.Fatalf("SetSelf kept the caller's slice: %v", got)
	}
	if got, _ := c.Classify(netip.MustParseAddr("10.0.0.9")); got != Private {
		t.Fatalf("SetSelf kept the caller's slice: %v", got)
	}
	c.SetSelf(nil)
	if got, _ := c.Classify(a); got != Private {
		t.Fatalf("after SetSelf(nil): %v", got)
	}
	// A large set (a node with many addresses) is searched, not scanned.
	var many []netip.Addr
	for i := 200; i > 0; i-- {
		many = append(many, netip.AddrFrom4([4]byte{10, 9, byte(i), 1}), netip.AddrFrom16([16]byte{0xfd, 15: byte(i)}))
	}
	c.SetSelf(many)
	for _, m := range many {
		if got, _ := c.Classify(m); got != Self {
			t.Fatalf("large set: %v is %v", m, got)
		}
	}
	if got, _ := c.Classify(netip.MustParseAddr("10.9.201.1")); got != Private {
		t.Fatalf("large set: 10.9.201.1 is %v", got)
	}
}

// SetSelf may run while other goroutines classify (go test -race checks the publication).
func TestSetSelfConcurrent(t *testing.T) {
	c := New(nil, nil)
	a := netip.MustParseAddr("10.0.0.7")
	sets := [][]netip.Addr{{a}, nil, {netip.MustParseAddr("fd12::7"), a}}
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				if got, p := c.Classify(a); got != Self && got != Private || !p.IsValid() {
					t.Errorf("Classify during SetSelf: %v %v", got, p)
					return
				}
			}
		}()
	}
	for i := range 1000 {
		c.SetSelf(sets[i%len(sets)])
	}
	close(stop)
	wg.Wait()
}

func TestClassifyDoesNotAllocate(t *testing.T) {
	c := New([]netip.Prefix{netip.MustParsePrefix("203.0.113.0/24")}, []netip.Addr{netip.MustParseAddr("10.0.0.7"), netip.MustParseAddr("fd12::7")})
	for _, s := range []string{
		"93.184.216.34", "10.0.0.7", "10.1.2.3", "203.0.113.9", "168.63.129.16", "fd12::7", "fe80::1%eth0",
		"2606:2800:220:1::1", "::ffff:10.0.0.7", "::ffff:8.8.8.8", "::a00:1", "::ffff:0:a00:1",
		"64:ff9b::808:808", "64:ff9b:1::a00:7", "2002:808:808::1", "2002:a00:7::1",
		"2001:0:4136:e378:8000:63bf:3fff:fdd2", "2001:0:4136:e378:8000:63bf:f5ff:fff8",
	} {
		a := netip.MustParseAddr(s)
		if n := testing.AllocsPerRun(100, func() { c.Classify(a) }); n != 0 {
			t.Errorf("Classify(%s): %v allocations", s, n)
		}
	}
}

func TestClassString(t *testing.T) {
	for c, want := range map[Class]string{Public: "public", Self: "self", Configured: "configured", Platform: "platform", Platform + 1: "unknown"} {
		if got := fmt.Sprint(c); got != want {
			t.Errorf("%d: %q, want %q", c, got, want)
		}
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

func BenchmarkClassifyParallel(b *testing.B) {
	c := New(nil, []netip.Addr{netip.MustParseAddr("198.18.0.1"), netip.MustParseAddr("10.0.0.7"), netip.MustParseAddr("fd12::7")})
	addrs := []netip.Addr{netip.MustParseAddr("93.184.216.34"), netip.MustParseAddr("2606:2800:220:1::1"), netip.MustParseAddr("10.1.2.3"), netip.MustParseAddr("64:ff9b::808:808")}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for i := 0; pb.Next(); i++ {
			c.Classify(addrs[i%len(addrs)])
		}
	})
}

// IPv6 forms that embed IPv4 (NAT64, 6to4, Teredo): the self lookup and the table for each.
func BenchmarkClassifyEmbedded(b *testing.B) {
	c := New(nil, []netip.Addr{netip.MustParseAddr("198.18.0.1")})
	addrs := []netip.Addr{netip.MustParseAddr("64:ff9b::808:808"), netip.MustParseAddr("2002:808:808::1"), netip.MustParseAddr("2001:0:4136:e378:8000:63bf:3fff:fdd2")}
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		c.Classify(addrs[i%len(addrs)])
	}
}
