package resolver

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// ednsSize is the UDP payload size advertised with EDNS(0): the DNS flag day 2020 value,
// which avoids IP fragmentation on every common path.
const ednsSize = 1232

// maxCNAMEs bounds how many CNAME hops of one answer are followed.
const maxCNAMEs = 8

// MaxAddrs bounds the addresses kept from one answer: the first MaxAddrs, in the answer's
// order. A TCP answer can carry about 4,000 A records in 64 KiB, and the names are chosen by
// whoever runs a wildcard-allowed domain's DNS; kept whole, 10,000 cache entries of them would
// take about a gigabyte. The dialer tries the addresses one after another (Happy Eyeballs,
// pkg/dialer, one attempt every AttemptDelay), so past a few dozen more addresses are never
// dialed: 32 is already eight seconds of staggered attempts.
const MaxAddrs = 32

var (
	errTruncated = errors.New("truncated response")
	errMismatch  = errors.New("response does not match the query")
)

// answer is one server's answer to one question.
type answer struct {
	addrs []netip.Addr
	ttl   time.Duration // the least TTL of the records that led to addrs
	nx    bool          // NXDOMAIN
}

// serverError is an answer that says nothing about the name (SERVFAIL, REFUSED, ...): the
// next server is asked; if none answers better, the failure is cached for FailureTTL only.
type serverError struct{ rcode dnsmessage.RCode }

// Error names the code as DNS tools do (dig's status), which is what an operator searches for.
func (e *serverError) Error() string {
	var name string
	switch e.rcode {
	case dnsmessage.RCodeFormatError:
		name = "FORMERR"
	case dnsmessage.RCodeServerFailure:
		name = "SERVFAIL"
	case dnsmessage.RCodeNotImplemented:
		name = "NOTIMP"
	case dnsmessage.RCodeRefused:
		name = "REFUSED"
	default:
		name = "rcode " + strconv.Itoa(int(e.rcode))
	}
	return "server answered " + name
}

// buildQuery is a recursive query for name (absolute) and type, with an EDNS(0) OPT record.
func buildQuery(id uint16, q dnsmessage.Question) ([]byte, error) {
	b := dnsmessage.NewBuilder(make([]byte, 2, 514), dnsmessage.Header{ID: id, RecursionDesired: true})
	b.EnableCompression()
	if err := b.StartQuestions(); err != nil {
		return nil, err
	}
	if err := b.Question(q); err != nil {
		return nil, err
	}
	if err := b.StartAdditionals(); err != nil {
		return nil, err
	}
	var opt dnsmessage.ResourceHeader
	if err := opt.SetEDNS0(ednsSize, dnsmessage.RCodeSuccess, false); err != nil {
		return nil, err
	}
	if err := b.OPTResource(opt, dnsmessage.OPTResource{}); err != nil {
		return nil, err
	}
	msg, err := b.Finish()
	if err != nil {
		return nil, err
	}
	// The first two bytes are room for the TCP length prefix.
	binary.BigEndian.PutUint16(msg, uint16(len(msg)-2))
	return msg, nil
}

// parseResponse reads a server's response to the query (id, q). It checks that the response
// answers this very question, follows CNAMEs from the question's name, and keeps the A or AAAA
// records (as q asks) at the end of that chain, the first MaxAddrs of them. The bytes are
// untrusted: any malformed input is an error, never a panic.
func parseResponse(msg []byte, id uint16, q dnsmessage.Question) (answer, error) {
	var p dnsmessage.Parser
	h, err := p.Start(msg)
	if err != nil {
		return answer{}, err
	}
	if !h.Response || h.ID != id {
		return answer{}, errMismatch
	}
	rq, err := p.Question()
	if err != nil {
		return answer{}, err
	}
	if rq.Type != q.Type || rq.Class != q.Class || !strings.EqualFold(rq.Name.String(), q.Name.String()) {
		return answer{}, errMismatch
	}
	if err := p.SkipAllQuestions(); err != nil {
		return answer{}, err
	}
	if h.Truncated {
		return answer{}, errTruncated
	}
	switch h.RCode {
	case dnsmessage.RCodeSuccess:
	case dnsmessage.RCodeNameError:
		return answer{nx: true}, nil
	default:
		return answer{}, &serverError{rcode: h.RCode}
	}

	type rr struct {
		name  string
		ttl   uint32
		cname string
		addr  netip.Addr
	}
	var rrs []rr
	for {
		rh, err := p.AnswerHeader()
		if err == dnsmessage.ErrSectionDone {
			break
		}
		if err != nil {
			return answer{}, err
		}
		r := rr{name: strings.ToLower(rh.Name.String()), ttl: rh.TTL}
		switch {
		case rh.Class != dnsmessage.ClassINET:
			if err := p.SkipAnswer(); err != nil {
				return answer{}, err
			}
			continue
		case rh.Type == dnsmessage.TypeA && q.Type == dnsmessage.TypeA:
			a, err := p.AResource()
			if err != nil {
				return answer{}, err
			}
			r.addr = netip.AddrFrom4(a.A)
		case rh.Type == dnsmessage.TypeAAAA && q.Type == dnsmessage.TypeAAAA:
			a, err := p.AAAAResource()
			if err != nil {
				return answer{}, err
			}
			r.addr = netip.AddrFrom16(a.AAAA).Unmap()
		case rh.Type == dnsmessage.TypeCNAME:
			c, err := p.CNAMEResource()
			if err != nil {
				return answer{}, err
			}
			r.cname = strings.ToLower(c.CNAME.String())
		default:
			if err := p.SkipAnswer(); err != nil {
				return answer{}, err
			}
			continue
		}
		rrs = append(rrs, r)
	}

	target := strings.ToLower(q.Name.String())
	ttl := uint32(1<<31 - 1)
	for hop := 0; ; hop++ {
		next := ""
		for _, r := range rrs {
			if r.name == target && r.cname != "" {
				next, ttl = r.cname, min(ttl, r.ttl)
				break
			}
		}
		if next == "" {
			break
		}
		if hop == maxCNAMEs {
			return answer{}, errors.New("CNAME chain too long")
		}
		target = next
	}
	var a answer
	addrTTL := uint32(1<<31 - 1)
	for _, r := range rrs {
		if r.name == target && r.addr.IsValid() {
			a.addrs = append(a.addrs, r.addr)
			addrTTL = min(addrTTL, r.ttl)
			if len(a.addrs) == MaxAddrs {
				break
			}
		}
	}
	if len(a.addrs) > 0 {
		ttl = min(ttl, addrTTL)
	}
	a.ttl = time.Duration(min(ttl, 1<<31-1)) * time.Second
	return a, nil
}

// exchange asks one server one question: over UDP from a fresh socket (a random source port
// per query), and again over TCP when the UDP answer is truncated.
func exchange(ctx context.Context, server string, q dnsmessage.Question, timeout time.Duration) (answer, error) {
	id := uint16(rand.Uint32())
	msg, err := buildQuery(id, q)
	if err != nil {
		return answer{}, err
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	a, err := exchangeUDP(ctx, server, msg[2:], id, q)
	if err == errTruncated {
		a, err = exchangeTCP(ctx, server, msg, id, q)
	}
	return a, err
}

// send connects to server and writes msg. The connection's reads and writes end with ctx
// (its deadline, or its cancellation).
func send(ctx context.Context, network, server string, msg []byte) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, network, server)
	if err != nil {
		return nil, err
	}
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
	if _, err := c.Write(msg); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

func exchangeUDP(ctx context.Context, server string, msg []byte, id uint16, q dnsmessage.Question) (answer, error) {
	c, err := send(ctx, "udp", server, msg)
	if err != nil {
		return answer{}, err
	}
	defer c.Close()
	buf := make([]byte, ednsSize+512)
	var ignored error // the last datagram ignored as malformed, for the timeout's message
	for {
		n, err := c.Read(buf)
		if err != nil {
			if ctx.Err() != nil {
				if ignored != nil {
					return answer{}, fmt.Errorf("%w (ignored a malformed response from %s: %v)", ctx.Err(), server, ignored)
				}
				return answer{}, ctx.Err()
			}
			return answer{}, err
		}
		// The socket is connected, so only the server's address gets here, but anyone can
		// forge that address. A datagram that does not parse, or answers another ID or
		// question, is a stray or a spoofing attempt: ignore it and keep waiting for the
		// server's answer until the deadline. Giving up on it would let an off-path sender
		// that guesses the source port fail the lookup (and have the failure cached).
		a, err := parseResponse(buf[:n], id, q)
		if _, answered := err.(*serverError); err == nil || err == errTruncated || answered {
			return a, err
		}
		if err != errMismatch {
			ignored = err
		}
	}
}

func exchangeTCP(ctx context.Context, server string, msg []byte, id uint16, q dnsmessage.Question) (answer, error) {
	c, err := send(ctx, "tcp", server, msg)
	if err != nil {
		return answer{}, err
	}
	defer c.Close()
	var l [2]byte
	if _, err := io.ReadFull(c, l[:]); err != nil {
		return answer{}, err
	}
	buf := make([]byte, binary.BigEndian.Uint16(l[:]))
	if _, err := io.ReadFull(c, buf); err != nil {
		return answer{}, err
	}
	a, err := parseResponse(buf, id, q)
	if err == errTruncated {
		err = errors.New("truncated response over TCP")
	}
	return a, err
}
