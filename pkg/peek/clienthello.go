// Package peek inspects the first bytes a client sends — a TLS ClientHello or an HTTP/1.x
// request head — so that the proxy can decide on the name asked for before it dials anything.
//
// Everything here parses untrusted bytes: parsers are bounds-checked through a small reader
// that fails instead of indexing past the end, sizes are capped, and reads are bounded in
// time. The parsers are pure functions over a byte prefix so that they can be fuzzed; a
// valid but incomplete prefix yields ErrNeedMore, never a partial answer.
package peek

import (
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/egress-guard/egress-guard/pkg/hostname"
)

// Errors.
var (
	ErrNeedMore = errors.New("peek: need more data")
	ErrNotTLS   = errors.New("peek: not a TLS handshake")
	ErrNotHTTP  = errors.New("peek: not an HTTP/1.x request")
	ErrTooLarge = errors.New("peek: message exceeds limit")
)

// MaxClientHello bounds the handshake message. Post-quantum key shares already push real
// ClientHellos past one 16 KiB record; 64 KiB leaves room without letting a client make the
// proxy buffer arbitrary amounts.
const MaxClientHello = 64 << 10

const (
	recordHeaderLen    = 5
	maxRecordPayload   = 1<<14 + 2048 // TLSPlaintext limit plus slack some stacks use
	handshakeHeaderLen = 4
	typeHandshake      = 22
	typeClientHello    = 1
	extServerName      = 0
	extALPN            = 16
	extECH             = 0xfe0d
)

// ClientHello is what the proxy needs from a ClientHello.
type ClientHello struct {
	// ServerName is the SNI host_name normalised by hostname.Normalize (lower-case, one
	// trailing dot removed). It is "" when there is no host_name, and also when the host_name
	// is not a valid host name (an IP literal, a numeric last label, a bad byte...): such a
	// value is never a name to decide on. RawServerName tells the two cases apart.
	ServerName string
	// RawServerName is the host_name exactly as sent (any bytes, up to 64 KiB); "" if absent.
	RawServerName string
	ECH           bool // encrypted_client_hello present: the outer name is not authoritative
	ALPN          []string
	Version       uint16 // legacy_version
}

// ParseClientHello parses the TLS records at the start of data and returns the ClientHello
// once all of it is present. The handshake message may be fragmented over several records.
func ParseClientHello(data []byte) (*ClientHello, error) {
	msg, err := reassemble(data)
	if err != nil {
		return nil, err
	}
	return parseHello(msg)
}

// reassemble concatenates the payloads of the leading handshake records until they hold one
// complete handshake message, and returns that message (header included).
func reassemble(data []byte) ([]byte, error) {
	if len(data) == 0 {
		return nil, ErrNeedMore
	}
	var msg []byte
	need := -1 // total handshake message length, once its header is known
	for {
		if len(data) < recordHeaderLen {
			if err := checkRecordPrefix(data); err != nil {
				return nil, err
			}
			return nil, ErrNeedMore
		}
		if err := checkRecordPrefix(data[:3]); err != nil {
			return nil, err
		}
		n := int(data[3])<<8 | int(data[4])
		if n == 0 || n > maxRecordPayload {
			return nil, fmt.Errorf("peek: TLS record length %d out of range", n)
		}
		if len(data) < recordHeaderLen+n {
			// The record is incomplete; check the header of the message as far as it goes
			// so that an oversized or wrong-type message fails early.
			if err := checkHandshakeHeader(append(msg, data[recordHeaderLen:]...)); err != nil {
				return nil, err
			}
			return nil, ErrNeedMore
		}
		if msg == nil && need < 0 && n >= handshakeHeaderLen {
			msg = make([]byte, 0, min(n, MaxClientHello+handshakeHeaderLen))
		}
		msg = append(msg, data[recordHeaderLen:recordHeaderLen+n]...)
		data = data[recordHeaderLen+n:]
		if err := checkHandshakeHeader(msg); err != nil {
			return nil, err
		}
		if len(msg) >= handshakeHeaderLen {
			need = handshakeHeaderLen + (int(msg[1])<<16 | int(msg[2])<<8 | int(msg[3]))
			if len(msg) >= need {
				if len(msg) > need {
					// Bytes of a second handshake message: a client sends nothing else
					// before the server answers.
					return nil, errors.New("peek: data after the ClientHello in its records")
				}
				return msg, nil
			}
		}
	}
}

// checkRecordPrefix validates up to the first three bytes of a record header.
func checkRecordPrefix(b []byte) error {
	if len(b) >= 1 && b[0] != typeHandshake {
		return ErrNotTLS
	}
	if len(b) >= 2 && b[1] != 3 {
		return ErrNotTLS
	}
	if len(b) >= 3 && b[2] > 4 {
		return ErrNotTLS
	}
	return nil
}

func checkHandshakeHeader(msg []byte) error {
	if len(msg) >= 1 && msg[0] != typeClientHello {
		return fmt.Errorf("peek: handshake message type %d is not a ClientHello", msg[0])
	}
	if len(msg) >= handshakeHeaderLen {
		if n := int(msg[1])<<16 | int(msg[2])<<8 | int(msg[3]); n > MaxClientHello {
			return ErrTooLarge
		}
	}
	return nil
}

// parseHello parses a complete ClientHello handshake message.
func parseHello(msg []byte) (*ClientHello, error) {
	r := reader(msg[handshakeHeaderLen:])
	var h ClientHello
	var ok bool
	if h.Version, ok = r.u16(); !ok {
		return nil, errMalformed("version")
	}
	if _, ok = r.bytes(32); !ok {
		return nil, errMalformed("random")
	}
	if sid, ok := r.vec8(); !ok || len(sid) > 32 {
		return nil, errMalformed("session id")
	}
	if cs, ok := r.vec16(); !ok || len(cs) < 2 || len(cs)%2 != 0 {
		return nil, errMalformed("cipher suites")
	}
	if cm, ok := r.vec8(); !ok || len(cm) < 1 {
		return nil, errMalformed("compression methods")
	}
	if len(r) == 0 {
		return &h, nil // no extensions: an old client, and no SNI
	}
	exts, ok := r.vec16()
	if !ok || len(r) != 0 {
		return nil, errMalformed("extensions length")
	}
	seen := map[uint16]bool{}
	for len(exts) > 0 {
		typ, ok1 := exts.u16()
		body, ok2 := exts.vec16()
		if !ok1 || !ok2 {
			return nil, errMalformed("extension")
		}
		if seen[typ] {
			return nil, fmt.Errorf("peek: duplicate TLS extension %d", typ)
		}
		seen[typ] = true
		switch typ {
		case extServerName:
			raw, err := parseSNI(body)
			if err != nil {
				return nil, err
			}
			h.RawServerName = raw
			h.ServerName = serverName(raw)
		case extALPN:
			protos, err := parseALPN(body)
			if err != nil {
				return nil, err
			}
			h.ALPN = protos
		case extECH:
			h.ECH = true
		}
	}
	return &h, nil
}

// parseSNI returns the host_name of a server_name extension as sent. Only the framing is
// checked here: a malformed list, an empty host_name or two host_names are errors.
func parseSNI(body reader) (string, error) {
	list, ok := body.vec16()
	if !ok || len(body) != 0 || len(list) == 0 {
		return "", errMalformed("server_name list")
	}
	var name reader
	for len(list) > 0 {
		typ, ok1 := list.u8()
		v, ok2 := list.vec16()
		if !ok1 || !ok2 {
			return "", errMalformed("server_name entry")
		}
		if typ != 0 {
			continue // unknown name types are ignored, as RFC 6066 clients never send them
		}
		if len(v) == 0 {
			return "", errMalformed("empty host_name")
		}
		if name != nil {
			return "", errors.New("peek: more than one host_name in server_name")
		}
		name = v
	}
	return string(name), nil
}

// serverName is the name an SNI host_name stands for: its normal form, or "" when it is not a
// valid host name. RFC 6066 allows neither IP literals nor a trailing dot; the dot is
// tolerated and removed, as clients do send it.
func serverName(raw string) string {
	name, err := hostname.Normalize(raw)
	if err != nil {
		return ""
	}
	return name
}

func parseALPN(body reader) ([]string, error) {
	list, ok := body.vec16()
	if !ok || len(body) != 0 {
		return nil, errMalformed("ALPN")
	}
	var out []string
	for len(list) > 0 {
		p, ok := list.vec8()
		if !ok || len(p) == 0 {
			return nil, errMalformed("ALPN protocol")
		}
		if len(out) < 16 {
			out = append(out, string(p))
		}
	}
	return out, nil
}

func errMalformed(what string) error { return fmt.Errorf("peek: malformed ClientHello: %s", what) }

// reader consumes big-endian fields from a byte slice; every method reports false instead of
// reading past the end.
type reader []byte

func (r *reader) u8() (uint8, bool) {
	if len(*r) < 1 {
		return 0, false
	}
	v := (*r)[0]
	*r = (*r)[1:]
	return v, true
}

func (r *reader) u16() (uint16, bool) {
	if len(*r) < 2 {
		return 0, false
	}
	v := uint16((*r)[0])<<8 | uint16((*r)[1])
	*r = (*r)[2:]
	return v, true
}

func (r *reader) bytes(n int) (reader, bool) {
	if n < 0 || len(*r) < n {
		return nil, false
	}
	v := (*r)[:n]
	*r = (*r)[n:]
	return v, true
}

func (r *reader) vec8() (reader, bool) {
	n, ok := r.u8()
	if !ok {
		return nil, false
	}
	return r.bytes(int(n))
}

func (r *reader) vec16() (reader, bool) {
	n, ok := r.u16()
	if !ok {
		return nil, false
	}
	return r.bytes(int(n))
}

// ReadClientHello reads from conn until a ClientHello is complete or proven invalid, reading
// at most maxBytes bytes and for at most timeout. It returns every byte it read, also on error,
// so that the caller can replay them upstream. A timeout error satisfies
// errors.Is(err, os.ErrDeadlineExceeded).
func ReadClientHello(conn net.Conn, maxBytes int, timeout time.Duration) (*ClientHello, []byte, error) {
	if err := conn.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return nil, nil, err
	}
	defer conn.SetReadDeadline(time.Time{})
	buf := make([]byte, 0, min(4096, maxBytes))
	for {
		if len(buf) >= maxBytes {
			return nil, buf, ErrTooLarge
		}
		if len(buf) == cap(buf) {
			nb := make([]byte, len(buf), min(2*cap(buf), maxBytes))
			copy(nb, buf)
			buf = nb
		}
		n, err := conn.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if n > 0 {
			h, perr := ParseClientHello(buf)
			if perr == nil {
				return h, buf, nil
			}
			if !errors.Is(perr, ErrNeedMore) {
				return nil, buf, perr
			}
		}
		if err != nil {
			return nil, buf, err
		}
	}
}
