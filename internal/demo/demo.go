// Package demo plays a pod on this machine: a network namespace whose egress is captured by
// egress-guard-init and decided by the egress-guard sidecar, an "internet" namespace with DNS
// and TLS/HTTP servers, and the same binary as a gateway for proxy-aware clients. An app with
// no proxy settings runs curl; the demo prints what happened, from the proxy's own decision
// log and metrics, and removes everything it created.
package demo

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/egress-guard/egress-guard/internal/netlab"
	"github.com/egress-guard/egress-guard/pkg/contract"
)

// Hosts of the demo's internet.
var hosts = []netlab.Host{
	{Names: []string{"api.example.com"}, V4: "198.18.1.10", V6: "fd00:18:1::10"},
	{Names: []string{"img.cdn.example.com"}, V4: "198.18.1.11"},
	{Names: []string{"v6only.example.com"}, V6: "fd00:18:1::14"},
	{Names: []string{"evil.test"}, V4: "198.18.1.20"},
}

var records = map[string][]string{"metadata.cdn.example.com": {"169.254.169.254"}}

const (
	proxyUID = contract.ProxyUID
	appUID   = 1000
)

// Config locates the binaries and the policy.
type Config struct {
	Sidecar, Init string // built binaries
	Policy        string // policy file with the "shop" and "frontend-services" identities
}

type step struct {
	flow, what string
	args       []string // curl arguments after the common ones
	uid        int
	udp        string // instead of curl: send one UDP datagram to this address
}

var steps = []step{
	{flow: "transparent", what: "allowed HTTPS", args: []string{"-4", "https://api.example.com/"}},
	{flow: "transparent", what: "denied HTTPS", args: []string{"https://evil.test/"}},
	{flow: "transparent", what: "plain HTTP, decided by Host", args: []string{"http://img.cdn.example.com/"}},
	{flow: "transparent", what: "spoofed SNI (app dials evil.test's IP)", args: []string{"--resolve", "api.example.com:443:198.18.1.20", "https://api.example.com/"}},
	{flow: "transparent", what: "metadata via an allowed wildcard", args: []string{"http://metadata.cdn.example.com/latest/"}},
	{flow: "transparent", what: "QUIC (UDP 443)", udp: "198.18.1.10:443"},
	{flow: "transparent", what: "IPv6 destination", args: []string{"https://v6only.example.com/"}},
	{flow: "gateway", what: "README: curl -x ... -U frontend-pod-1", args: []string{"-x", "http://127.0.0.1:4750", "-U", "frontend-pod-1:anything", "https://api.example.com/"}},
	{flow: "gateway", what: "denied host", args: []string{"-x", "http://127.0.0.1:4750", "-U", "frontend-pod-1:anything", "https://evil.test/"}},
	{flow: "gateway", what: "no credentials", args: []string{"-x", "http://127.0.0.1:4750", "https://api.example.com/"}},
}

// Run plays the demo, writing the report to out.
func Run(ctx context.Context, cfg Config, out io.Writer) error {
	fmt.Fprintln(out, "egress-guard demo: setting up a pod and an internet in network namespaces...")
	lab, err := netlab.Up(ctx, fmt.Sprintf("egdemo%d", os.Getpid()%10000), hosts, records)
	if err != nil {
		return err
	}
	defer lab.Down()
	resolv := filepath.Join("/etc/netns", lab.Pod.Name)
	if err := os.MkdirAll(resolv, 0o755); err != nil {
		return err
	}
	defer os.RemoveAll(resolv)
	if err := os.WriteFile(filepath.Join(resolv, "resolv.conf"), []byte("nameserver "+netlab.DNSServer+"\n"), 0o644); err != nil {
		return err
	}

	initOut, err := lab.Pod.Run(ctx, cfg.Init, "--proxy-uid", fmt.Sprint(proxyUID), "--proxy-gid", fmt.Sprint(proxyUID))
	fmt.Fprintf(out, "\n$ egress-guard-init --proxy-uid %d --proxy-gid %d   (in the pod namespace)\n%s", proxyUID, proxyUID, indent(initOut))
	if err != nil {
		return err
	}

	env := []string{"CONFIGMAP_PATH=" + cfg.Policy, "RESOLVER=" + netlab.DNSServer + ":53", "LOG_LEVEL=INFO"}
	sidecar, err := netlab.Start(lab.Pod, cfg.Sidecar, append(env, "MODE=sidecar", "IDENTITY=shop"), proxyUID, proxyUID)
	if err != nil {
		return err
	}
	defer sidecar.Stop(5 * time.Second)
	gateway, err := netlab.Start(lab.Pod, cfg.Sidecar, env, proxyUID, proxyUID)
	if err != nil {
		return err
	}
	defer gateway.Stop(5 * time.Second)
	for _, u := range []string{fmt.Sprintf("http://127.0.0.1:%d/ready", contract.AdminPort), fmt.Sprintf("http://127.0.0.1:%d/ready", contract.GatewayAdminPort)} {
		if err := netlab.WaitReady(ctx, lab.Pod, u, nil, 10*time.Second); err != nil {
			return fmt.Errorf("%w\nsidecar:\n%s\ngateway:\n%s", err, sidecar.Tail(10), gateway.Tail(10))
		}
	}
	fmt.Fprintf(out, "sidecar (MODE=sidecar IDENTITY=shop) and gateway running as uid %d; the app runs as uid %d with no proxy settings\n\n", proxyUID, appUID)

	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "FLOW\tWHAT THE APP DID\tWHAT IT GOT\tPROXY DECISION\tREASON\tRULE\tUPSTREAM")
	for _, s := range steps {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		proc := sidecar
		if s.flow == "gateway" {
			proc = gateway
		}
		mark := proc.Mark() // this step's lines are the ones after it
		got := runStep(ctx, lab, cfg, s)
		action, reason, rule, upstream := "-", "-", "-", "-"
		if s.udp != "" {
			reason = "dropped in the pod by the capture rules (" + dropCount(ctx, lab) + ")"
		} else if rec := waitClose(proc, mark); rec != nil {
			action, reason, rule = str(rec["action"]), str(rec["decision_reason"]), str(rec["destination"])
			if u := str(rec["upstream"]); u != "" {
				upstream = u
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", s.flow, s.what, got, action, reason, rule, upstream)
	}
	tw.Flush()

	fmt.Fprintln(out, "\nsidecar metrics (egress_proxy_requests_total):")
	_, body, _ := netlab.HTTPGet(ctx, lab.Pod, fmt.Sprintf("http://127.0.0.1:%d/metrics", contract.AdminPort))
	for _, l := range strings.Split(body, "\n") {
		if strings.HasPrefix(l, "egress_proxy_requests_total{") || strings.HasPrefix(l, "egress_proxy_policy_hash_info{") {
			fmt.Fprintln(out, "  "+l)
		}
	}
	fmt.Fprintln(out, "\nevery row above comes from the proxy's own JSON decision and close lines; removing the namespaces...")
	return nil
}

// runStep performs one app action and summarises what the app saw.
func runStep(ctx context.Context, lab *netlab.Lab, cfg Config, s step) string {
	priv := []string{"setpriv", "--reuid", fmt.Sprint(appUID), "--regid", fmt.Sprint(appUID), "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--"}
	if s.udp != "" {
		host, port, _ := strings.Cut(s.udp, ":")
		cmd := lab.Pod.Command(ctx, append(priv, "bash", "-c", fmt.Sprintf("echo quic > /dev/udp/%s/%s", host, port))...)
		cmd.Run()
		return "datagram sent"
	}
	args := append(priv, "curl", "-sS", "--max-time", "5", "--cacert", lab.CAFile, "-o", "-", "-w", "\n%{http_code}")
	if !contains(s.args, "-x") {
		args = append(args, "--noproxy", "*")
	}
	b, err := lab.Pod.Command(ctx, append(args, s.args...)...).CombinedOutput()
	text := strings.TrimSpace(string(b))
	i := strings.LastIndex(text, "\n")
	code, body := text, ""
	if i >= 0 {
		code, body = text[i+1:], text[:i]
	}
	if err != nil {
		msg := body
		if j := strings.Index(msg, "curl: "); j >= 0 {
			msg = msg[j:]
		}
		if code != "000" && code != "" {
			return "HTTP " + code
		}
		return "failed: " + short(msg, 50)
	}
	if k := strings.Index(body, "hello from "); k >= 0 {
		from := strings.Fields(body[k+len("hello from "):])
		if len(from) > 0 {
			return "HTTP " + code + " from " + from[0]
		}
	}
	return "HTTP " + code
}

// waitClose returns the latest close line after mark, waiting up to 3 s for one.
func waitClose(p *netlab.Process, mark int) map[string]any {
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) {
		if recs := p.RecordsAfter(mark, "close"); len(recs) > 0 {
			return recs[len(recs)-1]
		}
		time.Sleep(50 * time.Millisecond)
	}
	return nil
}

func dropCount(ctx context.Context, lab *netlab.Lab) string {
	out, _ := lab.Pod.Run(ctx, "iptables", "-L", contract.FilterChain, "-v", "-n", "-x")
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		// The chain's final rule drops everything the rules before it did not accept
		// (protocol "0": any), the QUIC datagram included.
		if len(f) > 3 && f[2] == "DROP" && (f[3] == "17" || f[3] == "0" || f[3] == "all") {
			return f[0] + " packets dropped so far"
		}
	}
	return "no counter"
}

func str(v any) string {
	if v == nil {
		return ""
	}
	return fmt.Sprint(v)
}

func short(s string, n int) string {
	s = strings.ReplaceAll(s, "\n", " ")
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}

func contains(l []string, s string) bool {
	for _, x := range l {
		if x == s {
			return true
		}
	}
	return false
}

func indent(s string) string {
	var b strings.Builder
	for _, l := range strings.Split(strings.TrimRight(s, "\n"), "\n") {
		b.WriteString("  " + l + "\n")
	}
	return b.String()
}
