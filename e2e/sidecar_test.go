package e2e

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/egress-guard/egress-guard/internal/netlab"
	"github.com/egress-guard/egress-guard/pkg/contract"
)

const (
	proxyUID = contract.ProxyUID
	appUID   = 1000
)

const sidecarPolicy = `
identities:
  "shop":
    api_keys: ["unused"]
    allowed_destinations:
      - "api.example.com"
      - "*.cdn.example.com"
      - "*.nowhere.example.com"   # a zone the lab's DNS has no names in
      - "smtp.example.com:25"
      - "198.18.1.10:7"
      - "v6only.example.com"
      # The lab's IPv6 hosts are ULA (internal): a rule must name them.
      - "fd00:18:1::/48"
`

// pod is the pod namespace with capture rules installed and the sidecar running as proxyUID.
type pod struct {
	lab  *netlab.Lab
	side *netlab.Process
	init string // egress-guard-init binary
}

// startPod brings up its own lab (capture rules would redirect the gateway tests' curl) with
// the init program applied and the sidecar running on a policy file.
func startPod(t *testing.T) *pod {
	return startPodWith(t, "es", func(dir string) []string {
		policy := filepath.Join(dir, "policy.yaml")
		if err := os.WriteFile(policy, []byte(sidecarPolicy), 0o644); err != nil {
			t.Fatal(err)
		}
		return []string{"IDENTITY=shop", "CONFIGMAP_PATH=" + policy, "WATCH_INTERVAL=1"}
	}, nil)
}

// startPodWith is startPod with the sidecar's own settings: sidecarEnv writes what the
// sidecar reads into dir (readable by proxyUID) and returns its environment. beforeSidecar,
// if set, runs once the capture rules are in place.
func startPodWith(t *testing.T, prefix string, sidecarEnv func(dir string) []string, beforeSidecar func(*netlab.Lab)) *pod {
	t.Helper()
	require(t, "curl", "iptables", "ip6tables", "setpriv")
	ctx := context.Background()
	l, err := netlab.Up(ctx, fmt.Sprintf("%s%d", prefix, os.Getpid()%100000), hosts, internalRecords)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(l.Down)
	// Apps in the pod resolve through the lab's DNS server, as a pod uses the cluster's.
	resolv := filepath.Join("/etc/netns", l.Pod.Name)
	if err := os.MkdirAll(resolv, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(resolv) })
	if err := os.WriteFile(filepath.Join(resolv, "resolv.conf"), []byte("nameserver "+netlab.DNSServer+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}

	p := &pod{lab: l, init: binary(t, "./cmd/egress-guard-init")}
	if out, err := l.Pod.Run(ctx, p.init, "--proxy-uid", fmt.Sprint(proxyUID), "--proxy-gid", fmt.Sprint(proxyUID), "--redirect-port", fmt.Sprint(contract.TransparentPort)); err != nil {
		t.Fatalf("egress-guard-init: %v\n%s", err, out)
	}

	if beforeSidecar != nil {
		beforeSidecar(l)
	}
	// The sidecar runs as proxyUID and must read its files (t.TempDir's parent is 0700).
	dir, err := os.MkdirTemp("", "egress-guard-sidecar-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755)
	t.Cleanup(func() { os.RemoveAll(dir) })
	env := append([]string{"MODE=sidecar", "RESOLVER=" + netlab.DNSServer + ":53", "LOG_LEVEL=INFO", "DIAL_TIMEOUT=3s"}, sidecarEnv(dir)...)
	side, err := netlab.Start(l.Pod, binary(t, "./cmd/egress-guard"), env, proxyUID, proxyUID)
	if err != nil {
		t.Fatal(err)
	}
	p.side = side
	t.Cleanup(func() {
		side.Stop(10 * time.Second)
		if t.Failed() {
			t.Logf("sidecar log tail:\n%s", side.Tail(30))
		}
	})
	if err := netlab.WaitReady(ctx, l.Pod, fmt.Sprintf("http://127.0.0.1:%d/ready", contract.AdminPort), side, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	return p
}

// app runs curl in the pod as an ordinary user with no proxy settings.
func (p *pod) app(t *testing.T, uid int, extra ...string) (exit int, body string) {
	t.Helper()
	args := []string{"setpriv", "--reuid", fmt.Sprint(uid), "--regid", fmt.Sprint(uid), "--clear-groups",
		"--inh-caps=-all", "--bounding-set=-all", "--",
		"curl", "-sS", "--max-time", "6", "--cacert", p.lab.CAFile}
	if !slices.Contains(extra, "-x") {
		args = append(args, "--noproxy", "*") // no proxy settings: capture does the work
	}
	out, err := p.lab.Pod.Command(context.Background(), append(args, extra...)...).CombinedOutput()
	if ee, ok := err.(interface{ ExitCode() int }); ok {
		exit = ee.ExitCode()
	}
	return exit, string(out)
}

// tr lists the fields of a transparent decision line of identity shop: listener, identity
// and protocol, then kv.
func tr(protocol string, kv ...string) []string {
	return append([]string{"listener", "transparent", "identity", "shop", "protocol", protocol}, kv...)
}

// allowed and denied are the action, reason and status of an allowed decision, and of one
// no rule allows.
var (
	allowed = []string{"action", "allowed", "reason", "rule", "status", "allowed"}
	denied  = []string{"action", "denied", "reason", "no_matching_rule", "status", "denied", "destination", "none"}
)

func cat(kvs ...[]string) []string { return slices.Concat(kvs...) }

func TestSidecarTransparent(t *testing.T) {
	p := startPod(t)
	l := p.lab
	ctx := context.Background()

	t.Run("init run twice gives identical rules", func(t *testing.T) {
		save := func() string {
			v4, err := l.Pod.Run(ctx, "iptables-save")
			if err != nil {
				t.Fatal(err)
			}
			v6, err := l.Pod.Run(ctx, "ip6tables-save")
			if err != nil {
				t.Fatal(err)
			}
			var keep []string
			for _, line := range strings.Split(v4+v6, "\n") {
				if !strings.HasPrefix(line, "#") {
					keep = append(keep, line)
				}
			}
			return strings.Join(keep, "\n")
		}
		before := save()
		if !strings.Contains(before, fmt.Sprintf("-A %s -p tcp -j REDIRECT --to-ports %d", contract.NatChain, contract.TransparentPort)) {
			t.Fatalf("rules not installed:\n%s", before)
		}
		out, err := l.Pod.Run(ctx, p.init, "--proxy-uid", fmt.Sprint(proxyUID), "--proxy-gid", fmt.Sprint(proxyUID), "--redirect-port", fmt.Sprint(contract.TransparentPort), "--self-test=false")
		if err != nil || !strings.Contains(out, "already in place") {
			t.Fatalf("second run: %v\n%s", err, out)
		}
		if after := save(); after != before {
			t.Fatalf("second run changed the rules:\nbefore:\n%s\nafter:\n%s", before, after)
		}
	})

	t.Run("allowed HTTPS without proxy settings", func(t *testing.T) {
		lg := from(p.side)
		exit, body := p.app(t, appUID, "-4", "https://api.example.com/")
		if exit != 0 || !strings.Contains(body, "hello from 198.18.1.10 (host api.example.com)") {
			t.Fatalf("exit %d: %s", exit, body)
		}
		d := lg.decision(t, cat(tr("tls", "target", "api.example.com:443", "sni", "api.example.com", "destination", "api.example.com"), allowed)...)
		c := lg.closeOf(t, d, "listener", "transparent", "identity", "shop", "protocol", "tls", "decision_reason", "rule", "upstream", "198.18.1.10:443")
		if c["bytes_down"].(float64) <= 0 || c["bytes_up"].(float64) <= 0 {
			t.Fatalf("close line %v", c)
		}
	})

	t.Run("denied HTTPS is reset before any connection", func(t *testing.T) {
		before := l.Accepted("198.18.1.20")
		lg := from(p.side)
		exit, body := p.app(t, appUID, "https://evil.test/")
		if exit == 0 {
			t.Fatalf("denied destination answered: %s", body)
		}
		if l.Accepted("198.18.1.20") != before {
			t.Fatal("evil.test was connected to")
		}
		lg.decision(t, cat(tr("tls", "target", "evil.test:443", "sni", "evil.test"), denied)...)
	})

	t.Run("plain HTTP decided by Host", func(t *testing.T) {
		lg := from(p.side)
		exit, body := p.app(t, appUID, "http://a.cdn.example.com/")
		if exit != 0 || !strings.Contains(body, "hello from 198.18.1.11") {
			t.Fatalf("exit %d: %s", exit, body)
		}
		d := lg.decision(t, cat(tr("http", "target", "a.cdn.example.com:80", "destination", "*.cdn.example.com"), allowed)...)
		lg.closeOf(t, d, "upstream", "198.18.1.11:80")
	})

	t.Run("spoofed SNI reaches only the named host", func(t *testing.T) {
		// The app connects to evil.test's address while claiming api.example.com: the proxy
		// resolves the claimed name itself and dials its address, never the app's.
		evil := l.Accepted("198.18.1.20")
		lg := from(p.side)
		exit, body := p.app(t, appUID, "--resolve", "api.example.com:443:198.18.1.20", "https://api.example.com/")
		if exit != 0 || !strings.Contains(body, "hello from 198.18.1.10") {
			t.Fatalf("exit %d: %s", exit, body)
		}
		if l.Accepted("198.18.1.20") != evil {
			t.Fatal("the app-chosen address was dialed")
		}
		// This connection's own lines: decided on the claimed name, dialed to its address.
		d := lg.decision(t, cat(tr("tls", "target", "api.example.com:443", "sni", "api.example.com", "destination", "api.example.com"), allowed)...)
		lg.closeOf(t, d, "upstream", "198.18.1.10:443")
	})

	t.Run("Host spoofing over plain HTTP", func(t *testing.T) {
		evil := l.Accepted("198.18.1.20")
		lg := from(p.side)
		exit, body := p.app(t, appUID, "--resolve", "api.example.com:80:198.18.1.20", "http://api.example.com/")
		if exit != 0 || !strings.Contains(body, "hello from 198.18.1.10") || l.Accepted("198.18.1.20") != evil {
			t.Fatalf("exit %d: %s", exit, body)
		}
		d := lg.decision(t, cat(tr("http", "target", "api.example.com:80", "destination", "api.example.com"), allowed)...)
		lg.closeOf(t, d, "upstream", "198.18.1.10:80")
	})

	t.Run("QUIC and other UDP are dropped", func(t *testing.T) {
		// A QUIC client's first datagram to port 443 must not leave the pod (Debian's curl
		// has no HTTP/3, so the datagram is sent directly).
		udp, err := l.Net.ListenPacket("udp", "198.18.1.10:443")
		if err != nil {
			t.Fatal(err)
		}
		defer udp.Close()
		c, err := l.Pod.Dial("udp", "198.18.1.10:443", time.Second)
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte("quic?"))
		c.Close()
		udp.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		if n, _, err := udp.ReadFrom(make([]byte, 64)); err == nil {
			t.Fatalf("UDP datagram of %d bytes left the pod", n)
		}
		out, _ := l.Pod.Run(ctx, "iptables", "-L", contract.FilterChain, "-v", "-n", "-x")
		if !strings.Contains(out, "DROP") {
			t.Fatalf("no UDP drop rule:\n%s", out)
		}
	})

	t.Run("DNS to the resolver still works", func(t *testing.T) {
		lg := from(p.side)
		exit, body := p.app(t, appUID, "-o", "/dev/null", "-w", "%{remote_ip}", "https://a.cdn.example.com/")
		if exit != 0 || !strings.Contains(body, "198.18.1.11") {
			t.Fatalf("exit %d: %s", exit, body)
		}
		lg.decision(t, cat(tr("tls", "target", "a.cdn.example.com:443", "sni", "a.cdn.example.com", "destination", "*.cdn.example.com"), allowed)...)
	})

	t.Run("IPv6 original destination", func(t *testing.T) {
		lg := from(p.side)
		exit, body := p.app(t, appUID, "https://v6only.example.com/")
		if exit != 0 || !strings.Contains(body, "hello from fd00:18:1::14") {
			t.Fatalf("exit %d: %s", exit, body)
		}
		d := lg.decision(t, cat(tr("tls", "target", "v6only.example.com:443", "sni", "v6only.example.com", "destination", "v6only.example.com"), allowed)...)
		lg.closeOf(t, d, "upstream", "[fd00:18:1::14]:443")
		// A dual-stack name reached over IPv6: the app's address is in the proxy's answer,
		// so it is kept.
		lg = from(p.side)
		if exit, body := p.app(t, appUID, "-6", "https://api.example.com/"); exit != 0 || !strings.Contains(body, "hello from fd00:18:1::10") {
			t.Fatalf("-6 api.example.com: exit %d: %s", exit, body)
		}
		d = lg.decision(t, cat(tr("tls", "target", "api.example.com:443", "sni", "api.example.com", "destination", "api.example.com"), allowed)...)
		lg.closeOf(t, d, "upstream", "[fd00:18:1::10]:443")
		// No name: an IPv6 literal decided on the address itself.
		lg = from(p.side)
		exit, body = p.app(t, appUID, "-H", "Host:", "--http1.0", "http://[fd00:18:1::14]:80/")
		if exit != 0 || !strings.Contains(body, "hello from fd00:18:1::14") {
			t.Fatalf("IPv6 literal: exit %d: %s", exit, body)
		}
		d = lg.decision(t, cat(tr("http", "target", "[fd00:18:1::14]:80", "destination", "fd00:18:1::/48"), allowed)...)
		lg.closeOf(t, d, "upstream", "[fd00:18:1::14]:80")
	})

	t.Run("server-first protocol to an allowed address", func(t *testing.T) {
		for _, target := range []string{"198.18.1.25:25", "198.18.1.10:7"} {
			lg := from(p.side)
			c, err := l.Pod.Dial("tcp", target, 3*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			c.SetDeadline(time.Now().Add(5 * time.Second))
			if target == "198.18.1.25:25" {
				// smtp.example.com:25 is an exact-name rule: the proxy resolved it itself,
				// so its address is allowed although the client sends no name.
				line, err := bufio.NewReader(c).ReadString('\n')
				if err != nil || line != netlab.BannerGreet {
					t.Fatalf("banner %q %v", line, err)
				}
			} else {
				fmt.Fprint(c, "ping")
				b := make([]byte, 4)
				if _, err := io.ReadFull(c, b); err != nil || string(b) != "ping" {
					t.Fatalf("echo %q %v", b, err)
				}
			}
			c.Close()
			// The banner port is decided when the client stays silent (server-first); the
			// echo port when its first bytes carry no name (tcp).
			protocol, rule := "server-first", "smtp.example.com:25"
			if target == "198.18.1.10:7" {
				protocol, rule = "tcp", "198.18.1.10:7"
			}
			d := lg.decision(t, cat(tr(protocol, "target", target, "destination", rule), allowed)...)
			lg.closeOf(t, d, "upstream", target)
		}
	})

	t.Run("proxy UID is not redirected", func(t *testing.T) {
		before := l.Accepted("198.18.1.20")
		lg := from(p.side)
		exit, body := p.app(t, proxyUID, "http://198.18.1.20/")
		if exit != 0 || !strings.Contains(body, "hello from 198.18.1.20") {
			t.Fatalf("exit %d: %s", exit, body)
		}
		if l.Accepted("198.18.1.20") != before+1 {
			t.Fatal("the proxy UID's connection did not go straight out")
		}
		// The proxy UID's own connection is not captured: the sidecar decides nothing.
		lg.none(t, "decision")
	})

	t.Run("root without NET_ADMIN cannot escape", func(t *testing.T) {
		before := l.Accepted("198.18.1.20")
		for _, tc := range []struct{ url, protocol, target string }{
			{"https://evil.test/", "tls", "evil.test:443"},
			{"http://198.18.1.20/", "http", "198.18.1.20:80"},
		} {
			lg := from(p.side)
			if exit, body := p.app(t, 0, tc.url); exit == 0 {
				t.Fatalf("%s as root: %s", tc.url, body)
			}
			lg.decision(t, cat(tr(tc.protocol, "target", tc.target), denied)...)
		}
		if l.Accepted("198.18.1.20") != before {
			t.Fatal("root reached the denied host")
		}
		// Changing the rules needs NET_ADMIN, which the app does not have.
		if _, err := l.Pod.Run(ctx, "setpriv", "--inh-caps=-all", "--bounding-set=-all", "--", "iptables", "-t", "nat", "-F", contract.NatChain); err == nil {
			t.Fatal("root without NET_ADMIN flushed the capture chain")
		}
	})

	t.Run("loopback services in the pod still work", func(t *testing.T) {
		ln, err := l.Pod.Listen("tcp", "127.0.0.1:8080")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			c, err := ln.Accept()
			if err == nil {
				io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nlocal")
				c.Close()
			}
		}()
		if exit, body := p.app(t, appUID, "http://127.0.0.1:8080/"); exit != 0 || body != "local" {
			t.Fatalf("exit %d: %q", exit, body)
		}
	})

	t.Run("explicit proxy on localhost for proxy-aware apps", func(t *testing.T) {
		lg := from(p.side)
		exit, body := p.app(t, appUID, "-x", fmt.Sprintf("http://127.0.0.1:%d", contract.ExplicitPort), "https://api.example.com/")
		if exit != 0 || !strings.Contains(body, "(host api.example.com)") {
			t.Fatalf("exit %d: %s", exit, body)
		}
		d := lg.decision(t, cat([]string{"listener", "explicit", "method", "CONNECT", "identity", "shop", "target", "api.example.com:443",
			"sni", "api.example.com", "destination", "api.example.com"}, allowed)...)
		lg.closeOf(t, d, "listener", "explicit", "method", "CONNECT")
	})

	t.Run("a name that does not exist reads the same on both listeners", func(t *testing.T) {
		// Captured: the app connects to a real address but names a host that does not exist.
		// The proxy resolves the name itself, finds nothing, and resets: action failed, not
		// denied (the policy allowed it) and not allowed.
		lg := from(p.side)
		exit, body := p.app(t, appUID, "--resolve", "gone.nowhere.example.com:443:198.18.1.11", "https://gone.nowhere.example.com/")
		if exit == 0 {
			t.Fatalf("a name that does not exist answered: %s", body)
		}
		failed := []string{"target", "gone.nowhere.example.com:443", "destination", "*.nowhere.example.com", "action", "failed", "reason", "no_such_host", "status", "connection_failed"}
		d := lg.decision(t, cat(tr("tls", "sni", "gone.nowhere.example.com"), failed)...)
		lg.closeOf(t, d, "reason", "refused", "decision_reason", "no_such_host")

		// Explicit: the same event, the same fields, and a 502 that names the reason.
		lg = from(p.side)
		exit, body = p.app(t, appUID, "-sS", "-o", "/dev/null", "-w", "%{http_connect}", "-x", fmt.Sprintf("http://127.0.0.1:%d", contract.ExplicitPort), "https://gone.nowhere.example.com/")
		if exit == 0 || !strings.Contains(body, "502") {
			t.Fatalf("explicit CONNECT to a missing name: exit %d, %s", exit, body)
		}
		d = lg.decision(t, cat([]string{"listener", "explicit", "method", "CONNECT", "identity", "shop"}, failed)...)
		lg.closeOf(t, d, "reason", "refused", "decision_reason", "no_such_host")
	})

	t.Run("an app with its own proxy settings keeps working", func(t *testing.T) {
		// The app points at a proxy address of its own (nothing listens there); capture
		// brings the proxy request to the sidecar, which serves it as a proxy would.
		appProxy := "http://198.18.1.30:3128"
		lg := from(p.side)
		exit, body := p.app(t, appUID, "-x", appProxy, "https://api.example.com/")
		if exit != 0 || !strings.Contains(body, "hello from 198.18.1.10 (host api.example.com)") {
			t.Fatalf("exit %d: %s", exit, body)
		}
		d := lg.decision(t, cat(tr("http-proxy", "method", "CONNECT", "target", "api.example.com:443", "sni", "api.example.com",
			"destination", "api.example.com"), allowed)...)
		lg.closeOf(t, d, "upstream", "198.18.1.10:443")

		// Denied through the same path: an HTTP status, since the app speaks HTTP to its proxy.
		lg = from(p.side)
		exit, body = p.app(t, appUID, "-sS", "-o", "/dev/null", "-w", "%{http_connect}", "-x", appProxy, "https://evil.test/")
		if exit == 0 || !strings.Contains(body, "403") {
			t.Fatalf("denied through the app's proxy: exit %d: %s", exit, body)
		}
		lg.decision(t, cat(tr("http-proxy", "method", "CONNECT", "target", "evil.test:443"), denied)...)

		// Plain HTTP in proxy form is forwarded, decided on the URL's host.
		lg = from(p.side)
		exit, body = p.app(t, appUID, "-x", appProxy, "http://a.cdn.example.com/")
		if exit != 0 || !strings.Contains(body, "hello from 198.18.1.11") {
			t.Fatalf("plain HTTP through the app's proxy: exit %d: %s", exit, body)
		}
		lg.decision(t, cat(tr("http-proxy", "method", "GET", "target", "a.cdn.example.com:80", "destination", "*.cdn.example.com"), allowed)...)
	})

	// api.example.com is an exact-name rule, so its address 198.18.1.10 is allowed for a
	// client that names no host. A ClientHello naming another site, sent so that the first
	// peek sees one byte, or cut short by a stall, must not pass as "named no host".
	t.Run("a ClientHello cannot dodge its SNI to reach an allowed name's address", func(t *testing.T) {
		hello := clientHello(t, "evil.test")
		for _, c := range []struct {
			name  string
			send  func(net.Conn)
			match []string
			hint  bool // no name was read: the decision line says only IP rules applied
		}{
			{"first byte alone", func(c net.Conn) {
				c.Write(hello[:1])
				time.Sleep(300 * time.Millisecond)
				c.Write(hello[1:])
			}, cat(tr("tls", "target", "evil.test:443", "sni", "evil.test"), denied), false},
			{"a stall after the first byte", func(c net.Conn) {
				c.Write(hello[:1]) // and nothing more within the peek timeout
			}, cat(tr("tcp", "target", "198.18.1.10:443"), denied), true},
			{"a stall mid-message", func(c net.Conn) {
				c.Write(hello[:100])
			}, cat(tr("tls", "target", "198.18.1.10:443"), denied), true},
		} {
			t.Run(c.name, func(t *testing.T) {
				lg := from(p.side)
				conn, err := l.Pod.Dial("tcp", "198.18.1.10:443", 3*time.Second)
				if err != nil {
					t.Fatal(err)
				}
				defer conn.Close()
				conn.SetDeadline(time.Now().Add(10 * time.Second))
				c.send(conn)
				if b, err := io.ReadAll(conn); len(b) != 0 {
					t.Fatalf("the connection answered %d bytes (%v)", len(b), err)
				}
				d := lg.decision(t, c.match...)
				if h, _ := d["hint"].(string); c.hint != strings.Contains(h, "only IP rules apply") {
					t.Fatalf("hint %q", h)
				}
			})
		}
	})

	t.Run("a server-first connection to a wildcard-only host is denied with a hint", func(t *testing.T) {
		// a.cdn.example.com is allowed only by *.cdn.example.com: with no name sent, the
		// address cannot be matched, and the decision line says what rule is missing.
		lg := from(p.side)
		c, err := l.Pod.Dial("tcp", "198.18.1.11:25", 3*time.Second)
		if err == nil {
			c.SetDeadline(time.Now().Add(5 * time.Second))
			io.ReadAll(c)
			c.Close()
		}
		d := lg.decision(t, cat(tr("server-first", "target", "198.18.1.11:25"), denied)...)
		if h, _ := d["hint"].(string); !strings.Contains(h, "*.cdn.example.com") || !strings.Contains(h, "exact-name rule") {
			t.Fatalf("hint %q", h)
		}
	})

	t.Run("metrics count transparent decisions", func(t *testing.T) {
		if v := metric(t, l, contract.AdminPort, `egress_proxy_requests_total{destination="none",identity="shop",status="denied"}`); v < 1 {
			t.Fatalf("denied = %v", v)
		}
		if v := metric(t, l, contract.AdminPort, `egress_proxy_requests_total{destination="api.example.com",identity="shop",status="allowed"}`); v < 1 {
			t.Fatalf("allowed = %v", v)
		}
	})
}

// clientHello returns the first TLS record a Go client sends for sni: its ClientHello.
func clientHello(t *testing.T, sni string) []byte {
	t.Helper()
	a, b := net.Pipe()
	defer b.Close()
	go func() {
		defer a.Close()
		// The handshake never completes: only its first flight is read.
		tls.Client(a, &tls.Config{ServerName: sni, InsecureSkipVerify: true}).Handshake()
	}()
	b.SetReadDeadline(time.Now().Add(5 * time.Second))
	head := make([]byte, 5)
	if _, err := io.ReadFull(b, head); err != nil {
		t.Fatal(err)
	}
	body := make([]byte, int(head[3])<<8|int(head[4]))
	if _, err := io.ReadFull(b, body); err != nil {
		t.Fatal(err)
	}
	return append(head, body...)
}
