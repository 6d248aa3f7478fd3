package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/egress-guard/egress-guard/internal/netlab"
)

// A pod's resolv.conf has search domains and ndots:5, so a resolver that applies the search
// list asks api.example.com.<search domain> first: whoever answers under a search domain would
// decide where an allowed name's connections go. The proxy asks the name it matched, as an
// absolute name. Here the search domain's record points at the evil host.
func TestSearchListNeverAnswersForAnAllowedName(t *testing.T) {
	l := sharedLab(t)
	// ip netns exec bind-mounts this file as /etc/resolv.conf for what it starts in the pod.
	dir := filepath.Join("/etc/netns", l.Pod.Name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(dir, "resolv.conf")
	if err := os.WriteFile(conf, []byte("nameserver "+netlab.DNSServer+"\nsearch search.test\noptions ndots:5\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	g := startGateway(t, l, gatewayPolicy, "RESOLVER=") // the system resolver, with the pod's resolv.conf
	evil := l.Accepted("198.18.1.20")
	lg := from(g.proc)
	exit, code, body := g.curl(t, "frontend-pod-1", "https://api.example.com/")
	if exit != 0 || code != 200 || !strings.Contains(body, "hello from 198.18.1.10") {
		t.Fatalf("exit %d, status %d: %s", exit, code, body)
	}
	if l.Accepted("198.18.1.20") != evil {
		t.Fatal("the search domain's answer was dialed")
	}
	d := lg.decision(t, "target", "api.example.com:443", "action", "allowed", "reason", "rule")
	lg.closeOf(t, d, "upstream", "198.18.1.10:443")
}

// Java's HTTP client refuses Basic authentication for HTTPS tunnels by default
// (jdk.http.auth.tunneling.disabledSchemes=Basic): the README's setting makes it work.
func TestJavaClientThroughTheGateway(t *testing.T) {
	require(t, "java")
	l := sharedLab(t)
	g := startGateway(t, l, gatewayPolicy)
	src, err := filepath.Abs("testdata/ProxyClient.java")
	if err != nil {
		t.Fatal(err)
	}
	java := func(props ...string) string {
		ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
		defer cancel()
		args := append([]string{"java"}, props...)
		args = append(args, src, "127.0.0.1", fmt.Sprint(g.port), "frontend-pod-1", "https://api.example.com/", l.CAFile)
		out, err := l.Pod.Command(ctx, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("java: %v\n%s", err, out)
		}
		return string(out)
	}
	// Without the setting the JDK never sends the credentials: 407.
	if out := java(); !strings.Contains(out, "407") && !strings.Contains(out, "error") {
		t.Fatalf("without the setting the tunnel should fail authentication:\n%s", out)
	}
	lg := from(g.proc)
	out := java("-Djdk.http.auth.tunneling.disabledSchemes=")
	if !strings.Contains(out, "status 200") || !strings.Contains(out, "hello from 198.18.1.10") {
		t.Fatalf("with the setting:\n%s", out)
	}
	lg.decision(t, "listener", "explicit", "method", "CONNECT", "identity", "frontend-services", "target", "api.example.com:443", "action", "allowed", "reason", "rule")
}
