package proxy

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"

	"github.com/egress-guard/egress-guard/pkg/decision"
	"github.com/egress-guard/egress-guard/pkg/hostname"
)

// requestTarget extracts the destination from a CONNECT authority or an absolute http URL.
func requestTarget(req *http.Request) (decision.Target, error) {
	if req.Method == http.MethodConnect {
		host, port, err := net.SplitHostPort(req.RequestURI)
		if err != nil {
			return decision.Target{}, fmt.Errorf("CONNECT target %q: want host:port", req.RequestURI)
		}
		t, err := parseTarget(host, port)
		if err != nil {
			return decision.Target{}, fmt.Errorf("CONNECT target %q: %v", req.RequestURI, err)
		}
		return t, nil
	}
	if !req.URL.IsAbs() || req.URL.Host == "" {
		return decision.Target{}, errors.New("not a proxy request: the request target must be an absolute http:// URL")
	}
	if req.URL.Scheme != "http" {
		return decision.Target{}, fmt.Errorf("scheme %q is not proxied as plain HTTP; use CONNECT", req.URL.Scheme)
	}
	port := req.URL.Port()
	if port == "" {
		port = "80"
	}
	host := req.URL.Hostname()
	if strings.Contains(host, ":") {
		host = "[" + host + "]"
	}
	t, err := parseTarget(host, port)
	if err != nil {
		return decision.Target{}, fmt.Errorf("URL host %q: %v", req.URL.Host, err)
	}
	return t, nil
}

// parseTarget validates a host and port from a CONNECT authority, a URL, or a captured
// connection's SNI or Host. Names are normalised by pkg/hostname, the same rules the policy
// loader applies, so the name that reaches policy matching and the resolver is the one that was
// logged; anything that is neither an IP literal nor a valid host name is rejected.
func parseTarget(host, port string) (decision.Target, error) {
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil || p == 0 {
		return decision.Target{}, errors.New("invalid port")
	}
	h := strings.TrimSuffix(strings.TrimPrefix(host, "["), "]")
	if a, err := netip.ParseAddr(h); err == nil {
		if a.Zone() != "" {
			return decision.Target{}, errors.New("IPv6 zones are not allowed")
		}
		return decision.Target{Addr: a.Unmap(), Port: uint16(p)}, nil
	}
	if host != h {
		return decision.Target{}, errors.New("brackets around a non-IPv6 host")
	}
	name, err := hostname.Normalize(host)
	if err != nil {
		return decision.Target{}, err
	}
	return decision.Target{Host: name, Port: uint16(p)}, nil
}
