// Command probe sends the kinds of packets an app could use to leave a captured pod without
// TCP, for the end-to-end tests: UDP-Lite datagrams; ICMP/ICMPv6 echo requests through ping
// sockets (SOCK_DGRAM, allowed by net.ipv4.ping_group_range); a forged conntrack "reply" (a
// datagram from the outside host's address, bound with IP(V6)_FREEBIND, which needs no
// privilege, sent to the pod's own address, then datagrams "answering" it to that host); and
// ICMPv6 packet-too-big messages from a raw socket (root's default CAP_NET_RAW). It prints
// what it sent, and what the kernel refused to send; it fails only when a socket cannot be
// opened or the arguments are wrong, so that a test cannot pass because nothing was tried.
//
//	probe udplite ADDR:PORT
//	probe ping ADDR
//	probe forgedreply POD_ADDR HOST_ADDR:PORT
//	probe icmp6raw ADDR
package main

import (
	"fmt"
	"net/netip"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

const count = 3

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "probe:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) == 3 && args[0] == "forgedreply" {
		pod, err := netip.ParseAddr(args[1])
		if err != nil {
			return err
		}
		host, err := netip.ParseAddrPort(args[2])
		if err != nil {
			return err
		}
		return forgedReply(pod, host)
	}
	if len(args) != 2 {
		return fmt.Errorf("usage: probe udplite ADDR:PORT | ping ADDR | forgedreply POD_ADDR HOST_ADDR:PORT | icmp6raw ADDR")
	}
	switch args[0] {
	case "icmp6raw":
		a, err := netip.ParseAddr(args[1])
		if err != nil {
			return err
		}
		// Packet too big (type 2), one of the types IPv6 needs, with data in its body; the
		// raw socket's kernel fills in the checksum.
		return sendType("icmp6raw", a, 0, unix.SOCK_RAW, unix.IPPROTO_ICMPV6, func(i int) []byte {
			return append([]byte{2, 0, 0, 0, 0, 0, 5, 0}, "egress-guard icmp6raw probe"...)
		})
	case "udplite":
		ap, err := netip.ParseAddrPort(args[1])
		if err != nil {
			return err
		}
		return send("udplite", ap.Addr(), ap.Port(), unix.IPPROTO_UDPLITE, func(int) []byte { return []byte("egress-guard udplite probe") })
	case "ping":
		a, err := netip.ParseAddr(args[1])
		if err != nil {
			return err
		}
		proto, typ := unix.IPPROTO_ICMP, byte(8) // echo request
		if a.Is6() {
			proto, typ = unix.IPPROTO_ICMPV6, 128
		}
		// Type, code, checksum and identifier are filled in by the kernel's ping socket
		// (all but the type and code); the sequence number counts.
		return send("ping", a, 0, proto, func(i int) []byte {
			return append([]byte{typ, 0, 0, 0, 0, 0, 0, byte(i + 1)}, "egress-guard ping probe"...)
		})
	}
	return fmt.Errorf("unknown probe %q: want udplite, ping, forgedreply or icmp6raw", args[0])
}

// forgedReply binds a UDP socket to the outside host's address (IP_FREEBIND or
// IPV6_FREEBIND), sends the pod's own address one datagram from it, then sends count
// datagrams from the pod's port 5555 to the host, as if answering it.
func forgedReply(pod netip.Addr, host netip.AddrPort) error {
	const podPort = 5555
	family, hostSA := sockaddr(host.Addr(), host.Port())
	_, podSA := sockaddr(pod, podPort)
	level, opt, unspecified := unix.IPPROTO_IPV6, unix.IPV6_FREEBIND, netip.IPv6Unspecified()
	if family == unix.AF_INET {
		level, opt, unspecified = unix.IPPROTO_IP, unix.IP_FREEBIND, netip.IPv4Unspecified()
	}
	_, anySA := sockaddr(unspecified, podPort)
	forged, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("forgedreply socket: %w", err)
	}
	defer unix.Close(forged)
	if err := unix.SetsockoptInt(forged, level, opt, 1); err != nil {
		return fmt.Errorf("forgedreply freebind: %w", err)
	}
	if err := unix.Bind(forged, hostSA); err != nil {
		return fmt.Errorf("forgedreply bind to %s: %w", host, err)
	}
	fmt.Printf("forgedreply socket open (uid %d gid %d)\n", os.Getuid(), os.Getgid())
	if err := unix.Sendto(forged, []byte("x"), 0, podSA); err != nil {
		fmt.Printf("forged datagram from %s to the pod: not sent: %v\n", host, err)
	} else {
		fmt.Printf("forged datagram from %s to the pod: sent\n", host)
	}
	answer, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("forgedreply socket: %w", err)
	}
	defer unix.Close(answer)
	if err := unix.Bind(answer, anySA); err != nil {
		return fmt.Errorf("forgedreply bind to port %d: %w", podPort, err)
	}
	for i := 0; i < count; i++ {
		if err := unix.Sendto(answer, []byte("egress-guard forged reply probe"), 0, hostSA); err != nil {
			fmt.Printf("reply to %s: not sent: %v\n", host, err)
			continue
		}
		fmt.Printf("reply to %s: sent\n", host)
	}
	return nil
}

// send opens a SOCK_DGRAM socket of proto, sends count packets to addr, and waits briefly
// for answers (echo replies), printing every step.
func send(what string, addr netip.Addr, port uint16, proto int, packet func(int) []byte) error {
	return sendType(what, addr, port, unix.SOCK_DGRAM, proto, packet)
}

// sendType is send with a socket type of its own (SOCK_DGRAM or SOCK_RAW).
func sendType(what string, addr netip.Addr, port uint16, typ, proto int, packet func(int) []byte) error {
	addr = addr.Unmap()
	family, sa := sockaddr(addr, port)
	fd, err := unix.Socket(family, typ|unix.SOCK_CLOEXEC, proto)
	if err != nil {
		return fmt.Errorf("%s socket: %w", what, err)
	}
	defer unix.Close(fd)
	target := netip.AddrPortFrom(addr, port).String()
	if port == 0 {
		target = addr.String()
	}
	fmt.Printf("%s socket open (uid %d gid %d)\n", what, os.Getuid(), os.Getgid())
	for i := 0; i < count; i++ {
		b := packet(i)
		if err := unix.Sendto(fd, b, 0, sa); err != nil {
			fmt.Printf("%s to %s: not sent: %v\n", what, target, err)
			continue
		}
		fmt.Printf("%s to %s: sent %d bytes\n", what, target, len(b))
	}
	tv := unix.NsecToTimeval((300 * time.Millisecond).Nanoseconds())
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	buf := make([]byte, 1500)
	for {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			return nil
		}
		fmt.Printf("%s: received %d bytes from %s\n", what, n, target)
	}
}

// sockaddr is the address family and socket address of addr and port (IPv4-mapped addresses
// as IPv4).
func sockaddr(addr netip.Addr, port uint16) (int, unix.Sockaddr) {
	addr = addr.Unmap()
	if addr.Is4() {
		return unix.AF_INET, &unix.SockaddrInet4{Addr: addr.As4(), Port: int(port)}
	}
	return unix.AF_INET6, &unix.SockaddrInet6{Addr: addr.As16(), Port: int(port)}
}
