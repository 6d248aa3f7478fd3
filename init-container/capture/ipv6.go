package capture

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/vishvananda/netlink"
)

// IPv6Presence describes whether the namespace's kernel has IPv6 and whether it can send
// IPv6 now, with what proves it.
type IPv6Presence struct {
	// Kernel: the kernel has IPv6 in this namespace (/proc/sys/net/ipv6 or /proc/net/if_inet6
	// exists). Its rules are then always installed: net.ipv6.conf.all.disable_ipv6=1 does not
	// stop an interface whose own disable_ipv6 is 0 from carrying IPv6.
	Kernel bool
	// Enabled names what can carry IPv6 now ("interface eth0", "default for new interfaces",
	// "address ... on ..."); empty when IPv6 is disabled on every interface, which only
	// CAP_NET_ADMIN can undo.
	Enabled string
	Global  string // a non-loopback, non-link-local address and its interface, if any
}

// DetectIPv6 reads the namespace's IPv6 state from /proc and its addresses with netlink. A
// namespace whose kernel has IPv6 must have its IPv6 captured; link-local addresses alone
// cannot reach a proxy-less destination off-link in a cluster, but an enabled interface can
// gain a global address later (router advertisements).
func DetectIPv6() (IPv6Presence, error) {
	p := detectIPv6Proc("/proc")
	if !p.Kernel {
		return p, nil
	}
	links, err := netlink.LinkList()
	if err != nil {
		return p, fmt.Errorf("list interfaces: %w", err)
	}
	for _, l := range links {
		addrs, err := netlink.AddrList(l, netlink.FAMILY_V6)
		if err != nil {
			return p, fmt.Errorf("list addresses of %s: %w", l.Attrs().Name, err)
		}
		for _, a := range addrs {
			if a.IP.IsLoopback() || a.IP.IsLinkLocalUnicast() {
				continue
			}
			p.Global = fmt.Sprintf("%s on %s", a.IP, l.Attrs().Name)
			if p.Enabled == "" {
				p.Enabled = "address " + p.Global
			}
			return p, nil
		}
	}
	return p, nil
}

// detectIPv6Proc reads IPv6's presence under proc (normally /proc). IPv6 counts as enabled
// when any interface, or the default for new interfaces, has disable_ipv6 0, or any IPv6
// address exists; a sysctl that cannot be read counts as enabled.
func detectIPv6Proc(proc string) IPv6Presence {
	var p IPv6Presence
	_, errSys := os.Stat(filepath.Join(proc, "sys/net/ipv6"))
	inet6, errAddr := os.ReadFile(filepath.Join(proc, "net/if_inet6"))
	if errSys != nil && errAddr != nil {
		return p
	}
	p.Kernel = true
	// Each line: address, index, prefix length, scope, flags, interface.
	if f := strings.Fields(string(inet6)); len(f) >= 6 {
		p.Enabled = "interface " + f[5] + " has an IPv6 address"
		return p
	}
	confs, err := filepath.Glob(filepath.Join(proc, "sys/net/ipv6/conf/*/disable_ipv6"))
	if err != nil || len(confs) == 0 {
		p.Enabled = "its per-interface settings cannot be read"
		return p
	}
	sort.Strings(confs)
	enabled := func(c string) bool {
		b, err := os.ReadFile(c)
		return err != nil || strings.TrimSpace(string(b)) != "1"
	}
	var dflt string
	for _, c := range confs {
		switch name := filepath.Base(filepath.Dir(c)); name {
		case "all": // writing it sets every interface; the interfaces' own values decide
		case "default":
			dflt = c
		default:
			if enabled(c) {
				p.Enabled = "interface " + name + " has IPv6 (net.ipv6.conf." + name + ".disable_ipv6=0)"
				return p
			}
		}
	}
	if dflt != "" && enabled(dflt) {
		p.Enabled = "new interfaces get IPv6 (net.ipv6.conf.default.disable_ipv6=0)"
	}
	return p
}
