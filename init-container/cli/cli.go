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
	"github.com/egress-guard/egress-guard/pkg/contract"
	"github.com/egress-guard/egress-guard/pkg/settings"
)

// Options are the parsed flags.
type Options struct {
	Config   capture.Config
	ProxyGID uint32 // --proxy-gid: accepted for compatibility, exempts nothing
	DryRun   bool
	Cleanup  bool
	SelfTest bool
	Backend  string
}

// Environment variables of the installer's own switches (the ones the pod contract shares are
// in pkg/contract).
const (
	EnvIPTablesBackend = "IPTABLES_BACKEND"
	EnvDryRun          = "DRY_RUN"
	EnvCleanup         = "CLEANUP"
	EnvSelfTest        = "SELF_TEST"
)

const name = contract.InitContainer

// declare returns the installer's settings, each writing into o. resolvConf is named in the
// usage of --dns-servers, whose empty default means "the nameservers of resolvConf".
func declare(o *Options, resolvConf string) *settings.Set {
	var s settings.Set
	c := &o.Config
	s.Func(contract.EnvProxyUID, "proxy-uid", strconv.Itoa(contract.ProxyUID),
		"UID of the sidecar, whose traffic is not captured; 0 is refused", func(v string) error {
			n, err := strconv.ParseUint(v, 10, 32)
			switch {
			case err != nil:
				return errors.New("want a number")
			case n == 0:
				return errors.New("0 would exempt every root process from capture")
			}
			c.ProxyUID = uint32(n)
			return nil
		})
	s.Uint32(&o.ProxyGID, contract.EnvProxyGID, "proxy-gid", strconv.Itoa(contract.ProxyGID),
		"deprecated, unused: accepted for compatibility; a group exempts nothing from capture (an app can run with any group), only --proxy-uid does")
	s.Port(&c.RedirectPort, contract.EnvRedirectPort, "redirect-port", strconv.Itoa(contract.TransparentPort), "the sidecar's transparent port")
	s.Prefixes(&c.ExcludeCIDRs, contract.EnvExcludeCIDRs, "exclude-cidrs", "", "comma-separated destination CIDRs not captured")
	s.Ports(&c.ExcludePorts, contract.EnvExcludePorts, "exclude-ports", "", "comma-separated destination TCP ports not captured")
	s.Addrs(&c.DNSServers, contract.EnvDNSServers, "dns-servers", "", "comma-separated resolvers DNS may go to; default: the nameservers of "+resolvConf)
	s.OneOf(&c.UDPPolicy, []string{capture.UDPDrop, capture.UDPReject, capture.UDPAllow}, contract.EnvUDPPolicy, "udp-policy", capture.UDPDrop,
		"non-DNS UDP: drop (QUIC falls back to TCP, which is captured), reject or allow; other non-TCP egress (UDP-Lite, ICMP echo, raw IP) is always dropped")
	s.OneOf(&o.Backend, []string{"auto", string(capture.BackendNFT), string(capture.BackendLegacy)}, EnvIPTablesBackend, "iptables-backend", "auto",
		"auto (look at which nat table holds rules), nft or legacy")
	s.Bool(&o.DryRun, EnvDryRun, "dry-run", "false", "print the plan and change nothing")
	s.Bool(&o.Cleanup, EnvCleanup, "cleanup", "false", "remove egress-guard's rules and nothing else")
	s.Bool(&o.SelfTest, EnvSelfTest, "self-test", "true", "after applying, prove redirection works")
	return &s
}

// Parse reads flags, with environment variables as defaults. resolvConf is read for the DNS
// servers when none are given. --help returns flag.ErrHelp.
func Parse(args []string, getenv func(string) string, resolvConf string) (Options, error) {
	var o Options
	if err := declare(&o, resolvConf).Load(name, args, getenv); err != nil {
		return Options{}, err
	}
	if len(o.Config.DNSServers) == 0 {
		servers, err := nameservers(resolvConf)
		if err != nil {
			return Options{}, err
		}
		o.Config.DNSServers = servers
	}
	return o, nil
}

// PrintUsage writes the --help text.
func PrintUsage(w io.Writer, resolvConf string) {
	fmt.Fprintf(w, "Usage: %s [flags]\n\n", name)
	fmt.Fprintf(w, "Installs, verifies and self-tests the iptables rules that send the pod's outbound TCP to\n")
	fmt.Fprintf(w, "the egress-guard sidecar and drop its other egress (only DNS to the resolvers, --udp-policy\n")
	fmt.Fprintf(w, "allow UDP, exclusions and replies to connections made to the pod leave directly). IPv6 is\n")
	fmt.Fprintf(w, "captured whenever the kernel has it. Each flag can also be set by its environment variable;\n")
	fmt.Fprintf(w, "a flag wins.\n\n")
	declare(new(Options), resolvConf).PrintUsage(w)
	fmt.Fprintf(w, "\nExit codes: 0 done, 1 failed, 2 bad usage.\n")
}

// nameservers reads the nameserver lines of a resolv.conf (dropping an IPv6 zone).
func nameservers(path string) ([]netip.Addr, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read DNS servers from %s (or give --dns-servers): %w", path, err)
	}
	defer f.Close()
	var out []netip.Addr
	var bad []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 2 && fields[0] == "nameserver" {
			v := strings.SplitN(fields[1], "%", 2)[0]
			a, err := netip.ParseAddr(v)
			if err != nil {
				bad = append(bad, fmt.Sprintf("%q", fields[1]))
				continue
			}
			out = append(out, a.Unmap())
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read DNS servers from %s (or give --dns-servers): %w", path, err)
	}
	if len(bad) > 0 {
		return nil, fmt.Errorf("nameserver in %s: %s: want an IP address (or give --dns-servers)", path, strings.Join(bad, ", "))
	}
	return out, nil
}

const defaultResolvConf = "/etc/resolv.conf"

// Main runs the program and returns its exit code: 0 done, 1 failed, 2 bad usage.
func Main(args []string, stdout, stderr io.Writer) int {
	if len(args) == 2 && args[0] == selftest.ClientFlag {
		if err := selftest.Client(args[1]); err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
		return 0
	}
	o, err := Parse(args, os.Getenv, defaultResolvConf)
	if errors.Is(err, flag.ErrHelp) {
		PrintUsage(stdout, defaultResolvConf)
		return 0
	}
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
	if v6.Kernel {
		families = append(families, capture.IPv6)
	}
	if o.DryRun {
		for _, fam := range families {
			fmt.Fprint(out, capture.BuildPlan(o.Config, fam))
		}
		switch {
		case !v6.Kernel:
			fmt.Fprintln(out, "# the kernel has no IPv6 in this namespace: no ip6tables rules")
		case v6.Enabled == "":
			fmt.Fprintln(out, "# IPv6 is disabled on every interface: its rules are applied if ip6tables works, skipped if not")
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
	if v6.Kernel {
		in6, err = capture.NewInstaller(backend, capture.IPv6)
		if err != nil {
			if err := refuseV6(v6, err); err != nil {
				return err
			}
			fmt.Fprintf(out, "IPv6 is disabled on every interface and ip6tables cannot be used (%v): no ip6tables rules\n", err)
			in6 = nil
		}
	}

	if o.Cleanup {
		if err := in4.Cleanup(capture.BuildPlan(o.Config, capture.IPv4)); err != nil {
			return err
		}
		if in6 != nil {
			if err := in6.Cleanup(capture.BuildPlan(o.Config, capture.IPv6)); err != nil {
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
	switch {
	case in6 != nil:
		changed, err := in6.Apply(capture.BuildPlan(o.Config, capture.IPv6))
		if err != nil {
			if err := refuseV6(v6, err); err != nil {
				return err
			}
			fmt.Fprintf(out, "IPv6 is disabled on every interface and its rules could not be applied (%v)\n", err)
			in6 = nil
			break
		}
		if v6.Enabled == "" {
			fmt.Fprintln(out, "IPv6 is disabled on every interface; its rules are installed anyway")
		}
		fmt.Fprintf(out, "IPv6 rules %s\n", state(changed))
	case !v6.Kernel:
		fmt.Fprintln(out, "the kernel has no IPv6 in this namespace: no ip6tables rules needed")
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

// refuseV6 fails loudly when IPv6 can be sent: leaving it uncaptured is an open door. With
// IPv6 disabled on every interface (which only CAP_NET_ADMIN can undo) nothing can be sent
// uncaptured, and it returns nil.
func refuseV6(v6 capture.IPv6Presence, err error) error {
	if v6.Enabled == "" {
		return nil
	}
	where := "IPv6 is enabled (" + v6.Enabled + ")"
	if v6.Global != "" {
		where = "pod has IPv6 address " + v6.Global
	}
	return fmt.Errorf("%s but ip6tables could not be programmed: %v; refusing to leave IPv6 egress uncaptured", where, err)
}

// probeUser picks the user of the self-test's client: this program's own (root in the init
// container), whose traffic the rules capture like any app's since only the proxy's UID is
// exempt. Switching to another user would need CAP_SETUID and CAP_SETGID, which the
// injected init container does not have (only NET_ADMIN and NET_RAW). Only when this
// program runs as the proxy's own UID (exempt, so never redirected) does the client switch
// to an ordinary user.
func probeUser(c capture.Config) (uint32, uint32) {
	uid, gid := uint32(os.Getuid()), uint32(os.Getgid())
	if uid != c.ProxyUID {
		return uid, gid
	}
	uid, gid = 65534, 65534
	if c.ProxyUID == uid {
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
