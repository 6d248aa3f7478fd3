package e2e

import (
	"bufio"
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/egress-guard/egress-guard/internal/netlab"
)

const gatewayPolicy = `
identities:
  "frontend-services":
    api_keys: ["frontend-pod-1", "frontend-pod-2"]
    allowed_destinations:
      - "api.example.com"
      - "*.cdn.example.com"
      - "portonly.example.com:443"
      - "v6only.example.com"
      - "198.18.1.10:7"
  "v6-team":
    api_keys: ["v6-key"]
    allowed_destinations:
      - "v6only.example.com"
      # The lab's IPv6 hosts are in fd00::/8, which is ULA (internal): a rule must name them.
      - "fd00:18:1::/48"
  "rollout":
    mode: audit
    api_keys: ["audit-key"]
    allowed_destinations: ["api.example.com"]
`

type gateway struct {
	lab     *netlab.Lab
	proc    *netlab.Process
	policy  string
	port    int
	metrics int
}

var gatewayPorts = struct {
	next int
}{next: 14750}

// startGateway runs egress-guard (gateway mode) in the pod namespace with the policy and
// extra environment, and waits until it is ready.
func startGateway(t *testing.T, l *netlab.Lab, policy string, env ...string) *gateway {
	t.Helper()
	bin := binary(t, "./cmd/egress-guard")
	path := filepath.Join(t.TempDir(), "egress-policy.yaml")
	if err := os.WriteFile(path, []byte(policy), 0o644); err != nil {
		t.Fatal(err)
	}
	gatewayPorts.next += 2
	g := &gateway{lab: l, policy: path, port: gatewayPorts.next, metrics: gatewayPorts.next + 1}
	env = append([]string{
		fmt.Sprintf("PROXY_PORT=%d", g.port), fmt.Sprintf("METRICS_PORT=%d", g.metrics),
		"CONFIGMAP_PATH=" + path, "RESOLVER=" + netlab.DNSServer + ":53", "WATCH_INTERVAL=1",
		"LOG_LEVEL=INFO", "PEEK_TIMEOUT=2s", "DIAL_TIMEOUT=3s",
	}, env...)
	p, err := netlab.Start(l.Pod, bin, env, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	g.proc = p
	t.Cleanup(func() {
		p.Stop(10 * time.Second)
		if t.Failed() {
			t.Logf("proxy log tail:\n%s", p.Tail(30))
		}
	})
	if err := netlab.WaitReady(context.Background(), l.Pod, fmt.Sprintf("http://127.0.0.1:%d/ready", g.metrics), p, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	return g
}

// curl runs curl through the gateway inside the pod namespace; it returns curl's exit code,
// the HTTP status it saw (of the response, or of CONNECT), and the body.
func (g *gateway) curl(t *testing.T, user string, url string, extra ...string) (exit, code int, body string) {
	t.Helper()
	args := []string{"curl", "-sS", "--max-time", "8", "-x", fmt.Sprintf("http://127.0.0.1:%d", g.port),
		"--cacert", g.lab.CAFile, "-o", "-", "-w", "\n%{http_code} %{http_connect}"}
	if user != "" {
		args = append(args, "-U", user+":anything")
	}
	args = append(args, extra...)
	args = append(args, url)
	cmd := g.lab.Pod.Command(context.Background(), args...)
	out, err := cmd.CombinedOutput()
	if ee, ok := err.(interface{ ExitCode() int }); ok {
		exit = ee.ExitCode()
	}
	s := string(out)
	i := strings.LastIndex(s, "\n")
	var respCode, connectCode int
	fmt.Sscanf(s[i+1:], "%d %d", &respCode, &connectCode)
	code = respCode
	if code == 0 {
		code = connectCode
	}
	return exit, code, s[:max(i, 0)]
}

func (g *gateway) metric(t *testing.T, series string) float64 {
	return metric(t, g.lab, g.metrics, series)
}

// forbiddenCounters installs DROP rules with packet counters in the pod namespace for the
// internal ranges the tests' names resolve to; a proxy that tried to connect there would
// show up in them.
func forbiddenCounters(t *testing.T, l *netlab.Lab) func() string {
	t.Helper()
	ctx := context.Background()
	for _, cidr := range []string{"169.254.0.0/16", "10.0.0.0/8"} {
		if _, err := l.Pod.Run(ctx, "iptables", "-I", "OUTPUT", "-d", cidr, "-j", "DROP"); err != nil {
			t.Fatal(err)
		}
		c := cidr
		t.Cleanup(func() { l.Pod.Run(ctx, "iptables", "-D", "OUTPUT", "-d", c, "-j", "DROP") })
	}
	return func() string {
		out, err := l.Pod.Run(ctx, "iptables", "-L", "OUTPUT", "-v", "-n", "-x")
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
}

func TestGateway(t *testing.T) {
	l := sharedLab(t)
	counters := forbiddenCounters(t, l)
	g := startGateway(t, l, gatewayPolicy)

	t.Run("original README curl line", func(t *testing.T) {
		before := l.Accepted("198.18.1.10")
		lg := from(g.proc)
		exit, code, body := g.curl(t, "frontend-pod-1", "https://api.example.com")
		if exit != 0 || code != 200 || !strings.Contains(body, "hello from 198.18.1.10 (host api.example.com)") {
			t.Fatalf("curl exit %d code %d body %q", exit, code, body)
		}
		if l.Accepted("198.18.1.10") <= before {
			t.Fatal("the server saw no connection")
		}
		d := lg.decision(t, "listener", "explicit", "method", "CONNECT", "identity", "frontend-services", "target", "api.example.com:443",
			"sni", "api.example.com", "destination", "api.example.com", "action", "allowed", "reason", "rule", "status", "allowed")
		c := lg.closeOf(t, d, "identity", "frontend-services", "decision_reason", "rule", "reason", "closed")
		if up := c["upstream"]; c["bytes_down"].(float64) <= 0 || c["bytes_up"].(float64) <= 0 || (up != "198.18.1.10:443" && up != "[fd00:18:1::10]:443") {
			t.Fatalf("close line %v", c)
		}
		if v := g.metric(t, `egress_proxy_requests_total{destination="api.example.com",identity="frontend-services",status="allowed"}`); v < 1 {
			t.Fatalf("allowed counter = %v", v)
		}
		for _, path := range []string{"/health", "/metrics"} {
			if code, _, err := netlab.HTTPGet(context.Background(), l.Pod, fmt.Sprintf("http://127.0.0.1:%d%s", g.metrics, path)); code != 200 {
				t.Fatalf("GET %s = %d %v", path, code, err)
			}
		}
	})

	t.Run("wildcard allows below the suffix, not the apex", func(t *testing.T) {
		lg := from(g.proc)
		if _, code, body := g.curl(t, "frontend-pod-2", "https://a.cdn.example.com/"); code != 200 || !strings.Contains(body, "198.18.1.11") {
			t.Fatalf("a.cdn.example.com: %d %q", code, body)
		}
		lg.decision(t, "identity", "frontend-services", "target", "a.cdn.example.com:443", "destination", "*.cdn.example.com", "action", "allowed", "reason", "rule")
		before := l.Accepted("198.18.1.12")
		lg = from(g.proc)
		if _, code, _ := g.curl(t, "frontend-pod-2", "https://cdn.example.com/"); code != 403 {
			t.Fatalf("cdn.example.com: %d, want 403", code)
		}
		lg.decision(t, "identity", "frontend-services", "target", "cdn.example.com:443", "destination", "none", "action", "denied", "reason", "no_matching_rule", "status", "denied")
		if l.Accepted("198.18.1.12") != before {
			t.Fatal("denied apex was connected to")
		}
	})

	t.Run("denied host never connected", func(t *testing.T) {
		before := l.Accepted("198.18.1.20")
		lg := from(g.proc)
		if _, code, _ := g.curl(t, "frontend-pod-1", "https://evil.test/"); code != 403 {
			t.Fatalf("evil.test: %d, want 403", code)
		}
		if l.Accepted("198.18.1.20") != before {
			t.Fatal("denied destination was connected to")
		}
		lg.decision(t, "listener", "explicit", "method", "CONNECT", "identity", "frontend-services", "target", "evil.test:443",
			"destination", "none", "action", "denied", "reason", "no_matching_rule", "status", "denied")
		if v := g.metric(t, `egress_proxy_requests_total{destination="none",identity="frontend-services",status="denied"}`); v < 1 {
			t.Fatalf("denied counter = %v", v)
		}
	})

	t.Run("missing and unknown credentials", func(t *testing.T) {
		lg := from(g.proc)
		out, _ := l.Pod.Run(context.Background(), "curl", "-sS", "-i", "--max-time", "5", "-x", fmt.Sprintf("http://127.0.0.1:%d", g.port), "http://api.example.com/")
		if !strings.Contains(out, "407") || !strings.Contains(out, `Proxy-Authenticate: Basic realm="egress-guard"`) {
			t.Fatalf("no credentials:\n%s", out)
		}
		lg.decision(t, "method", "GET", "identity", "none", "target", "api.example.com:80", "action", "denied", "reason", "no_credentials", "status", "auth_required")
		lg = from(g.proc)
		if _, code, _ := g.curl(t, "not-a-key-x9z", "https://api.example.com/"); code != 407 {
			t.Fatalf("unknown key: %d, want 407", code)
		}
		lg.decision(t, "method", "CONNECT", "identity", "unknown", "target", "api.example.com:443", "action", "denied", "reason", "unknown_api_key", "status", "auth_required")
		for _, line := range g.proc.Lines() {
			if strings.Contains(line, "not-a-key-x9z") {
				t.Fatalf("an unknown API key was logged: %s", line)
			}
		}
		if v := g.metric(t, `egress_proxy_requests_total{destination="none",identity="unknown",status="auth_required"}`); v < 1 {
			t.Fatalf("auth_required counter = %v", v)
		}
	})

	t.Run("names resolving to internal addresses are denied before any packet", func(t *testing.T) {
		for _, name := range []string{"meta.cdn.example.com", "rfc1918.cdn.example.com"} {
			lg := from(g.proc)
			if _, code, _ := g.curl(t, "frontend-pod-1", "https://"+name+"/"); code != 403 {
				t.Fatalf("%s: %d, want 403", name, code)
			}
			lg.decision(t, "method", "CONNECT", "identity", "frontend-services", "target", name+":443", "destination", "*.cdn.example.com",
				"action", "denied", "reason", "internal_address", "status", "denied")
		}
		lg := from(g.proc)
		if _, code, _ := g.curl(t, "frontend-pod-1", "http://meta.cdn.example.com/latest/meta-data/"); code != 403 {
			t.Fatalf("plain HTTP to metadata: %d, want 403", code)
		}
		lg.decision(t, "method", "GET", "identity", "frontend-services", "target", "meta.cdn.example.com:80", "destination", "*.cdn.example.com",
			"action", "denied", "reason", "internal_address", "status", "denied")
		out := counters()
		for _, cidr := range []string{"169.254.0.0/16", "10.0.0.0/8"} {
			found := false
			for _, line := range strings.Split(out, "\n") {
				f := strings.Fields(line)
				if len(f) >= 9 && f[2] == "DROP" && f[8] == cidr {
					found = true
					if f[0] != "0" {
						t.Fatalf("%s packets were sent towards %s:\n%s", f[0], cidr, out)
					}
				}
			}
			if !found {
				t.Fatalf("counter rule for %s missing:\n%s", cidr, out)
			}
		}
	})

	t.Run("SNI must match the CONNECT host", func(t *testing.T) {
		apiBefore, evilBefore := l.Accepted("198.18.1.10"), l.Accepted("198.18.1.20")
		lg := from(g.proc)
		exit, _, body := g.curl(t, "frontend-pod-1", "https://evil.test/", "--connect-to", "evil.test:443:api.example.com:443")
		if exit == 0 {
			t.Fatalf("mismatched SNI got through: %q", body)
		}
		if strings.Contains(body, "HTTP/1.1 403") {
			t.Fatal("HTTP text was written into the TLS stream")
		}
		lg.decision(t, "method", "CONNECT", "identity", "frontend-services", "target", "api.example.com:443", "sni", "evil.test",
			"action", "denied", "reason", "sni_mismatch", "status", "sni_mismatch")
		if l.Accepted("198.18.1.10") != apiBefore || l.Accepted("198.18.1.20") != evilBefore {
			t.Fatal("an upstream was connected for a mismatched SNI")
		}
		if v := g.metric(t, `egress_proxy_requests_total{destination="api.example.com",identity="frontend-services",status="sni_mismatch"}`); v < 1 {
			t.Fatalf("sni_mismatch counter = %v", v)
		}
	})

	t.Run("plain HTTP forwarding", func(t *testing.T) {
		lg := from(g.proc)
		if _, code, body := g.curl(t, "frontend-pod-1", "http://api.example.com/x"); code != 200 || !strings.Contains(body, "hello from 198.18.1.10 (host api.example.com)") {
			t.Fatalf("plain HTTP: %d %q", code, body)
		}
		d := lg.decision(t, "listener", "explicit", "method", "GET", "identity", "frontend-services", "target", "api.example.com:80",
			"destination", "api.example.com", "action", "allowed", "reason", "rule", "status", "allowed")
		lg.closeOf(t, d, "method", "GET", "reason", "closed", "upstream", "198.18.1.10:80")
		lg = from(g.proc)
		if _, code, _ := g.curl(t, "frontend-pod-1", "http://evil.test/"); code != 403 {
			t.Fatalf("plain HTTP denied host: %d", code)
		}
		lg.decision(t, "method", "GET", "identity", "frontend-services", "target", "evil.test:80", "destination", "none",
			"action", "denied", "reason", "no_matching_rule", "status", "denied")
	})

	t.Run("port restriction", func(t *testing.T) {
		lg := from(g.proc)
		if _, code, _ := g.curl(t, "frontend-pod-1", "https://portonly.example.com/"); code != 200 {
			t.Fatalf("portonly:443: %d", code)
		}
		lg.decision(t, "target", "portonly.example.com:443", "destination", "portonly.example.com:443", "action", "allowed", "reason", "rule")
		lg = from(g.proc)
		if _, code, _ := g.curl(t, "frontend-pod-1", "https://portonly.example.com:8443/"); code != 403 {
			t.Fatalf("portonly:8443: %d, want 403", code)
		}
		lg.decision(t, "target", "portonly.example.com:8443", "destination", "none", "action", "denied", "reason", "no_matching_rule")
	})

	t.Run("audit mode allows and records", func(t *testing.T) {
		lg := from(g.proc)
		if _, code, body := g.curl(t, "audit-key", "https://a.cdn.example.com/"); code != 200 || !strings.Contains(body, "198.18.1.11") {
			t.Fatalf("audit: %d %q", code, body)
		}
		lg.decision(t, "identity", "rollout", "target", "a.cdn.example.com:443", "destination", "none", "action", "audit", "reason", "no_matching_rule")
		if v := g.metric(t, `egress_proxy_audit_would_deny_total{identity="rollout",reason="no_matching_rule"}`); v < 1 {
			t.Fatalf("audit counter = %v", v)
		}
		// Audit never opens internal addresses.
		lg = from(g.proc)
		if _, code, _ := g.curl(t, "audit-key", "https://meta.cdn.example.com/"); code != 403 {
			t.Fatalf("audit to metadata: %d, want 403", code)
		}
		lg.decision(t, "identity", "rollout", "target", "meta.cdn.example.com:443", "action", "denied", "reason", "internal_address")
	})

	t.Run("IPv6 destination", func(t *testing.T) {
		// frontend-services allows the name but no rule names its ULA address.
		lg := from(g.proc)
		if _, code, _ := g.curl(t, "frontend-pod-1", "https://v6only.example.com/"); code != 403 {
			t.Fatalf("v6only without a rule naming fd00::/8: %d, want 403", code)
		}
		lg.decision(t, "identity", "frontend-services", "target", "v6only.example.com:443", "destination", "v6only.example.com",
			"action", "denied", "reason", "internal_address", "status", "denied")
		lg = from(g.proc)
		if _, code, body := g.curl(t, "v6-key", "https://v6only.example.com/"); code != 200 || !strings.Contains(body, "fd00:18:1::14") {
			t.Fatalf("v6only: %d %q", code, body)
		}
		d := lg.decision(t, "identity", "v6-team", "target", "v6only.example.com:443", "destination", "v6only.example.com",
			"action", "allowed", "reason", "rule", "status", "allowed")
		lg.closeOf(t, d, "identity", "v6-team", "upstream", "[fd00:18:1::14]:443", "reason", "closed")
	})

	t.Run("malformed requests get a status and the proxy keeps serving", func(t *testing.T) {
		for _, tc := range []struct {
			raw    string
			want   string
			reason string
		}{
			{"GARBAGE\r\n\r\n", "400", "malformed_request"},
			{"CONNECT api.example.com HTTP/1.1\r\nHost: x\r\n\r\n", "400", "malformed_request"},
			{"GET http://api.example.com/ HTTP/1.1\r\nX: " + strings.Repeat("a", 40000) + "\r\n\r\n", "431", "header_too_large"},
		} {
			lg := from(g.proc)
			c, err := l.Pod.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", g.port), 2*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			c.SetDeadline(time.Now().Add(5 * time.Second))
			io.WriteString(c, tc.raw)
			line, _ := bufio.NewReader(c).ReadString('\n')
			c.Close()
			if !strings.Contains(line, " "+tc.want+" ") {
				t.Fatalf("%.30q: status line %q, want %s", tc.raw, line, tc.want)
			}
			lg.decision(t, "listener", "explicit", "identity", "none", "target", "", "destination", "none",
				"action", "denied", "reason", tc.reason, "status", "bad_request")
		}
		if _, code, _ := g.curl(t, "frontend-pod-1", "https://api.example.com/"); code != 200 {
			t.Fatalf("after malformed input: %d", code)
		}
	})
}

func TestGatewayReloadKeepsLastGoodPolicy(t *testing.T) {
	l := sharedLab(t)
	g := startGateway(t, l, gatewayPolicy)
	errors0 := g.metric(t, "egress_proxy_config_load_errors_total")
	reloads0 := g.metric(t, "egress_proxy_config_reloads_total")

	bad := strings.Replace(gatewayPolicy, `"*.cdn.example.com"`, `"*"`, 1)
	lg := from(g.proc)
	if err := os.WriteFile(g.policy, []byte(bad), 0o644); err != nil {
		t.Fatal(err)
	}
	waitMetric(t, l, g.metrics, "egress_proxy_config_load_errors_total", errors0+1)
	if _, err := g.proc.WaitRecordAfter(lg.mark, "policy rejected; keeping the last good policy", 5*time.Second, func(m map[string]any) bool {
		return strings.Contains(fmt.Sprint(m["err"]), "egress-policy.yaml:7:") && strings.Contains(fmt.Sprint(m["err"]), "bare wildcard")
	}); err != nil {
		t.Fatal(err)
	}
	lg = from(g.proc)
	if _, code, _ := g.curl(t, "frontend-pod-1", "https://api.example.com/"); code != 200 {
		t.Fatalf("old policy not kept: %d", code)
	}
	lg.decision(t, "identity", "frontend-services", "target", "api.example.com:443", "destination", "api.example.com", "action", "allowed", "reason", "rule")
	if v := g.metric(t, "egress_proxy_config_last_reload_successful"); v != 0 {
		t.Fatalf("last_reload_successful = %v after a bad file", v)
	}

	good := strings.Replace(gatewayPolicy, `- "api.example.com"`, `- "portonly.example.com"`, 1)
	if err := os.WriteFile(g.policy, []byte(good), 0o644); err != nil {
		t.Fatal(err)
	}
	waitMetric(t, l, g.metrics, "egress_proxy_config_reloads_total", reloads0+1)
	lg = from(g.proc)
	if _, code, _ := g.curl(t, "frontend-pod-1", "https://api.example.com/"); code != 403 {
		t.Fatalf("new policy not active: %d, want 403", code)
	}
	lg.decision(t, "identity", "frontend-services", "target", "api.example.com:443", "destination", "none", "action", "denied", "reason", "no_matching_rule")
}

func TestGatewayDrainWithLiveTunnel(t *testing.T) {
	l := sharedLab(t)
	g := startGateway(t, l, gatewayPolicy, "DRAIN_TIMEOUT=3s", "DRAIN_IDLE_TIMEOUT=30s")

	lg := from(g.proc)
	c, err := l.Pod.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", g.port), 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	fmt.Fprintf(c, "CONNECT 198.18.1.10:7 HTTP/1.1\r\nHost: 198.18.1.10:7\r\nProxy-Authorization: Basic %s\r\n\r\n", basicAuth("frontend-pod-1"))
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("CONNECT: %v %v", resp, err)
	}
	echo := func() error {
		if _, err := io.WriteString(c, "x"); err != nil {
			return err
		}
		b := make([]byte, 1)
		_, err := io.ReadFull(br, b)
		return err
	}
	if err := echo(); err != nil {
		t.Fatal(err)
	}
	d := lg.decision(t, "method", "CONNECT", "identity", "frontend-services", "target", "198.18.1.10:7", "destination", "198.18.1.10:7",
		"action", "allowed", "reason", "rule")

	start := time.Now()
	if err := g.proc.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	// Not ready at once; new connections refused; the live tunnel still works.
	deadline := time.Now().Add(2 * time.Second)
	for {
		code, _, _ := netlab.HTTPGet(context.Background(), l.Pod, fmt.Sprintf("http://127.0.0.1:%d/ready", g.metrics))
		if code == 503 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/ready = %d while draining, want 503", code)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if _, err := l.Pod.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", g.port), time.Second); err == nil {
		t.Fatal("new connection accepted while draining")
	}
	if err := echo(); err != nil {
		t.Fatalf("live tunnel broken during drain: %v", err)
	}
	// At the drain budget the tunnel is closed and the process exits 0.
	b := make([]byte, 1)
	if _, err := br.Read(b); err == nil {
		t.Fatal("tunnel still open after the drain budget")
	}
	if el := time.Since(start); el < 2*time.Second || el > 8*time.Second {
		t.Fatalf("tunnel closed after %v, want about DRAIN_TIMEOUT=3s", el)
	}
	exited, err := g.proc.Wait(5 * time.Second)
	if !exited || err != nil {
		t.Fatalf("exit after drain: exited=%v err=%v", exited, err)
	}
	lg.closeOf(t, d, "upstream", "198.18.1.10:7", "decision_reason", "rule", "reason", "drain")
}

func basicAuth(key string) string {
	return base64.StdEncoding.EncodeToString([]byte(key + ":anything"))
}
