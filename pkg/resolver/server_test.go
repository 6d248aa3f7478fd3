package resolver

import (
	"encoding/binary"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// record is what the test server answers for one name.
type record struct {
	addrs []string // A and AAAA, by the form of each
	ttl   uint32
	cname string // answered before the addresses (which are then the target's)
}

// testServer is an in-process DNS server on 127.0.0.1 (UDP and TCP on one port) that counts
// the queries it gets, per name and type.
type testServer struct {
	addr     string
	mu       sync.Mutex
	records  map[string]record // absolute names
	counts   map[string]int    // "name type"
	total    atomic.Int64
	delay    time.Duration
	truncate bool                        // answer UDP queries with TC set and no records
	silent   map[string]bool             // "name type" never answered, as by a server or firewall that drops them
	rcode    map[string]dnsmessage.RCode // "name type" answered with this code and no records
	// junk returns datagrams sent to the client before each UDP answer (query is the query
	// received), as by an off-path sender that guessed the client's port.
	junk func(query []byte) [][]byte
}

func newTestServer(tb testing.TB, records map[string]record) *testServer {
	tb.Helper()
	// UDP and TCP on the same port: the kernel picks the UDP port, which may be taken for TCP.
	var pc net.PacketConn
	var ln net.Listener
	for try := 0; ; try++ {
		var err error
		if pc, err = net.ListenPacket("udp", "127.0.0.1:0"); err != nil {
			tb.Fatal(err)
		}
		if ln, err = net.Listen("tcp", pc.LocalAddr().String()); err == nil {
			break
		}
		pc.Close()
		if try == 20 {
			tb.Fatal(err)
		}
	}
	s := &testServer{addr: pc.LocalAddr().String(), records: records, counts: map[string]int{}}
	tb.Cleanup(func() { pc.Close(); ln.Close() })
	go func() {
		for {
			buf := make([]byte, 1500)
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			go func() {
				s.mu.Lock()
				junk := s.junk
				s.mu.Unlock()
				if junk != nil {
					for _, j := range junk(buf[:n]) {
						pc.WriteTo(j, from)
					}
				}
				if out := s.answer(buf[:n], true); out != nil {
					pc.WriteTo(out, from)
				}
			}()
		}
	}()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				var l [2]byte
				if _, err := io.ReadFull(c, l[:]); err != nil {
					return
				}
				msg := make([]byte, binary.BigEndian.Uint16(l[:]))
				if _, err := io.ReadFull(c, msg); err != nil {
					return
				}
				out := s.answer(msg, false)
				c.Write(append(binary.BigEndian.AppendUint16(nil, uint16(len(out))), out...))
			}()
		}
	}()
	return s
}

func (s *testServer) answer(msg []byte, udp bool) []byte {
	var p dnsmessage.Parser
	h, err := p.Start(msg)
	if err != nil {
		return nil
	}
	q, err := p.Question()
	if err != nil {
		return nil
	}
	name := strings.ToLower(q.Name.String())
	s.mu.Lock()
	s.counts[name+" "+q.Type.String()]++
	rec, ok := s.records[name]
	delay, truncate := s.delay, s.truncate && udp
	silent := s.silent[name+" "+q.Type.String()]
	rcode, failing := s.rcode[name+" "+q.Type.String()]
	s.mu.Unlock()
	s.total.Add(1)
	if silent {
		return nil
	}
	time.Sleep(delay)
	rh := dnsmessage.Header{ID: h.ID, Response: true, Authoritative: true, Truncated: truncate}
	switch {
	case failing:
		rh.RCode, ok = rcode, false
	case !ok:
		rh.RCode = dnsmessage.RCodeNameError
	}
	b := dnsmessage.NewBuilder(nil, rh)
	b.EnableCompression()
	b.StartQuestions()
	b.Question(q)
	b.StartAnswers()
	if ok && !truncate {
		owner := q.Name
		if rec.cname != "" {
			target := dnsmessage.MustNewName(rec.cname)
			b.CNAMEResource(dnsmessage.ResourceHeader{Name: owner, Class: dnsmessage.ClassINET, TTL: rec.ttl}, dnsmessage.CNAMEResource{CNAME: target})
			owner = target
		}
		rrh := dnsmessage.ResourceHeader{Name: owner, Class: dnsmessage.ClassINET, TTL: rec.ttl}
		for _, a := range rec.addrs {
			ip := netip.MustParseAddr(a)
			switch {
			case ip.Is4() && q.Type == dnsmessage.TypeA:
				b.AResource(rrh, dnsmessage.AResource{A: ip.As4()})
			case ip.Is6() && q.Type == dnsmessage.TypeAAAA:
				b.AAAAResource(rrh, dnsmessage.AAAAResource{AAAA: ip.As16()})
			}
		}
	}
	out, _ := b.Finish()
	return out
}

// set changes the server's behaviour (delay, truncate, silent, rcode, junk) under its lock.
func (s *testServer) set(f func()) {
	s.mu.Lock()
	defer s.mu.Unlock()
	f()
}

// queries returns the number of queries since the last call, and resets the count.
func (s *testServer) queries() int { return int(s.total.Swap(0)) }

func (s *testServer) count(name, typ string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.counts[name+" "+typ]
}

// fakeClock is a settable clock for TTL tests.
type fakeClock struct{ off atomic.Int64 }

func (c *fakeClock) now() time.Time          { return time.Now().Add(time.Duration(c.off.Load())) }
func (c *fakeClock) advance(d time.Duration) { c.off.Add(int64(d)) }

// newTest returns a resolver that asks s, with resolv.conf content conf (nameserver lines are
// overridden by the server) and an empty hosts file, on a fake clock.
func newTest(tb testing.TB, s *testServer, conf string, cfg Config) (*Resolver, *fakeClock) {
	tb.Helper()
	dir := tb.TempDir()
	cfg.ResolvConf, cfg.Hosts = filepath.Join(dir, "resolv.conf"), filepath.Join(dir, "hosts")
	os.WriteFile(cfg.ResolvConf, []byte(conf), 0o644)
	os.WriteFile(cfg.Hosts, []byte("127.0.0.1 localhost\n::1 localhost\n198.18.9.9 hostsonly\n"), 0o644)
	cfg.Server = s.addr
	r := New(cfg)
	c := &fakeClock{}
	r.now = c.now
	return r, c
}
