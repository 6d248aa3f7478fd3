// Package outcome is egress-guard's vocabulary for what happened to a connection: the action
// taken, the reason for the decision, the status counted in egress_proxy_requests_total, and
// why the connection ended. Logs, metrics and HTTP answers all spell these through String, so
// the same event reads the same everywhere, and the typed constants keep the four
// vocabularies from being mixed up (a close reason cannot land in a decision field).
package outcome

// Action is what the proxy did with a connection.
type Action uint8

// Actions.
const (
	Allowed Action = iota + 1
	Denied         // refused by policy, authentication, or a malformed or unserviceable request
	Audit          // allowed only because the identity is in audit mode
	Failed         // allowed by policy, but the destination could not be resolved
)

var actionNames = [...]string{"", "allowed", "denied", "audit", "failed"}

func (a Action) String() string {
	if int(a) < len(actionNames) && a != 0 {
		return actionNames[a]
	}
	return "unknown"
}

// Proceeds reports whether a connection with this action is dialed.
func (a Action) Proceeds() bool { return a == Allowed || a == Audit }

// Reason is why the decision came out as it did.
type Reason uint8

// Decision reasons.
const (
	Rule                  Reason = iota + 1 // a rule of the identity allows it
	NoMatchingRule                          // no rule of the identity names the destination
	InternalAddress                         // it resolves only to addresses the identity may not reach
	NoCredentials                           // no or unusable Proxy-Authorization
	UnknownAPIKey                           // an API key no identity has
	UnknownIdentity                         // the configured identity is not in the policy
	NoOriginalDst                           // the kernel could not say where a captured connection went
	ProxyLoop                               // a captured connection addressed to the proxy itself
	NoPolicy                                // no policy is loaded yet
	NoSuchHost                              // the name does not exist
	ResolveFailed                           // resolution failed for another reason (timeout, SERVFAIL)
	MalformedRequest                        // the request could not be parsed or names no valid target
	HeaderTooLarge                          // the request head exceeds the bound
	TunnelLimit                             // the concurrent connection cap is reached
	Draining                                // the proxy is shutting down
	SNIMismatch                             // the ClientHello names another host than CONNECT did
	SNIMissing                              // the ClientHello names no host
	NoClientHello                           // a TLS port's tunnel did not start with a ClientHello
	ECHNotAllowed                           // the ClientHello uses ECH and no rule opts in (ECH=deny)
	PendingLimit                            // too many connections have not yet been decided
	ClientLimit                             // this client address holds too many undecided connections
	IdentityLimit                           // this identity holds its maximum of open connections
	InvalidToken                            // a ServiceAccount token the API server did not authenticate
	UnknownServiceAccount                   // a valid ServiceAccount token that no identity selects
	AuthUnavailable                         // the token could not be verified now (API server unreachable)
	numReasons
)

var reasonNames = [numReasons]string{"", "rule", "no_matching_rule", "internal_address", "no_credentials",
	"unknown_api_key", "unknown_identity", "no_original_destination", "proxy_loop", "no_policy",
	"no_such_host", "resolve_failed", "malformed_request", "header_too_large", "tunnel_limit",
	"draining", "sni_mismatch", "sni_missing", "no_client_hello", "ech_not_allowed", "pending_limit",
	"client_limit", "identity_limit", "invalid_token", "unknown_service_account", "auth_unavailable"}

func (r Reason) String() string {
	if r > 0 && r < numReasons {
		return reasonNames[r]
	}
	return "unknown"
}

// Status is the status label of egress_proxy_requests_total (the original's words).
type Status uint8

// Statuses.
const (
	StatusAllowed Status = iota + 1
	StatusDenied
	StatusAuthRequired
	StatusBadRequest
	StatusConnectionFailed
	StatusSNIMismatch
)

var statusNames = [...]string{"", "allowed", "denied", "auth_required", "bad_request", "connection_failed", "sni_mismatch"}

func (s Status) String() string {
	if int(s) < len(statusNames) && s != 0 {
		return statusNames[s]
	}
	return "unknown"
}

// StatusOf is the request status a decision is counted with, derived from the reason alone so
// that one event is always counted the same way.
func StatusOf(r Reason) Status {
	switch r {
	case Rule:
		return StatusAllowed
	case NoCredentials, UnknownAPIKey, InvalidToken, UnknownServiceAccount, AuthUnavailable:
		return StatusAuthRequired
	case MalformedRequest, HeaderTooLarge, NoOriginalDst, ProxyLoop:
		return StatusBadRequest
	case NoSuchHost, ResolveFailed:
		return StatusConnectionFailed
	case SNIMismatch, SNIMissing, NoClientHello, ECHNotAllowed:
		return StatusSNIMismatch
	}
	return StatusDenied
}

// ActionOf is the action for a reason when the identity enforces its policy. Audit mode turns
// NoMatchingRule (and the SNI checks) into Audit; nothing else is relaxed.
func ActionOf(r Reason) Action {
	switch r {
	case Rule:
		return Allowed
	case NoSuchHost, ResolveFailed:
		return Failed
	}
	return Denied
}

// CloseReason is why a connection ended.
type CloseReason uint8

// Close reasons.
const (
	Closed        CloseReason = iota + 1 // both sides finished normally
	Reset                                // a side failed or reset the connection
	IdleTimeout                          // no byte moved for the idle timeout
	Drain                                // closed by shutdown at the end of the drain budget
	Refused                              // the proxy refused it before any upstream connection (see the decision)
	DialFailed                           // the upstream refused or was unreachable
	DialTimeout                          // the upstream did not answer in time
	UpstreamError                        // the upstream's HTTP response was missing or malformed
	PolicyRevoked                        // a new policy no longer allows it
	numCloseReasons
)

var closeNames = [numCloseReasons]string{"", "closed", "reset", "idle_timeout", "drain", "refused",
	"dial_failed", "dial_timeout", "upstream_error", "policy_revoked"}

func (c CloseReason) String() string {
	if c > 0 && c < numCloseReasons {
		return closeNames[c]
	}
	return "unknown"
}

// Closes lists every close reason (for tests and metric initialisation).
func Closes() []CloseReason {
	out := make([]CloseReason, 0, numCloseReasons-1)
	for c := Closed; c < numCloseReasons; c++ {
		out = append(out, c)
	}
	return out
}

// Reasons lists every decision reason.
func Reasons() []Reason {
	out := make([]Reason, 0, numReasons-1)
	for r := Rule; r < numReasons; r++ {
		out = append(out, r)
	}
	return out
}
