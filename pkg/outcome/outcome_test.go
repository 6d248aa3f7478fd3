package outcome

import "testing"

func TestEveryValueHasAName(t *testing.T) {
	seen := map[string]bool{}
	for _, r := range Reasons() {
		n := r.String()
		if n == "" || n == "unknown" || seen[n] {
			t.Errorf("reason %d: name %q missing or repeated", r, n)
		}
		seen[n] = true
	}
	seen = map[string]bool{}
	for _, c := range Closes() {
		n := c.String()
		if n == "" || n == "unknown" || seen[n] {
			t.Errorf("close reason %d: name %q missing or repeated", c, n)
		}
		seen[n] = true
	}
	if Reason(0).String() != "unknown" || CloseReason(200).String() != "unknown" || Action(9).String() != "unknown" || Status(0).String() != "unknown" {
		t.Fatal("out-of-range values must not look valid")
	}
}

func TestStatusAndActionFollowTheReason(t *testing.T) {
	cases := []struct {
		r      Reason
		status string
		action string
	}{
		{Rule, "allowed", "allowed"},
		{NoMatchingRule, "denied", "denied"},
		{InternalAddress, "denied", "denied"},
		{NoCredentials, "auth_required", "denied"},
		{UnknownAPIKey, "auth_required", "denied"},
		{MalformedRequest, "bad_request", "denied"},
		{HeaderTooLarge, "bad_request", "denied"},
		{NoSuchHost, "connection_failed", "failed"},
		{ResolveFailed, "connection_failed", "failed"},
		{SNIMismatch, "sni_mismatch", "denied"},
		{NoClientHello, "sni_mismatch", "denied"},
		{TunnelLimit, "denied", "denied"},
		{Draining, "denied", "denied"},
		{NoPolicy, "denied", "denied"},
	}
	for _, c := range cases {
		if got := StatusOf(c.r).String(); got != c.status {
			t.Errorf("StatusOf(%s) = %s, want %s", c.r, got, c.status)
		}
		if got := ActionOf(c.r).String(); got != c.action {
			t.Errorf("ActionOf(%s) = %s, want %s", c.r, got, c.action)
		}
	}
	if Denied.Proceeds() || Failed.Proceeds() || !Allowed.Proceeds() || !Audit.Proceeds() {
		t.Fatal("Proceeds")
	}
}
