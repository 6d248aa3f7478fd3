// Package selftest proves, after the capture rules are installed, that they really redirect:
// a connection made as an ordinary (non-proxy) user to an outside test address must arrive at
// a listener on the redirect port, with SO_ORIGINAL_DST naming that outside address.
package selftest

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"syscall"
	"time"

	"github.com/egress-guard/egress-guard/pkg/origdst"
)

// Probe addresses: test addresses that never leave the namespace, because the rules being
// tested redirect them to the local listener (and if the rules are broken, nothing answers
// there, which is what the self-test reports).
var (
	ProbeV4 = netip.MustParseAddrPort("198.18.255.254:9")
	ProbeV6 = netip.MustParseAddrPort("[fd00:ffff::fe]:9")
)

// ClientFlag makes the program act as the probe's client (see Client).
const ClientFlag = "--self-test-client"

// ErrPortBusy means something (normally the sidecar itself, on a re-run) already listens on
// the redirect port, so the probe cannot take it.
var ErrPortBusy = errors.New("the redirect port is already in use")

// Run listens on the redirect port on loopback, has a child process running as uid/gid
// connect to probe, and checks the original destination of what arrives. The child keeps
// this process's credentials when uid/gid are its own (no CAP_SETUID needed).
func Run(self string, redirectPort uint16, probe netip.AddrPort, uid, gid uint32) error {
	host := "127.0.0.1"
	if probe.Addr().Is6() {
		host = "::1"
	}
	ln, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(int(redirectPort))))
	if errors.Is(err, syscall.EADDRINUSE) {
		return ErrPortBusy
	}
	if err != nil {
		return fmt.Errorf("self-test: listen on the redirect port %d: %w", redirectPort, err)
	}
	defer ln.Close()

	cmd := exec.Command(self, ClientFlag, probe.String())
	if uid != uint32(os.Getuid()) || gid != uint32(os.Getgid()) {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid}}
	}
	out := make(chan error, 1)
	go func() {
		b, err := cmd.CombinedOutput()
		if err != nil {
			err = fmt.Errorf("%w: %s", err, b)
		}
		out <- err
	}()

	ln.(*net.TCPListener).SetDeadline(time.Now().Add(5 * time.Second))
	c, err := ln.Accept()
	if err != nil {
		cerr := <-out
		return fmt.Errorf("self-test: a connection to %s as uid %d was not redirected to port %d (client: %v): %w", probe, uid, redirectPort, cerr, err)
	}
	defer c.Close()
	got, err := origdst.OriginalDst(c.(*net.TCPConn))
	if err != nil {
		return fmt.Errorf("self-test: %w", err)
	}
	if got != probe {
		return fmt.Errorf("self-test: original destination %s, want %s", got, probe)
	}
	c.Close()
	if err := <-out; err != nil {
		return fmt.Errorf("self-test client: %w", err)
	}
	return nil
}

// Client is the probe's client side: connect and return.
func Client(target string) error {
	c, err := net.DialTimeout("tcp", target, 3*time.Second)
	if err != nil {
		return err
	}
	c.Close()
	return nil
}

// Self returns the path of the running executable, for re-executing as the probe client.
func Self() (string, error) {
	p, err := os.Executable()
	if err != nil {
		return "", errors.New("self-test: cannot find own executable")
	}
	return p, nil
}
