package resolver

import (
	"bufio"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
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
	eachLine(path, "#;", func(fs []string) {
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
	})
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
// first. The names are appended to out, so that the lookup of an absolute name (every name
// the proxy asks with a dot) allocates no list.
func (c *conf) names(name string, out []string) []string {
	if strings.HasSuffix(name, ".") {
		return append(out, name)
	}
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

// hostsFile is the hosts file, parsed once and parsed again only when it changed. A
// single-label name (a Kubernetes short name such as "redis") is looked up in it on every
// connection: reading the file each time would put file I/O on the connection path. Like Go's
// own resolver, it looks at the file's modification time and size at most every
// hostsRecheck.
type hostsFile struct {
	path string

	mu      sync.Mutex
	checked time.Time // last stat
	mod     time.Time
	size    int64
	names   map[string][]netip.Addr // lower case, without the trailing dot
}

const hostsRecheck = 5 * time.Second

// lookup returns the addresses the file gives name (case-insensitive), or nil. The slice is
// shared: callers must not modify it.
func (h *hostsFile) lookup(name string, now time.Time) []netip.Addr {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.names == nil || now.Sub(h.checked) >= hostsRecheck {
		h.checked = now
		fi, err := os.Stat(h.path)
		switch {
		case err != nil:
			h.names, h.mod, h.size = map[string][]netip.Addr{}, time.Time{}, 0
		case h.names == nil || !fi.ModTime().Equal(h.mod) || fi.Size() != h.size:
			h.mod, h.size = fi.ModTime(), fi.Size()
			h.names = parseHosts(h.path)
		}
	}
	return h.names[strings.ToLower(strings.TrimSuffix(name, "."))]
}

// parseHosts reads a hosts file into its names' addresses (an unreadable file has none).
func parseHosts(path string) map[string][]netip.Addr {
	names := map[string][]netip.Addr{}
	eachLine(path, "#", func(fs []string) {
		a, err := netip.ParseAddr(fs[0])
		if err != nil {
			return
		}
		for _, h := range fs[1:] {
			n := strings.ToLower(strings.TrimSuffix(h, "."))
			names[n] = append(names[n], a.WithZone("").Unmap())
		}
	})
	return names
}

// eachLine calls f with the fields of every line of the file at path that has at least two,
// after cutting a comment at any of the comment characters: the shape resolv.conf and the
// hosts file share. A missing or unreadable file has no lines.
func eachLine(path, comment string, f func(fields []string)) {
	file, err := os.Open(path)
	if err != nil {
		return
	}
	defer file.Close()
	s := bufio.NewScanner(file)
	for s.Scan() {
		line := s.Text()
		if i := strings.IndexAny(line, comment); i >= 0 {
			line = line[:i]
		}
		if fs := strings.Fields(line); len(fs) >= 2 {
			f(fs)
		}
	}
}
