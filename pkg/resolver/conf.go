package resolver

import (
	"bufio"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"
)

// conf is what the resolver takes from resolv.conf.
type conf struct {
	servers  []string // host:port
	search   []string // absolute, with the trailing dot
	ndots    int
	timeout  time.Duration // per query to one server
	attempts int           // rounds over the servers
}

// readConf parses a resolv.conf. A missing or unreadable file gives the defaults the C
// library and Go's resolver use: the local server, ndots 1, 5 s, 2 attempts.
func readConf(path string) conf {
	c := conf{ndots: 1, timeout: 5 * time.Second, attempts: 2}
	f, err := os.Open(path)
	if err == nil {
		defer f.Close()
		s := bufio.NewScanner(f)
		for s.Scan() {
			line := s.Text()
			if i := strings.IndexAny(line, "#;"); i >= 0 {
				line = line[:i]
			}
			fs := strings.Fields(line)
			if len(fs) < 2 {
				continue
			}
			switch fs[0] {
			case "nameserver":
				// Zone-scoped link-local servers ("fe80::1%eth0") are accepted as written.
				if a, err := netip.ParseAddr(fs[1]); err == nil && len(c.servers) < 3 {
					c.servers = append(c.servers, net.JoinHostPort(a.String(), "53"))
				}
			case "domain":
				c.search = []string{absolute(fs[1])}
			case "search":
				c.search = c.search[:0]
				for _, d := range fs[1:] {
					if d != "." {
						c.search = append(c.search, absolute(d))
					}
				}
			case "options":
				for _, o := range fs[1:] {
					k, v, _ := strings.Cut(o, ":")
					n, err := strconv.Atoi(v)
					switch {
					case err != nil:
					case k == "ndots":
						c.ndots = min(max(n, 0), 15)
					case k == "timeout" && n >= 1:
						c.timeout = time.Duration(min(n, 30)) * time.Second
					case k == "attempts" && n >= 1:
						c.attempts = min(n, 5)
					}
				}
			}
		}
	}
	if len(c.servers) == 0 {
		c.servers = []string{"127.0.0.1:53", "[::1]:53"}
	}
	return c
}

func absolute(name string) string {
	if strings.HasSuffix(name, ".") {
		return name
	}
	return name + "."
}

// names is the list of absolute names to ask for name, in order. A name with a trailing dot
// is asked as written and only so. Otherwise, as the C library does: with at least ndots dots,
// the name as given first and then under each search domain; with fewer, the search domains
// first.
func (c *conf) names(name string) []string {
	if strings.HasSuffix(name, ".") {
		return []string{name}
	}
	out := make([]string, 0, len(c.search)+1)
	asIs := strings.Count(name, ".") >= c.ndots
	if asIs {
		out = append(out, name+".")
	}
	for _, d := range c.search {
		if len(name)+len(d) <= 254 {
			out = append(out, name+"."+d)
		}
	}
	if !asIs {
		out = append(out, name+".")
	}
	return out
}

// readHosts returns the addresses a hosts file gives name (case-insensitive), or nil.
func readHosts(path, name string) []netip.Addr {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	name = strings.ToLower(strings.TrimSuffix(name, "."))
	var out []netip.Addr
	s := bufio.NewScanner(f)
	for s.Scan() {
		line := s.Text()
		if i := strings.IndexByte(line, '#'); i >= 0 {
			line = line[:i]
		}
		fs := strings.Fields(line)
		if len(fs) < 2 {
			continue
		}
		a, err := netip.ParseAddr(fs[0])
		if err != nil {
			continue
		}
		for _, h := range fs[1:] {
			if strings.ToLower(strings.TrimSuffix(h, ".")) == name {
				out = append(out, a.WithZone("").Unmap())
				break
			}
		}
	}
	return out
}
