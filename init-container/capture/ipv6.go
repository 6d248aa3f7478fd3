package capture

import (
	"fmt"
	"os"
	"strings"

	"github.com/vishvananda/netlink"
)

// IPv6Presence describes whether the namespace can send IPv6 beyond loopback, with the
// address that proves it.
type IPv6Presence struct {
	Enabled bool   // the kernel has IPv6 in this namespace
	Global  string // a non-loopback, non-link-local address and its interface, if any
}

// DetectIPv6 lists the namespace's addresses with netlink. A pod with any non-loopback IPv6
// address must have its IPv6 captured; link-local addresses alone cannot reach a proxy-less
// destination off-link in a cluster, but an IPv6-enabled kernel can gain a global address
// later (router advertisements), so Enabled is reported too.
func DetectIPv6() (IPv6Presence, error) {
	if _, err := os.Stat("/proc/sys/net/ipv6"); err != nil {
		return IPv6Presence{}, nil
	}
	p := IPv6Presence{Enabled: true}
	if b, err := os.ReadFile("/proc/sys/net/ipv6/conf/all/disable_ipv6"); err == nil && strings.TrimSpace(string(b)) == "1" {
		p.Enabled = false
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
			return p, nil
		}
	}
	return p, nil
}
