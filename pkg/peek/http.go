package peek

import (
	"bytes"
	"errors"
	"fmt"
	"strings"

	"github.com/egress-guard/egress-guard/pkg/hostname"
)

// HTTPRequest is what the proxy needs from an HTTP/1.x request head.
type HTTPRequest struct {
	Method string
	Target string // request-target as sent
	Host   string // Host header, or the authority of an absolute-form target; port kept
	Proto  string // "HTTP/1.0" or "HTTP/1.1"
	// Name is Host's host part (no port, no brackets) normalised by hostname.Normalize. It
	// is "" when there is no Host, when Host names an IP address, and when it is not a valid
	// host name or has a malformed port: such a Host is never a name to decide on.
	Name string
}

// Protocol is what the first bytes of a connection look like.
type Protocol int

// Protocols.
const (
	ProtoUnknown Protocol = iota
	ProtoTLS
	ProtoHTTP
)

// Sniff classifies a connection by its first bytes. TLS needs two bytes (a handshake record
// of version 3.x); HTTP needs its method token and the space after it.
func Sniff(first []byte) Protocol {
	if len(first) >= 2 && first[0] == typeHandshake && first[1] == 3 {
		return ProtoTLS
	}
	if i := methodEnd(first); i > 0 && i < len(first) && first[i] == ' ' {
		return ProtoHTTP
	}
	return ProtoUnknown
}

// Undecided reports whether first is too short for Sniff to tell: the first byte of a TLS
// handshake record, or a run of A-Z (none included) that could still be an HTTP method. Sniff
// says ProtoUnknown for it, but more bytes may make it TLS or HTTP.
func Undecided(first []byte) bool {
	if len(first) == 1 && first[0] == typeHandshake {
		return true
	}
	return methodEnd(first) == len(first)
}

// maxMethod bounds the method token (the longest registered methods are short).
const maxMethod = 20

// methodEnd returns the length of the leading run of A-Z, or -1 when it is too long.
func methodEnd(b []byte) int {
	i := 0
	for i < len(b) && b[i] >= 'A' && b[i] <= 'Z' {
		i++
		if i > maxMethod {
			return -1
		}
	}
	return i
}

// ParseHTTPRequestHead parses an HTTP/1.x request line and header fields up to the blank line.
func ParseHTTPRequestHead(data []byte, maxHead int) (*HTTPRequest, error) {
	m := methodEnd(data)
	if m < 0 || (m < len(data) && (m == 0 || data[m] != ' ')) {
		return nil, ErrNotHTTP
	}
	if m == len(data) {
		if len(data) > maxHead {
			return nil, ErrTooLarge
		}
		return nil, ErrNeedMore
	}
	end, sepLen := headEnd(data)
	if end < 0 {
		if len(data) > maxHead {
			return nil, ErrTooLarge
		}
		return nil, ErrNeedMore
	}
	if end+sepLen > maxHead {
		return nil, ErrTooLarge
	}
	lines := splitLines(data[:end])
	req, err := parseRequestLine(lines[0])
	if err != nil {
		return nil, err
	}
	authority := ""
	if t := req.Target; strings.HasPrefix(strings.ToLower(t), "http://") || strings.HasPrefix(strings.ToLower(t), "https://") {
		rest := t[strings.Index(t, "://")+3:]
		if i := strings.IndexAny(rest, "/?#"); i >= 0 {
			rest = rest[:i]
		}
		if rest == "" || strings.Contains(rest, "@") {
			return nil, errors.New("peek: absolute-form target without a plain authority")
		}
		authority = rest
	}
	host, hostSeen := "", false
	for _, l := range lines[1:] {
		if len(l) > 0 && (l[0] == ' ' || l[0] == '\t') {
			return nil, errors.New("peek: obsolete line folding in header")
		}
		colon := bytes.IndexByte(l, ':')
		if colon <= 0 {
			return nil, errors.New("peek: header line without a field name")
		}
		name := l[:colon]
		if !isToken(name) {
			return nil, errors.New("peek: invalid header field name")
		}
		value := bytes.Trim(l[colon+1:], " \t")
		for _, c := range value {
			if (c < 0x20 && c != '\t') || c == 0x7f {
				return nil, errors.New("peek: control character in header value")
			}
		}
		if strings.EqualFold(string(name), "Host") {
			v := string(value)
			if hostSeen {
				if !strings.EqualFold(v, host) {
					return nil, errors.New("peek: conflicting Host headers")
				}
				continue
			}
			host, hostSeen = v, true
		}
	}
	if authority != "" {
		if hostSeen && !strings.EqualFold(host, authority) {
			return nil, errors.New("peek: Host header disagrees with the request target")
		}
		host = authority
	}
	if host == "" && req.Proto == "HTTP/1.1" {
		return nil, errors.New("peek: HTTP/1.1 request without Host")
	}
	req.Host = host
	req.Name = hostName(host)
	return req, nil
}

// hostName returns the normalised name in a Host value (uri-host [":" port]), or "".
func hostName(h string) string {
	if h == "" || h[0] == '[' {
		return "" // empty, or an IP literal (IPv6 or IPvFuture)
	}
	if i := strings.LastIndexByte(h, ':'); i >= 0 {
		for j := i + 1; j < len(h); j++ {
			if h[j] < '0' || h[j] > '9' {
				return ""
			}
		}
		h = h[:i]
	}
	name, err := hostname.Normalize(h)
	if err != nil {
		return ""
	}
	return name
}

// headEnd finds the blank line that ends the head: CRLF CRLF, or bare LF LF as net/http
// tolerates. It returns the index where the blank line starts and its length.
func headEnd(b []byte) (int, int) {
	for i := 0; i < len(b); i++ {
		if b[i] != '\n' {
			continue
		}
		if i+1 < len(b) && b[i+1] == '\n' {
			return i + 1, 1
		}
		if i+2 < len(b) && b[i+1] == '\r' && b[i+2] == '\n' {
			return i + 1, 2
		}
	}
	return -1, 0
}

func splitLines(b []byte) [][]byte {
	lines := bytes.Split(b, []byte("\n"))
	for i, l := range lines {
		lines[i] = bytes.TrimSuffix(l, []byte("\r"))
	}
	if n := len(lines); n > 1 && len(lines[n-1]) == 0 {
		lines = lines[:n-1]
	}
	return lines
}

func parseRequestLine(l []byte) (*HTTPRequest, error) {
	parts := strings.Split(string(l), " ")
	if len(parts) != 3 {
		return nil, errors.New("peek: malformed request line")
	}
	method, target, proto := parts[0], parts[1], parts[2]
	if method == "" || target == "" {
		return nil, errors.New("peek: malformed request line")
	}
	if proto != "HTTP/1.0" && proto != "HTTP/1.1" {
		return nil, fmt.Errorf("peek: unsupported protocol %q", truncate(proto))
	}
	for i := 0; i < len(target); i++ {
		if c := target[i]; c <= 0x20 || c >= 0x7f {
			return nil, errors.New("peek: invalid byte in request target")
		}
	}
	return &HTTPRequest{Method: method, Target: target, Proto: proto}, nil
}

func isToken(b []byte) bool {
	for _, c := range b {
		if c <= 0x20 || c >= 0x7f || strings.IndexByte(`"(),/:;<=>?@[\]{}`, c) >= 0 {
			return false
		}
	}
	return len(b) > 0
}

func truncate(s string) string {
	if len(s) > 16 {
		return s[:16]
	}
	return s
}
