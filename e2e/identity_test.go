package e2e

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/egress-guard/egress-guard/internal/kubelab"
	"github.com/egress-guard/egress-guard/internal/netlab"
	"github.com/egress-guard/egress-guard/pkg/contract"
)

const identityPolicy = `
identities:
  shop:
    api_keys: ["shop-gateway-key"]
    service_accounts: ["shop/frontend"]
    allowed_destinations: ["api.example.com", "127.0.0.0/8"]
  other:
    api_keys: ["other-key"]
    allowed_destinations: ["evil.test"]
`

// k8sEnv is a real API server with the objects the identity tests need, and a credential for
// the control plane and the gateway that may only create TokenReviews.
type k8sEnv struct {
	cl         *kubelab.Cluster
	kubeconfig string // the reviewer's kubeconfig (tokenreviews: create, nothing else)
	reviewTok  string // the same credential as a bare token file's content
	caFile     string
	saUID      string // shop/frontend's uid
}

func startK8s(t testing.TB) *k8sEnv {
	t.Helper()
	binDir := kubelab.Require(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cl, err := kubelab.Start(ctx, kubelab.Options{BinDir: binDir})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Stop)
	e := &k8sEnv{cl: cl}
	for _, ns := range []string{"shop", "other", "egress-guard"} {
		if _, err := cl.CreateNamespace(ns); err != nil {
			t.Fatal(err)
		}
	}
	sa, err := cl.CreateServiceAccount("shop", "frontend")
	if err != nil {
		t.Fatal(err)
	}
	e.saUID = string(sa.UID)
	for _, x := range [][2]string{{"other", "x"}, {"egress-guard", "reviewer"}} {
		if _, err := cl.CreateServiceAccount(x[0], x[1]); err != nil {
			t.Fatal(err)
		}
	}
	for _, name := range []string{"app", "gone"} {
		if _, err := cl.CreatePod("shop", name, "frontend"); err != nil {
			t.Fatal(err)
		}
	}
	// RBAC: the chart's ClusterRole for the control plane is exactly this (TokenReviews for
	// the policy endpoint, namespaces' labels for the webhook).
	c := cl.Client()
	if _, err := c.RbacV1().ClusterRoles().Create(ctx, &rbacv1.ClusterRole{
		ObjectMeta: metav1.ObjectMeta{Name: "egress-guard-tokenreview"},
		Rules: []rbacv1.PolicyRule{
			{APIGroups: []string{"authentication.k8s.io"}, Resources: []string{"tokenreviews"}, Verbs: []string{"create"}},
			{APIGroups: []string{""}, Resources: []string{"namespaces"}, Verbs: []string{"get"}},
		},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "egress-guard-tokenreview"},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "egress-guard-tokenreview"},
		Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Namespace: "egress-guard", Name: "reviewer"}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	e.reviewTok, err = cl.Token("egress-guard", "reviewer", "", time.Hour, "")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	e.caFile = filepath.Join(dir, "ca.crt")
	os.WriteFile(e.caFile, cl.CAPEM(), 0o644)
	e.kubeconfig = filepath.Join(dir, "reviewer.kubeconfig")
	kc := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters: [{name: lab, cluster: {server: %q, certificate-authority-data: %q}}]
users: [{name: reviewer, user: {token: %q}}]
contexts: [{name: lab, context: {cluster: lab, user: reviewer}}]
current-context: lab
`, cl.URL(), base64.StdEncoding.EncodeToString(cl.CAPEM()), e.reviewTok)
	if err := os.WriteFile(e.kubeconfig, []byte(kc), 0o600); err != nil {
		t.Fatal(err)
	}
	return e
}

func (e *k8sEnv) token(t testing.TB, ns, sa, audience, pod string) string {
	t.Helper()
	tok, err := e.cl.Token(ns, sa, audience, time.Hour, pod)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// controlPlaneProc is egress-guard-controller on the host, beside the API server, reachable
// from the pod over the host link.
type controlPlaneProc struct {
	env                       []string
	addr, policy, caFile, url string
	metrics                   int
	nofile                    int // when not 0, the process's descriptor limit (prlimit)
	proc                      *netlab.Process
}

func startControlPlane(t testing.TB, e *k8sEnv, ca *netlab.CA, caFile, hostIP string, extraEnv ...string) *controlPlaneProc {
	t.Helper()
	cp := newControlPlane(t, e, ca, caFile, hostIP, extraEnv...)
	cp.start(t)
	return cp
}

// newControlPlane prepares the control plane's certificate, policy and environment.
func newControlPlane(t testing.TB, e *k8sEnv, ca *netlab.CA, caFile, hostIP string, extraEnv ...string) *controlPlaneProc {
	t.Helper()
	dir := t.TempDir()
	cert, err := ca.Issue(hostIP)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	if err := netlab.WriteKeyPair(cert, certFile, keyFile); err != nil {
		t.Fatal(err)
	}
	cp := &controlPlaneProc{policy: filepath.Join(dir, "policy.yaml"), caFile: caFile, metrics: 19391}
	if err := os.WriteFile(cp.policy, []byte(identityPolicy), 0o644); err != nil {
		t.Fatal(err)
	}
	cp.addr = fmt.Sprintf("%s:%d", hostIP, 19443)
	cp.url = "https://" + cp.addr
	cp.env = []string{"LISTEN_ADDR=" + hostIP, "PORT=19443", fmt.Sprintf("METRICS_PORT=%d", cp.metrics),
		"TLS_CERT_FILE=" + certFile, "TLS_KEY_FILE=" + keyFile, "CONFIGMAP_PATH=" + cp.policy,
		"WATCH_INTERVAL=200ms", "KUBECONFIG=" + e.kubeconfig, "MAX_WAIT=30s"}
	cp.env = append(cp.env, extraEnv...)
	return cp
}

func (cp *controlPlaneProc) start(t testing.TB) {
	t.Helper()
	bin, args := binary(t, "./cmd/egress-guard-controller"), []string(nil)
	if cp.nofile > 0 {
		// prlimit execs the controller: the process keeps its PID.
		bin, args = "prlimit", []string{fmt.Sprintf("--nofile=%d:%d", cp.nofile, cp.nofile), "--", bin}
	}
	p, err := netlab.StartHost(bin, cp.env, args...)
	if err != nil {
		t.Fatal(err)
	}
	cp.proc = p
	t.Cleanup(func() {
		p.Stop(5 * time.Second)
		if t.Failed() {
			t.Logf("controller log tail:\n%s", p.Tail(30))
		}
	})
	deadline := time.Now().Add(15 * time.Second)
	for {
		resp, err := http.Get(fmt.Sprintf("http://%s:%d/ready", strings.Split(cp.addr, ":")[0], cp.metrics))
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return
			}
		}
		if time.Now().After(deadline) || p.Exited() {
			t.Fatalf("control plane not ready: %v\n%s", err, p.Tail(20))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// ask is one policy request to the control plane, as a sidecar makes it.
func (cp *controlPlaneProc) ask(t testing.TB, token string) (int, string, http.Header) {
	t.Helper()
	pem, _ := os.ReadFile(cp.caFile)
	pool := certPool(t, pem)
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	req, _ := http.NewRequest("GET", cp.url+contract.PolicyPath, nil)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), resp.Header
}

// The whole identity path against a real API server: tokens accepted and refused by the
// control plane, a sidecar in a captured pod that gets its identity and policy from it with
// its projected token, an edit that reaches it within about a second, an outage it rides out
// on its last good policy, and the resync when the control plane is back.
func TestIdentityFromTheControlPlane(t *testing.T) {
	e := startK8s(t)
	var cp *controlPlaneProc
	var tokenFile string
	p := startPodWith(t, "ei", func(dir string) []string {
		tokenFile = filepath.Join(dir, "token")
		if err := os.WriteFile(tokenFile, []byte(e.token(t, "shop", "frontend", contract.TokenAudience, "app")), 0o644); err != nil {
			t.Fatal(err)
		}
		return []string{contract.EnvControlPlane + "=" + cp.url, contract.EnvControlCA + "=" + cp.caFile, contract.EnvTokenPath + "=" + tokenFile}
	}, func(l *netlab.Lab) {
		hostIP, _, err := l.LinkHost()
		if err != nil {
			t.Fatal(err)
		}
		cp = startControlPlane(t, e, l.CA, l.CAFile, hostIP)
	})
	l := p.lab

	t.Run("tokens the control plane accepts and refuses", func(t *testing.T) {
		code, body, hdr := cp.ask(t, e.token(t, "shop", "frontend", contract.TokenAudience, "app"))
		if code != 200 || hdr.Get(contract.IdentityHeader) != "shop" {
			t.Fatalf("right audience: %d %s", code, body)
		}
		for _, leak := range []string{"shop-gateway-key", "other-key", "evil.test"} {
			if strings.Contains(body, leak) {
				t.Fatalf("the served policy leaks %q: %s", leak, body)
			}
		}
		gone := e.token(t, "shop", "frontend", contract.TokenAudience, "gone")
		if err := e.cl.DeletePod("shop", "gone"); err != nil {
			t.Fatal(err)
		}
		now := time.Now()
		expired, err := e.cl.SignServiceAccountToken("shop", "frontend", e.saUID, contract.TokenAudience, now.Add(-2*time.Hour), now.Add(-time.Hour))
		if err != nil {
			t.Fatal(err)
		}
		// The same forged claims, still valid, are accepted: the expiry is what refuses the other.
		valid, _ := e.cl.SignServiceAccountToken("shop", "frontend", e.saUID, contract.TokenAudience, now.Add(-time.Minute), now.Add(time.Hour))
		if code, body, _ := cp.ask(t, valid); code != 200 {
			t.Fatalf("a valid token signed like the expired one: %d %s", code, body)
		}
		for _, c := range []struct {
			name, token string
			code        int
			reason      string
		}{
			{"wrong audience", e.token(t, "shop", "frontend", "some-other-service", "app"), 401, "invalid"},
			{"expired", expired, 401, "invalid"},
			{"bound to a deleted pod", gone, 401, "invalid"},
			{"garbage", "garbage", 401, "malformed"},
			{"no token", "", 401, "missing_token"},
			{"a ServiceAccount no identity selects", e.token(t, "other", "x", contract.TokenAudience, ""), 403, "unmapped_service_account"},
		} {
			code, body, _ := cp.ask(t, c.token)
			if code != c.code || !strings.Contains(body, "("+c.reason+")") {
				t.Errorf("%s: %d %q, want %d (%s)", c.name, code, body, c.code, c.reason)
			}
		}
	})

	t.Run("the sidecar enforces the identity the control plane answered", func(t *testing.T) {
		lg := from(p.side)
		exit, body := p.app(t, appUID, "https://api.example.com/")
		if exit != 0 || !strings.Contains(body, "hello from 198.18.1.10") {
			t.Fatalf("allowed: exit %d %s", exit, body)
		}
		lg.decision(t, "listener", "transparent", "identity", "shop", "target", "api.example.com:443", "action", "allowed", "reason", "rule")
		lg = from(p.side)
		if exit, body := p.app(t, appUID, "https://a.cdn.example.com/"); exit == 0 {
			t.Fatalf("not in shop's rules, yet answered: %s", body)
		}
		lg.decision(t, "identity", "shop", "target", "a.cdn.example.com:443", "action", "denied", "reason", "no_matching_rule")
	})

	t.Run("a policy edit reaches the sidecar within about a second", func(t *testing.T) {
		lg := from(p.side)
		edited := strings.Replace(identityPolicy, `["api.example.com", "127.0.0.0/8"]`, `["api.example.com", "127.0.0.0/8", "*.cdn.example.com"]`, 1)
		start := time.Now()
		if err := os.WriteFile(cp.policy, []byte(edited), 0o644); err != nil {
			t.Fatal(err)
		}
		lg.wait(t, "policy received from the control plane", "identity", "shop")
		took := time.Since(start)
		t.Logf("policy edit to sidecar: %v (watch interval 200ms, settle 250ms)", took)
		if took > 1500*time.Millisecond {
			t.Fatalf("the edit took %v to reach the sidecar", took)
		}
		if exit, body := p.app(t, appUID, "https://a.cdn.example.com/"); exit != 0 || !strings.Contains(body, "hello from 198.18.1.11") {
			t.Fatalf("after the edit: exit %d %s", exit, body)
		}
	})

	t.Run("a control-plane outage keeps the last good policy; it resyncs when back", func(t *testing.T) {
		lg := from(p.side)
		cp.proc.Stop(5 * time.Second)
		lg.wait(t, "control plane unreachable; enforcing the last good policy")
		if exit, body := p.app(t, appUID, "https://a.cdn.example.com/"); exit != 0 {
			t.Fatalf("during the outage the last good policy was not enforced: exit %d %s", exit, body)
		}
		code, body, err := netlab.HTTPGet(context.Background(), l.Pod, fmt.Sprintf("http://127.0.0.1:%d/ready", contract.AdminPort))
		if err != nil || code != 200 || !strings.Contains(body, "control plane unreachable since") {
			t.Fatalf("/ready during the outage: %d %q %v", code, body, err)
		}
		if v := metric(t, l, contract.AdminPort, "egress_proxy_control_plane_up"); v != 0 {
			t.Fatalf("control_plane_up = %v during the outage", v)
		}
		// Edited while down: the sidecar gets it once the control plane is back.
		if err := os.WriteFile(cp.policy, []byte(identityPolicy), 0o644); err != nil {
			t.Fatal(err)
		}
		lg = from(p.side)
		cp.start(t)
		lg.wait(t, "control plane reachable")
		lg.wait(t, "policy received from the control plane", "identity", "shop")
		if exit, _ := p.app(t, appUID, "https://a.cdn.example.com/"); exit == 0 {
			t.Fatal("the rule removed during the outage still allows after the resync")
		}
		if v := metric(t, l, contract.AdminPort, "egress_proxy_control_plane_up"); v != 1 {
			t.Fatalf("control_plane_up = %v after the resync", v)
		}
	})

	t.Run("the gateway accepts ServiceAccount tokens and refuses bad ones", func(t *testing.T) {
		testGatewayTokens(t, e)
	})
}

// testGatewayTokens runs a gateway on the host's loopback that verifies tokens with the real
// API server, and curl through it: Bearer and Basic-with-token accepted, bad tokens refused.
func testGatewayTokens(t *testing.T, e *k8sEnv) {
	dir, err := os.MkdirTemp("", "egress-guard-gw-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	policy, cred := filepath.Join(dir, "policy.yaml"), filepath.Join(dir, "reviewer-token")
	os.WriteFile(policy, []byte(identityPolicy), 0o644)
	os.WriteFile(cred, []byte(e.reviewTok), 0o600)
	up := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "upstream ok") }))
	t.Cleanup(up.Close)
	gw, err := netlab.StartHost(binary(t, "./cmd/egress-guard"), []string{
		"PROXY_PORT=19750", "METRICS_PORT=19790", "LISTEN_ADDR=127.0.0.1", "CONFIGMAP_PATH=" + policy,
		"TOKEN_AUTH=on", "KUBE_API_URL=" + e.cl.URL(), "KUBE_TOKEN_PATH=" + cred, "KUBE_CA_PATH=" + e.caFile,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		gw.Stop(5 * time.Second)
		if t.Failed() {
			t.Logf("gateway log tail:\n%s", gw.Tail(20))
		}
	})
	if err := waitHostReady("http://127.0.0.1:19790/ready", gw); err != nil {
		t.Fatal(err)
	}
	good := e.token(t, "shop", "frontend", contract.TokenAudience, "app")
	curl := func(args ...string) (int, string) {
		out, _ := exec.Command("curl", append([]string{"-sk", "--max-time", "8", "-x", "http://127.0.0.1:19750",
			"-o", "-", "-w", "\n%{http_connect}"}, append(args, up.URL+"/")...)...).CombinedOutput()
		s := string(out)
		i := strings.LastIndex(s, "\n")
		var code int
		fmt.Sscanf(s[i+1:], "%d", &code)
		return code, s[:max(i, 0)]
	}
	for _, c := range []struct {
		name   string
		args   []string
		code   int
		reason string
	}{
		{"Bearer", []string{"--proxy-header", "Proxy-Authorization: Bearer " + good}, 200, "rule"},
		{"Basic with the token as password", []string{"-U", "token:" + good}, 200, "rule"},
		{"wrong audience", []string{"--proxy-header", "Proxy-Authorization: Bearer " + e.token(t, "shop", "frontend", "other", "app")}, 407, "invalid_token"},
		{"unmapped ServiceAccount", []string{"-U", "token:" + e.token(t, "other", "x", contract.TokenAudience, "")}, 407, "unknown_service_account"},
		{"garbage", []string{"--proxy-header", "Proxy-Authorization: Bearer abc.def.ghi"}, 407, "invalid_token"},
	} {
		lg := from(gw)
		code, body := curl(c.args...)
		if code != c.code || (c.code == 200 && !strings.Contains(body, "upstream ok")) {
			t.Errorf("%s: CONNECT %d, want %d (%s)", c.name, code, c.code, body)
			continue
		}
		identity := "shop"
		if c.code != 200 {
			identity = "unknown"
		}
		lg.decision(t, "target", strings.TrimPrefix(up.URL, "https://"), "identity", identity, "reason", c.reason,
			"action", map[bool]string{true: "allowed", false: "denied"}[c.code == 200])
	}
	if strings.Contains(strings.Join(gw.Lines(), "\n"), good) {
		t.Fatal("a token was logged")
	}
}

func waitHostReady(url string, p *netlab.Process) error {
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if resp, err := http.Get(url); err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return nil
			}
		}
		if p.Exited() {
			return fmt.Errorf("exited:\n%s", p.Tail(20))
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("%s not ready:\n%s", url, p.Tail(20))
}

func certPool(t testing.TB, pemBytes []byte) *x509.CertPool {
	t.Helper()
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pemBytes) {
		t.Fatal("no certificate in the CA file")
	}
	return pool
}
