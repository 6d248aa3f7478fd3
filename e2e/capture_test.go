package e2e

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/egress-guard/egress-guard/internal/netlab"
	"github.com/egress-guard/egress-guard/pkg/contract"
)

// counter is an iptables rule in the internet namespace's raw PREROUTING that counts what
// arrives from the pod: nothing it counts got through the capture rules.
type counter struct {
	ns      *netlab.NS
	cmd     string // iptables or ip6tables
	comment string
}

// countArrivals adds a counting rule in ns matching the pod's source address (of the family
// of src) and match, and returns it.
func countArrivals(t *testing.T, ns *netlab.NS, name, src string, match ...string) counter {
	t.Helper()
	c := counter{ns: ns, cmd: "iptables", comment: "egprobe-" + name}
	if strings.Contains(src, ":") {
		c.cmd = "ip6tables"
	}
	args := append([]string{c.cmd, "-t", "raw", "-A", "PREROUTING", "-s", src}, match...)
	args = append(args, "-m", "comment", "--comment", c.comment)
	if _, err := ns.Run(context.Background(), args...); err != nil {
		t.Fatal(err)
	}
	return c
}

// packets reads the rule's packet count.
func (c counter) packets(t *testing.T) int {
	t.Helper()
	out, err := c.ns.Run(context.Background(), c.cmd+"-save", "-c", "-t", "raw")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(out, "\n") {
		if strings.Contains(l, "--comment "+c.comment) && strings.HasPrefix(l, "[") {
			n, err := strconv.Atoi(l[1:strings.Index(l, ":")])
			if err != nil {
				t.Fatalf("counter line %q: %v", l, err)
			}
			return n
		}
	}
	t.Fatalf("no counter %s in:\n%s", c.comment, out)
	return 0
}

// as runs a command in the pod as uid/gid with no capabilities.
func (p *pod) as(uid, gid int, args ...string) (string, error) {
	return p.asWithCaps("-all", uid, gid, args...)
}

// asWithCaps runs a command in the pod as uid/gid (also its group) with capabilities caps
// (setpriv's syntax: "-all", or "+net_raw" for what root's default set would give a raw socket).
func (p *pod) asWithCaps(caps string, uid, gid int, args ...string) (string, error) {
	set := []string{"--inh-caps=-all", "--bounding-set=-all"}
	if caps != "-all" {
		set = []string{"--inh-caps=" + caps, "--ambient-caps=" + caps}
	}
	cmd := append(append([]string{"setpriv", "--reuid", fmt.Sprint(uid), "--regid", fmt.Sprint(gid), "--clear-groups"}, set...), "--")
	return p.lab.Pod.Run(context.Background(), append(cmd, args...)...)
}

// appAs runs curl like p.app, as uid with primary group gid.
func (p *pod) appAs(uid, gid int, extra ...string) (exit int, body string) {
	args := []string{"setpriv", "--reuid", fmt.Sprint(uid), "--regid", fmt.Sprint(gid), "--clear-groups",
		"--inh-caps=-all", "--bounding-set=-all", "--",
		"curl", "-sS", "--max-time", "6", "--cacert", p.lab.CAFile, "--noproxy", "*"}
	out, err := p.lab.Pod.Command(context.Background(), append(args, extra...)...).CombinedOutput()
	if ee, ok := err.(interface{ ExitCode() int }); ok {
		exit = ee.ExitCode()
	}
	return exit, string(out)
}

// TestCaptureLeavesNoOtherWayOut attacks the installed rules as an app would: protocols
// other than TCP and UDP, and the proxy's group.
func TestCaptureLeavesNoOtherWayOut(t *testing.T) {
	p := startPod(t)
	l := p.lab
	ctx := context.Background()
	probe := binary(t, "./internal/probe")
	// Container runtimes open ping sockets to every group in a pod sandbox.
	for _, ns := range []*netlab.NS{l.Pod, l.Net} {
		if _, err := ns.Run(ctx, "sh", "-c", "echo '0 2147483647' > /proc/sys/net/ipv4/ping_group_range"); err != nil {
			t.Fatal(err)
		}
	}

	for _, fam := range []struct{ name, pod, host string }{
		{"IPv4", netlab.PodV4, "198.18.1.10"},
		{"IPv6", netlab.PodV6, "fd00:18:1::10"},
	} {
		echo := []string{"-p", "icmp", "-m", "icmp", "--icmp-type", "8"}
		if fam.name == "IPv6" {
			echo = []string{"-p", "ipv6-icmp", "-m", "icmp6", "--icmpv6-type", "128"}
		}
		probes := []struct {
			name  string
			args  []string
			match []string
		}{
			{"udplite", []string{"udplite", net.JoinHostPort(fam.host, "9")}, []string{"-p", "136"}},
			{"ping", []string{"ping", fam.host}, echo},
			// A datagram from the host's address, forged with IP(V6)_FREEBIND (no privilege
			// needed), to the pod's own address, then "answers" to the host: the forged
			// packet must not create a conntrack entry whose replies may leave.
			{"forgedreply", []string{"forgedreply", fam.pod, net.JoinHostPort(fam.host, "7777")}, []string{"-p", "udp", "--dport", "7777"}},
		}
		for _, pr := range probes {
			t.Run(fam.name+" "+pr.name+" does not leave the pod", func(t *testing.T) {
				c := countArrivals(t, l.Net, fam.name+"-"+pr.name, fam.pod, pr.match...)
				// The app, also with the proxy's GID as its group: neither gets out.
				for _, gid := range []int{appUID, proxyUID} {
					out, err := p.as(appUID, gid, append([]string{probe}, pr.args...)...)
					if err != nil || !strings.Contains(out, pr.name+" socket open") {
						t.Fatalf("probe as uid %d gid %d: %v\n%s", appUID, gid, err, out)
					}
					t.Logf("uid %d gid %d:\n%s", appUID, gid, out)
				}
				time.Sleep(200 * time.Millisecond)
				if n := c.packets(t); n != 0 {
					t.Fatalf("%d %s packets from the app arrived at %s", n, pr.name, fam.host)
				}
				// The same probe as the proxy UID arrives: the counter sees what gets out.
				if out, err := p.as(proxyUID, proxyUID, append([]string{probe}, pr.args...)...); err != nil {
					t.Fatalf("probe as the proxy: %v\n%s", err, out)
				}
				time.Sleep(200 * time.Millisecond)
				if n := c.packets(t); n == 0 {
					t.Fatalf("the proxy UID's %s packets did not arrive either: the counter sees nothing", pr.name)
				}
			})
		}
	}

	// Root's default CAP_NET_RAW: ICMPv6 packet-too-big (a type IPv6 needs, accepted when
	// the kernel sends it) from a raw socket carries data to any host unless ICMP from
	// sockets is dropped.
	t.Run("IPv6 icmp6raw does not leave the pod", func(t *testing.T) {
		host := "fd00:18:1::10"
		c := countArrivals(t, l.Net, "IPv6-icmp6raw", netlab.PodV6, "-p", "ipv6-icmp", "-m", "icmp6", "--icmpv6-type", "2")
		out, err := p.asWithCaps("+net_raw", appUID, appUID, probe, "icmp6raw", host)
		if err != nil || !strings.Contains(out, "icmp6raw socket open") {
			t.Fatalf("probe with CAP_NET_RAW: %v\n%s", err, out)
		}
		t.Logf("uid %d with CAP_NET_RAW:\n%s", appUID, out)
		time.Sleep(200 * time.Millisecond)
		if n := c.packets(t); n != 0 {
			t.Fatalf("%d ICMPv6 packet-too-big packets from the app's raw socket arrived at %s", n, host)
		}
		// The same as the proxy UID arrives: the counter sees what gets out.
		if out, err := p.asWithCaps("+net_raw", proxyUID, proxyUID, probe, "icmp6raw", host); err != nil {
			t.Fatalf("probe as the proxy: %v\n%s", err, out)
		}
		time.Sleep(200 * time.Millisecond)
		if n := c.packets(t); n == 0 {
			t.Fatal("the proxy UID's raw ICMPv6 did not arrive either: the counter sees nothing")
		}
	})

	t.Run("the proxy GID is captured like any other group", func(t *testing.T) {
		before := l.Accepted("198.18.1.20")
		lg := from(p.side)
		exit, body := p.appAs(appUID, proxyUID, "https://evil.test/")
		if exit == 0 {
			t.Fatalf("an app with the proxy's GID reached a denied host: %s", body)
		}
		if l.Accepted("198.18.1.20") != before {
			t.Fatal("evil.test was connected to")
		}
		lg.decision(t, cat(tr("tls", "target", "evil.test:443", "sni", "evil.test"), denied)...)
	})

	t.Run("allowed HTTPS and DNS still work", func(t *testing.T) {
		for _, v := range []struct{ flag, want string }{{"-4", "hello from 198.18.1.10"}, {"-6", "hello from fd00:18:1::10"}} {
			lg := from(p.side)
			exit, body := p.app(t, appUID, v.flag, "https://api.example.com/")
			if exit != 0 || !strings.Contains(body, v.want) {
				t.Fatalf("%s: exit %d: %s", v.flag, exit, body)
			}
			lg.decision(t, cat(tr("tls", "target", "api.example.com:443", "sni", "api.example.com", "destination", "api.example.com"), allowed)...)
		}
	})

	t.Run("connections made to the pod are answered", func(t *testing.T) {
		for _, addr := range []string{netlab.PodV4, netlab.PodV6} {
			// TCP: a server in the pod answers a client in the internet namespace.
			ln, err := l.Pod.Listen("tcp", net.JoinHostPort(addr, "8081"))
			if err != nil {
				t.Fatal(err)
			}
			go func() {
				c, err := ln.Accept()
				if err == nil {
					io.WriteString(c, "pod here\n")
					c.Close()
				}
			}()
			c, err := l.Net.Dial("tcp", ln.Addr().String(), 3*time.Second)
			if err != nil {
				ln.Close()
				t.Fatalf("dial the pod's server at %s: %v", ln.Addr(), err)
			}
			c.SetDeadline(time.Now().Add(3 * time.Second))
			b, err := io.ReadAll(c)
			c.Close()
			ln.Close()
			if string(b) != "pod here\n" {
				t.Fatalf("TCP server in the pod at %s: %q %v", addr, b, err)
			}

			// UDP: the pod's reply to a datagram it was sent leaves.
			pc, err := l.Pod.ListenPacket("udp", net.JoinHostPort(addr, "8082"))
			if err != nil {
				t.Fatal(err)
			}
			go func() {
				buf := make([]byte, 64)
				pc.SetReadDeadline(time.Now().Add(3 * time.Second))
				if n, from, err := pc.ReadFrom(buf); err == nil {
					pc.WriteTo(buf[:n], from)
				}
			}()
			u, err := l.Net.Dial("udp", pc.LocalAddr().String(), time.Second)
			if err != nil {
				t.Fatal(err)
			}
			u.Write([]byte("udp?"))
			u.SetReadDeadline(time.Now().Add(3 * time.Second))
			buf := make([]byte, 64)
			n, err := u.Read(buf)
			u.Close()
			pc.Close()
			if err != nil || string(buf[:n]) != "udp?" {
				t.Fatalf("UDP server in the pod at %s did not answer: %q %v", addr, buf[:n], err)
			}

			// ICMP: the pod's kernel answers an echo request.
			out, err := l.Net.Run(ctx, probe, "ping", addr)
			if err != nil || !strings.Contains(out, "ping: received") {
				t.Fatalf("ping %s from the internet namespace: %v\n%s", addr, err, out)
			}
		}
	})

	// Last: it changes the rules. --udp-policy allow lets UDP out and nothing else; excluded
	// ports and CIDRs go out directly through the filter's DROP.
	t.Run("udp-policy allow is for UDP only; exclusions go out directly", func(t *testing.T) {
		out, err := l.Pod.Run(ctx, p.init, "--proxy-uid", fmt.Sprint(proxyUID), "--redirect-port", fmt.Sprint(contract.TransparentPort),
			"--udp-policy", "allow", "--exclude-ports", "8443", "--exclude-cidrs", "198.18.1.12/32", "--self-test=false")
		if err != nil {
			t.Fatalf("re-run init: %v\n%s", err, out)
		}
		udp, err := l.Net.ListenPacket("udp", "198.18.1.10:4443")
		if err != nil {
			t.Fatal(err)
		}
		defer udp.Close()
		c, err := l.Pod.Dial("udp", "198.18.1.10:4443", time.Second)
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte("udp allowed"))
		c.Close()
		udp.SetReadDeadline(time.Now().Add(2 * time.Second))
		if _, _, err := udp.ReadFrom(make([]byte, 64)); err != nil {
			t.Fatalf("UDP with --udp-policy allow did not leave: %v", err)
		}
		lite := countArrivals(t, l.Net, "allow-udplite", netlab.PodV4, "-p", "136")
		if out, err := p.as(appUID, appUID, probe, "udplite", "198.18.1.10:9"); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		time.Sleep(200 * time.Millisecond)
		if n := lite.packets(t); n != 0 {
			t.Fatalf("%d UDP-Lite packets left with --udp-policy allow", n)
		}

		lg := from(p.side)
		for _, tc := range []struct{ url, ip string }{{"https://evil.test:8443/", "198.18.1.20"}, {"https://cdn.example.com/", "198.18.1.12"}} {
			before := l.Accepted(tc.ip)
			if exit, body := p.app(t, appUID, tc.url); exit != 0 || !strings.Contains(body, "hello from "+tc.ip) {
				t.Fatalf("excluded %s: exit %d: %s", tc.url, exit, body)
			}
			if l.Accepted(tc.ip) != before+1 {
				t.Fatalf("excluded %s did not go straight out", tc.url)
			}
		}
		lg.none(t, "decision")
	})
}

// With net.ipv6.conf.all.disable_ipv6=1, an interface whose own disable_ipv6 is 0 still
// carries IPv6: its rules must be installed.
func TestInitCapturesIPv6EnabledOnOneInterface(t *testing.T) {
	ns := initNS(t, "v6if", false) // all.disable_ipv6=1 (which sets every interface's too)
	bin := binary(t, "./cmd/egress-guard-init")
	ctx := context.Background()
	for _, c := range [][]string{
		{"ip", "link", "add", "egv0", "type", "veth", "peer", "name", "egv1"},
		{"sh", "-c", "echo 0 > /proc/sys/net/ipv6/conf/egv0/disable_ipv6 && echo 0 > /proc/sys/net/ipv6/conf/lo/disable_ipv6"},
		{"ip", "link", "set", "egv0", "up"},
		{"ip", "link", "set", "egv1", "up"},
		{"ip", "-6", "addr", "add", "fd00:9::9/64", "dev", "egv0", "nodad"},
		{"ip", "-6", "route", "add", "default", "dev", "egv0"},
	} {
		if _, err := ns.Run(ctx, c...); err != nil {
			t.Fatal(err)
		}
	}
	if all, err := ns.Run(ctx, "cat", "/proc/sys/net/ipv6/conf/all/disable_ipv6"); err != nil || strings.TrimSpace(all) != "1" {
		t.Fatalf("all.disable_ipv6 = %q %v, want 1", all, err)
	}
	out, err := ns.Run(ctx, bin, "--dns-servers", "198.18.1.53")
	if err != nil || !strings.Contains(out, "IPv6 rules installed and verified") || !strings.Contains(out, "self-test passed") {
		t.Fatalf("want IPv6 rules installed, got %v:\n%s", err, out)
	}
	v6 := saveAll(t, ns, "ip6tables-save")
	for _, want := range []string{"-A OUTPUT -j EGRESS_GUARD_OUTPUT", "-A EGRESS_GUARD_OUTPUT -p tcp -j REDIRECT --to-ports 15001", "-A OUTPUT -j EGRESS_GUARD_FILTER", "-A EGRESS_GUARD_FILTER -j DROP"} {
		if !strings.Contains(v6, want) {
			t.Fatalf("ip6tables lacks %q:\n%s", want, v6)
		}
	}
}

// With IPv6 disabled on every interface (which only NET_ADMIN can undo) nothing can leave
// over IPv6: a node without ip6tables is not refused.
func TestInitIPv6DisabledEverywhereNeedsNoIP6tables(t *testing.T) {
	ns := initNS(t, "v6off", false)
	bin := binary(t, "./cmd/egress-guard-init")
	dir := t.TempDir()
	for _, c := range []string{"iptables", "iptables-nft", "iptables-nft-save", "iptables-legacy", "iptables-legacy-save", "setpriv"} {
		p, err := lookPath(c)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(p, filepath.Join(dir, c)); err != nil {
			t.Fatal(err)
		}
	}
	out, err := ns.Run(context.Background(), "env", "PATH="+dir, bin, "--dns-servers", "198.18.1.53")
	if err != nil || !strings.Contains(out, "IPv6 is disabled on every interface and ip6tables cannot be used") || !strings.Contains(out, "self-test passed") {
		t.Fatalf("%v\n%s", err, out)
	}
}
