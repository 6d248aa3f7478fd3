// Command probe sends the kinds of packets an unprivileged app could use to leave a captured
// pod without TCP, for the end-to-end tests: UDP-Lite datagrams, and ICMP/ICMPv6 echo
// requests through ping sockets (SOCK_DGRAM, allowed by net.ipv4.ping_group_range). It
// prints what it sent, and what the kernel refused to send; it fails only when the socket
// cannot be opened or the arguments are wrong, so that a test cannot pass because nothing
// was tried.
//
//	probe udplite ADDR:PORT
//	probe ping ADDR
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
	if len(args) != 2 {
		return fmt.Errorf("usage: probe udplite ADDR:PORT | probe ping ADDR")
	}
	switch args[0] {
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
	return fmt.Errorf("unknown probe %q: want udplite or ping", args[0])
}

// send opens a SOCK_DGRAM socket of proto, sends count packets to addr, and waits briefly
// for answers (echo replies), printing every step.
func send(what string, addr netip.Addr, port uint16, proto int, packet func(int) []byte) error {
	addr = addr.Unmap()
	family, sa := unix.AF_INET6, unix.Sockaddr(&unix.SockaddrInet6{Addr: addr.As16(), Port: int(port)})
	if addr.Is4() {
		family, sa = unix.AF_INET, &unix.SockaddrInet4{Addr: addr.As4(), Port: int(port)}
	}
	fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, proto)
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
