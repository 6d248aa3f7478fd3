// Package cli is egress-guard-init's command line: flags (each also read from an environment
// variable) to a capture plan, then dry-run, cleanup, or apply, verify and self-test.
package cli

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"

	"github.com/egress-guard/egress-guard/init-container/capture"
	"github.com/egress-guard/egress-guard/init-container/selftest"
)

// Options are the parsed flags.
type Options struct {
	Config   capture.Config
	DryRun   bool
	Cleanup  bool
	SelfTest bool
	Backend  string
}

// Parse reads flags, with environment variables as defaults. resolvConf is read for the DNS
// servers when none are given.
func Parse(args []string, getenv func(string) string, resolvConf string) (Options, error) {
	fs := flag.NewFlagSet("egress-guard-init", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	env := func(name, def string) string {
		if v := getenv(name); v != "" {
			return v
		}
		return def
	}
	uid := fs.String("proxy-uid", env("PROXY_UID", "15337"), "UID of the sidecar, whose traffic is not captured (env PROXY_UID)")
	gid := fs.String("proxy-gid", env("PROXY_GID", "15337"), "GID of the sidecar (env PROXY_GID)")
	port := fs.String("redirect-port", env("REDIRECT_PORT", "15001"), "the sidecar's transparent port (env REDIRECT_PORT)")
	cidrs := fs.String("exclude-cidrs", env("EXCLUDE_CIDRS", ""), "comma-separated destination CIDRs not captured (env EXCLUDE_CIDRS)")
	ports := fs.String("exclude-ports", env("EXCLUDE_PORTS", ""), "comma-separated destination TCP ports not captured (env EXCLUDE_PORTS)")
	dns := fs.String("dns-servers", env("DNS_SERVERS", ""), "comma-separated resolvers DNS may go to; default: nameservers of "+resolvConf+" (env DNS_SERVERS)")
	udp := fs.String("udp-policy", env("UDP_POLICY", capture.UDPDrop), "non-DNS UDP: drop, reject or allow (env UDP_POLICY)")
	backend := fs.String("iptables-backend", env("IPTABLES_BACKEND", "auto"), "auto, nft or legacy (env IPTABLES_BACKEND)")
	dry := fs.Bool("dry-run", envBool(getenv, "DRY_RUN"), "print the plan and change nothing (env DRY_RUN)")
	clean := fs.Bool("cleanup", envBool(getenv, "CLEANUP"), "remove egress-guard's rules and nothing else (env CLEANUP)")
	self := fs.Bool("self-test", !envFalse(getenv, "SELF_TEST"), "after applying, prove redirection works (env SELF_TEST)")
	if err := fs.Parse(args); err != nil {
		return Options{}, err
	}
	if fs.NArg() > 0 {
		return Options{}, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	var o Options
	var errs []string
	bad := func(flag, v, why string) { errs = append(errs, fmt.Sprintf("--%s=%q: %s", flag, v, why)) }
	if n, err := strconv.ParseUint(*uid, 10, 32); err != nil {
		bad("proxy-uid", *uid, "want a number")
	} else {
		o.Config.ProxyUID = uint32(n)
	}
	if n, err := strconv.ParseUint(*gid, 10, 32); err != nil {
		bad("proxy-gid", *gid, "want a number")
	} else {
		o.Config.ProxyGID = uint32(n)
	}
	if o.Config.ProxyUID == 0 {
		bad("proxy-uid", *uid, "0 would exempt every root process from capture")
	}
	if n, err := strconv.ParseUint(*port, 10, 16); err != nil || n == 0 {
		bad("redirect-port", *port, "want a port 1-65535")
	} else {
		o.Config.RedirectPort = uint16(n)
	}
	for _, f := range split(*cidrs) {
		p, err := netip.ParsePrefix(f)
		if err != nil {
			bad("exclude-cidrs", f, "want a CIDR")
			continue
		}
		o.Config.ExcludeCIDRs = append(o.Config.ExcludeCIDRs, p.Masked())
	}
	for _, f := range split(*ports) {
		n, err := strconv.ParseUint(f, 10, 16)
		if err != nil || n == 0 {
			bad("exclude-ports", f, "want a port 1-65535")
			continue
		}
		o.Config.ExcludePorts = append(o.Config.ExcludePorts, uint16(n))
	}
	servers := split(*dns)
	if len(servers) == 0 {
		s, err := nameservers(resolvConf)
		if err != nil {
			errs = append(errs, err.Error())
		}
		servers = s
	}
	for _, f := range servers {
		a, err := netip.ParseAddr(f)
		if err != nil {
			bad("dns-servers", f, "want an IP address")
			continue
		}
		o.Config.DNSServers = append(o.Config.DNSServers, a.Unmap())
	}
	switch *udp {
	case capture.UDPDrop, capture.UDPReject, capture.UDPAllow:
		o.Config.UDPPolicy = *udp
	default:
		bad("udp-policy", *udp, "want drop, reject or allow")
	}
	switch *backend {
	case "auto", "nft", "legacy":
		o.Backend = *backend
	default:
		bad("iptables-backend", *backend, "want auto, nft or legacy")
	}
	o.DryRun, o.Cleanup, o.SelfTest = *dry, *clean, *self
	if len(errs) > 0 {
		return Options{}, errors.New(strings.Join(errs, "; "))
	}
	return o, nil
}

func envBool(getenv func(string) string, name string) bool {
	v, _ := strconv.ParseBool(getenv(name))
	return v
}

func envFalse(getenv func(string) string, name string) bool {
	v, err := strconv.ParseBool(getenv(name))
	return err == nil && !v
}

func split(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// nameservers reads the nameserver lines of a resolv.conf.
func nameservers(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read DNS servers from %s (or give --dns-servers): %w", path, err)
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 2 && fields[0] == "nameserver" {
			out = append(out, strings.SplitN(fields[1], "%", 2)[0])
		}
	}
	return out, sc.Err()
}

// Main runs the program and returns its exit code: 0 done, 1 failed, 2 bad usage.
func Main(args []string, stdout, stderr io.Writer) int {
	if len(args) == 2 && args[0] == selftest.ClientFlag {
		if err := selftest.Client(args[1]); err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
		return 0
	}
	o, err := Parse(args, os.Getenv, "/etc/resolv.conf")
	if err != nil {
		fmt.Fprintln(stderr, "egress-guard-init:", err)
		return 2
	}
	if err := run(o, stdout); err != nil {
		fmt.Fprintln(stderr, "egress-guard-init:", err)
		return 1
	}
	return 0
}

func run(o Options, out io.Writer) error {
	v6, err := capture.DetectIPv6()
	if err != nil {
		return err
	}
	families := []capture.Family{capture.IPv4}
	if v6.Enabled {
		families = append(families, capture.IPv6)
	}
	if o.DryRun {
		for _, fam := range families {
			fmt.Fprint(out, capture.BuildPlan(o.Config, fam))
		}
		if !v6.Enabled {
			fmt.Fprintln(out, "# IPv6 is disabled in this namespace: no ip6tables rules")
		}
		return nil
	}

	backend := capture.Backend(o.Backend)
	why := "set by --iptables-backend"
	if o.Backend == "auto" {
		backend, why, err = capture.DetectBackend(runCommand)
		if err != nil {
			return err
		}
	}
	fmt.Fprintf(out, "iptables backend: %s (%s)\n", backend, why)

	var installers []*capture.Installer
	in4, err := capture.NewInstaller(backend, capture.IPv4)
	if err != nil {
		return err
	}
	installers = append(installers, in4)
	var in6 *capture.Installer
	if v6.Enabled {
		in6, err = capture.NewInstaller(backend, capture.IPv6)
		if err != nil {
			return refuseV6(v6, err)
		}
	}

	if o.Cleanup {
		if err := in4.Cleanup(capture.IPv4); err != nil {
			return err
		}
		if in6 != nil {
			if err := in6.Cleanup(capture.IPv6); err != nil {
				return err
			}
		}
		fmt.Fprintln(out, "removed egress-guard rules")
		return nil
	}

	changed, err := in4.Apply(capture.BuildPlan(o.Config, capture.IPv4))
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "IPv4 rules %s\n", state(changed))
	if in6 != nil {
		changed, err := in6.Apply(capture.BuildPlan(o.Config, capture.IPv6))
		if err != nil {
			return refuseV6(v6, err)
		}
		fmt.Fprintf(out, "IPv6 rules %s\n", state(changed))
	} else {
		fmt.Fprintln(out, "IPv6 is disabled in this namespace: no ip6tables rules needed")
	}

	if !o.SelfTest {
		return nil
	}
	self, err := selftest.Self()
	if err != nil {
		return err
	}
	uid, gid := probeUser(o.Config)
	probes := []netip.AddrPort{selftest.ProbeV4}
	if in6 != nil && v6.Global != "" {
		probes = append(probes, selftest.ProbeV6)
	}
	for _, probe := range probes {
		err := selftest.Run(self, o.Config.RedirectPort, probe, uid, gid)
		if errors.Is(err, selftest.ErrPortBusy) {
			// A re-run while the sidecar serves the port: the rules were read back and
			// verified above, and the sidecar's own traffic proves the redirect.
			fmt.Fprintf(out, "self-test skipped: port %d is in use (the sidecar is running); rules verified\n", o.Config.RedirectPort)
			return nil
		}
		if err != nil {
			return err
		}
	}
	fmt.Fprintln(out, "self-test passed: connections are redirected to port", o.Config.RedirectPort)
	return nil
}

// refuseV6 fails loudly: leaving IPv6 uncaptured is an open door.
func refuseV6(v6 capture.IPv6Presence, err error) error {
	where := "IPv6 is enabled"
	if v6.Global != "" {
		where = "pod has IPv6 address " + v6.Global
	}
	return fmt.Errorf("%s but ip6tables could not be programmed: %v; refusing to leave IPv6 egress uncaptured", where, err)
}

// probeUser picks an ordinary user for the self-test's client, distinct from the proxy's.
func probeUser(c capture.Config) (uint32, uint32) {
	uid, gid := uint32(65534), uint32(65534)
	if c.ProxyUID == uid || c.ProxyGID == gid {
		uid, gid = 65533, 65533
	}
	return uid, gid
}

func state(changed bool) string {
	if changed {
		return "installed and verified"
	}
	return "already in place (verified, unchanged)"
}

func runCommand(name string, args ...string) (string, error) {
	b, err := exec.Command(name, args...).CombinedOutput()
	return string(b), err
}
