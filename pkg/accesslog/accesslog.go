// Package accesslog writes the two JSON lines egress-guard logs for every connection: a
// decision line when the proxy has decided (before any upstream connection is opened) and a
// close line when the connection ends, with bytes each way and duration.
//
// Credentials never reach this package: a Record has no field that could hold an API key or
// token, only the identity name the credential resolved to.
package accesslog

import (
	"context"
	"log/slog"
	"net/netip"
	"time"

	"github.com/egress-guard/egress-guard/pkg/outcome"
)

// Record describes one proxied connection (a CONNECT tunnel, a forwarded HTTP request or a
// transparently captured connection). The proxy fills it in as the pipeline advances.
type Record struct {
	ID          uint64
	Listener    string // "explicit" or "transparent"
	Client      netip.AddrPort
	Method      string // the HTTP method, on the explicit listener
	Protocol    string // what a captured connection started with: tls, http, server-first, tcp
	Identity    string // policy identity, "unknown" for an unknown credential, "none" without one
	Target      string // host:port the client asked for (CONNECT authority, URL host, SNI/Host)
	SNI         string
	Destination string // matched policy entry, or "none"
	Action      outcome.Action
	Reason      outcome.Reason // why the decision came out as it did
	Status      outcome.Status // the egress_proxy_requests_total status
	Upstream    netip.AddrPort
	Start       time.Time
	BytesUp     int64 // client to destination
	BytesDown   int64 // destination to client
	CloseReason outcome.CloseReason
	Request     int    // the request's number on a keep-alive connection (forwarded plain HTTP), from 1
	ECH         bool   // the ClientHello carried encrypted_client_hello: its SNI is only the outer name
	Hint        string // a fixed explanation for an operator, e.g. why a server-first connection was denied
}

// Logger writes decision and close lines.
type Logger struct{ l *slog.Logger }

// New wraps l, which should have a JSON handler.
func New(l *slog.Logger) *Logger { return &Logger{l: l} }

// Decision logs the decision line.
func (lg *Logger) Decision(r *Record) {
	level := slog.LevelInfo
	if !r.Action.Proceeds() {
		level = slog.LevelWarn
	}
	if !lg.l.Enabled(context.Background(), level) {
		return
	}
	var buf [maxAttrs]slog.Attr
	lg.l.LogAttrs(context.Background(), level, "decision", r.appendCommon(buf[:0], r.Reason.String())...)
}

// Close logs the close line. Its reason is why the connection ended (closed, idle_timeout,
// drain, ...); the decision's reason is repeated as decision_reason.
func (lg *Logger) Close(r *Record) {
	if !lg.l.Enabled(context.Background(), slog.LevelInfo) {
		return
	}
	var buf [maxAttrs]slog.Attr
	attrs := append(r.appendCommon(buf[:0], r.CloseReason.String()),
		slog.String("decision_reason", r.Reason.String()),
		slog.Int64("bytes_up", r.BytesUp),
		slog.Int64("bytes_down", r.BytesDown),
		slog.Int64("duration_ms", time.Since(r.Start).Milliseconds()),
	)
	lg.l.LogAttrs(context.Background(), slog.LevelInfo, "close", attrs...)
}

// maxAttrs bounds the attributes of one line: the close line with every optional field.
const maxAttrs = 20

// appendCommon appends the attributes both lines share to attrs, which the caller keeps on
// its stack (a line then costs no slice allocation of its own).
func (r *Record) appendCommon(attrs []slog.Attr, reason string) []slog.Attr {
	attrs = append(attrs,
		slog.Uint64("conn", r.ID),
		slog.String("listener", r.Listener),
		slog.String("client", r.Client.String()),
	)
	if r.Method != "" {
		attrs = append(attrs, slog.String("method", r.Method))
	}
	if r.Protocol != "" {
		attrs = append(attrs, slog.String("protocol", r.Protocol))
	}
	attrs = append(attrs,
		slog.String("identity", r.Identity),
		slog.String("target", r.Target),
		slog.String("destination", r.Destination),
		slog.String("action", r.Action.String()),
		slog.String("reason", reason),
		slog.String("status", r.Status.String()),
	)
	if r.SNI != "" {
		attrs = append(attrs, slog.String("sni", r.SNI))
	}
	if r.Request > 0 {
		attrs = append(attrs, slog.Int("request", r.Request))
	}
	if r.ECH {
		attrs = append(attrs, slog.Bool("ech", true))
	}
	if r.Hint != "" {
		attrs = append(attrs, slog.String("hint", r.Hint))
	}
	if r.Upstream.IsValid() {
		attrs = append(attrs, slog.String("upstream", r.Upstream.String()))
	}
	return attrs
}
