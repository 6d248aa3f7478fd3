// Package netlab builds a small, disposable network for the end-to-end tests and the demo: a
// "pod" network namespace and an "internet" namespace joined by a veth pair, TLS, HTTP and
// echo servers on test addresses, and dnsmasq answering for test names.
//
// Every address is in 198.18.0.0/15 or fd00::/8, inside namespaces this package creates and
// removes. The pod namespace's only route leads to the internet namespace, which has no route
// anywhere else: nothing a test does can leave the machine.
package netlab

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Addresses of the lab.
const (
	PodV4     = "198.18.0.1"
	NetV4     = "198.18.0.2"
	PodV6     = "fd00:18::1"
	NetV6     = "fd00:18::2"
	DNSServer = "198.18.1.53"
)

// Host is a test server: a name (or several) and its addresses. Names may also resolve to
// addresses where nothing listens (for example 169.254.169.254); list those in Records.
type Host struct {
	Names []string
	V4    string // served in the internet namespace when not empty
	V6    string
}

// NS is a network namespace created by this package.
type NS struct{ Name string }

// Run runs a command inside the namespace and returns its combined output.
func (n *NS) Run(ctx context.Context, args ...string) (string, error) {
	cmd := n.Command(ctx, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if err != nil {
		return out.String(), fmt.Errorf("%s (in %s): %w: %s", strings.Join(args, " "), n.Name, err, strings.TrimSpace(out.String()))
	}
	return out.String(), nil
}

// Command prepares a command inside the namespace.
func (n *NS) Command(ctx context.Context, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", n.Name}, args...)...)
}

// Do runs fn on an OS thread switched into the namespace. Sockets created by fn stay in the
// namespace after the thread switches back.
func (n *NS) Do(fn func() error) error {
	runtime.LockOSThread()
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer orig.Close()
	target, err := os.Open(filepath.Join("/run/netns", n.Name))
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("setns %s: %w", n.Name, err)
	}
	ferr := fn()
	if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
		// The thread is in the wrong namespace: leave it locked so the runtime retires it.
		return fmt.Errorf("restore netns: %w", err)
	}
	runtime.UnlockOSThread()
	return ferr
}

// Listen listens on addr inside the namespace.
func (n *NS) Listen(network, addr string) (net.Listener, error) {
	var ln net.Listener
	err := n.Do(func() (err error) { ln, err = net.Listen(network, addr); return })
	return ln, err
}

// ListenPacket opens a datagram socket on addr inside the namespace.
func (n *NS) ListenPacket(network, addr string) (net.PacketConn, error) {
	var pc net.PacketConn
	err := n.Do(func() (err error) { pc, err = net.ListenPacket(network, addr); return })
	return pc, err
}

// Dial connects from inside the namespace.
func (n *NS) Dial(network, addr string, timeout time.Duration) (net.Conn, error) {
	var c net.Conn
	err := n.Do(func() (err error) { c, err = net.DialTimeout(network, addr, timeout); return })
	return c, err
}

// NewNS creates a namespace with lo up; Delete removes it.
func NewNS(ctx context.Context, name string) (*NS, error) {
	exec.Command("ip", "netns", "del", name).Run() // a leftover of a killed run
	if out, err := exec.CommandContext(ctx, "ip", "netns", "add", name).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("ip netns add %s: %v: %s", name, err, out)
	}
	ns := &NS{Name: name}
	if _, err := ns.Run(ctx, "ip", "link", "set", "lo", "up"); err != nil {
		ns.Delete()
		return nil, err
	}
	return ns, nil
}

// Delete removes the namespace.
func (n *NS) Delete() { exec.Command("ip", "netns", "del", n.Name).Run() }

// Lab is the whole test network.
type Lab struct {
	Pod, Net *NS
	Dir      string // temporary files: CA, dnsmasq pid
	CA       *CA
	CAFile   string

	mu       sync.Mutex
	accepted map[string]*atomic.Int64 // per server IP
	closers  []func()
}

// Up creates the lab. prefix names the namespaces (keep it short and unique per run).
// records are extra DNS names mapped to addresses (for example to 169.254.169.254).
func Up(ctx context.Context, prefix string, hosts []Host, records map[string][]string) (_ *Lab, err error) {
	dir, err := os.MkdirTemp("", "egress-guard-lab-")
	if err != nil {
		return nil, err
	}
	os.Chmod(dir, 0o755) // apps in the lab run as ordinary users and read the CA file
	lab := &Lab{Pod: &NS{prefix + "-pod"}, Net: &NS{prefix + "-net"}, Dir: dir, accepted: map[string]*atomic.Int64{}}
	defer func() {
		if err != nil {
			lab.Down()
		}
	}()
	lab.closers = append(lab.closers, func() { os.RemoveAll(dir) })
	for _, ns := range []*NS{lab.Pod, lab.Net} {
		if _, err := NewNS(ctx, ns.Name); err != nil {
			return nil, err
		}
		name := ns.Name
		lab.closers = append(lab.closers, func() { exec.Command("ip", "netns", "del", name).Run() })
	}
	podIf, netIf := "eg0", "eg1"
	steps := [][]string{
		{"ip", "link", "add", podIf, "netns", lab.Pod.Name, "type", "veth", "peer", "name", netIf, "netns", lab.Net.Name},
	}
	for _, s := range steps {
		if out, err := exec.CommandContext(ctx, s[0], s[1:]...).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("%s: %v: %s", strings.Join(s, " "), err, out)
		}
	}
	podCmds := [][]string{
		{"ip", "addr", "add", PodV4 + "/24", "dev", podIf},
		{"ip", "-6", "addr", "add", PodV6 + "/64", "dev", podIf, "nodad"},
		{"ip", "link", "set", podIf, "up"},
		{"ip", "route", "add", "default", "via", NetV4},
		{"ip", "-6", "route", "add", "default", "via", NetV6},
	}
	netCmds := [][]string{
		{"ip", "addr", "add", NetV4 + "/24", "dev", netIf},
		{"ip", "-6", "addr", "add", NetV6 + "/64", "dev", netIf, "nodad"},
		{"ip", "link", "set", netIf, "up"},
		// Server addresses live on lo: local to this namespace, reached from the pod
		// through the veth (no dummy interface: not every kernel has the module).
		{"ip", "addr", "add", DNSServer + "/32", "dev", "lo"},
	}
	for _, h := range hosts {
		if h.V4 != "" {
			netCmds = append(netCmds, []string{"ip", "addr", "add", h.V4 + "/32", "dev", "lo"})
		}
		if h.V6 != "" {
			netCmds = append(netCmds, []string{"ip", "-6", "addr", "add", h.V6 + "/128", "dev", "lo", "nodad"})
		}
	}
	for _, c := range podCmds {
		if _, err := lab.Pod.Run(ctx, c...); err != nil {
			return nil, err
		}
	}
	for _, c := range netCmds {
		if _, err := lab.Net.Run(ctx, c...); err != nil {
			return nil, err
		}
	}

	if lab.CA, err = NewCA(); err != nil {
		return nil, err
	}
	lab.CAFile = filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(lab.CAFile, lab.CA.PEM, 0o644); err != nil {
		return nil, err
	}
	var names []string
	for _, h := range hosts {
		names = append(names, h.Names...)
	}
	cert, err := lab.CA.Issue(names...)
	if err != nil {
		return nil, err
	}
	for _, h := range hosts {
		for _, ip := range []string{h.V4, h.V6} {
			if ip != "" {
				if err := lab.serve(ip, cert); err != nil {
					return nil, err
				}
			}
		}
	}
	if err := lab.startDNS(ctx, hosts, records); err != nil {
		return nil, err
	}
	return lab, nil
}

// Down removes everything Up created. It is safe to call more than once.
func (l *Lab) Down() {
	l.mu.Lock()
	closers := l.closers
	l.closers = nil
	l.mu.Unlock()
	for i := len(closers) - 1; i >= 0; i-- {
		closers[i]()
	}
}

// Accepted returns how many connections the servers on ip accepted.
func (l *Lab) Accepted(ip string) int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	if c := l.accepted[ip]; c != nil {
		return c.Load()
	}
	return 0
}

func (l *Lab) counter(ip string) *atomic.Int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.accepted[ip] == nil {
		l.accepted[ip] = new(atomic.Int64)
	}
	return l.accepted[ip]
}

// Ports every server address listens on.
const (
	PortHTTP    = 80
	PortTLS     = 443
	PortTLSAlt  = 8443
	PortEcho    = 7
	PortBanner  = 25 // server-first: writes a banner, then echoes
	BannerGreet = "220 egress-guard-lab ESMTP\r\n"
)

// serve starts HTTP, TLS, echo and banner servers on ip inside the internet namespace. HTTP
// responses name the server address and the host asked for, so tests can tell where a
// request really went.
func (l *Lab) serve(ip string, cert tls.Certificate) error {
	count := l.counter(ip)
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from %s (host %s)\n", ip, r.Host)
	})
	listen := func(port int) (net.Listener, error) {
		ln, err := l.Net.Listen("tcp", net.JoinHostPort(ip, fmt.Sprint(port)))
		if err != nil {
			return nil, err
		}
		ln = &CountingListener{Listener: ln, N: count}
		l.closers = append(l.closers, func() { ln.Close() })
		return ln, nil
	}
	for _, port := range []int{PortHTTP, PortTLS, PortTLSAlt} {
		ln, err := listen(port)
		if err != nil {
			return err
		}
		srv := &http.Server{Handler: handler, ReadHeaderTimeout: 5 * time.Second, ErrorLog: nil}
		if port != PortHTTP {
			srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}}
			go srv.ServeTLS(ln, "", "")
		} else {
			go srv.Serve(ln)
		}
	}
	for _, port := range []int{PortEcho, PortBanner} {
		ln, err := listen(port)
		if err != nil {
			return err
		}
		banner := port == PortBanner
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func() {
					defer c.Close()
					c.SetDeadline(time.Now().Add(time.Minute))
					if banner {
						io.WriteString(c, BannerGreet)
					}
					io.Copy(c, c)
				}()
			}
		}()
	}
	return nil
}

// CountingListener counts the connections it accepts in N: a test server's proof that a
// denied destination never saw one.
type CountingListener struct {
	net.Listener
	N *atomic.Int64
}

func (c *CountingListener) Accept() (net.Conn, error) {
	conn, err := c.Listener.Accept()
	if err == nil {
		c.N.Add(1)
	}
	return conn, err
}

// startDNS runs dnsmasq in the internet namespace, answering only for the lab's names.
func (l *Lab) startDNS(ctx context.Context, hosts []Host, records map[string][]string) error {
	args := []string{"dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-poll",
		"--bind-interfaces", "--listen-address=" + DNSServer, "--port=53", "--conf-file=/dev/null",
		"--user=root", "--group=root", "--pid-file=" + filepath.Join(l.Dir, "dnsmasq.pid"), "--log-facility=-",
		// The lab's zones are answered locally: a name in them that the lab does not define
		// does not exist (NXDOMAIN), as on the internet, rather than REFUSED for want of an
		// upstream.
		"--local=/example.com/", "--local=/test/"}
	rec := map[string][]string{}
	for _, h := range hosts {
		for _, n := range h.Names {
			if h.V4 != "" {
				rec[n] = append(rec[n], h.V4)
			}
			if h.V6 != "" {
				rec[n] = append(rec[n], h.V6)
			}
		}
	}
	for n, addrs := range records {
		rec[n] = append(rec[n], addrs...)
	}
	names := make([]string, 0, len(rec))
	for n := range rec {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		// --address=/name/ip answers this name and names below it that the lab does not
		// define itself; one flag per address gives several records.
		for _, a := range rec[n] {
			args = append(args, "--address=/"+n+"/"+a)
		}
	}
	cmd := exec.Command("ip", append([]string{"netns", "exec", l.Net.Name}, args...)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start dnsmasq: %w", err)
	}
	l.closers = append(l.closers, func() { cmd.Process.Kill(); cmd.Wait() })
	// Ready when it answers.
	r := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		return l.Pod.Dial(network, DNSServer+":53", time.Second)
	}}
	deadline := time.Now().Add(10 * time.Second)
	for {
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		_, err := r.LookupNetIP(cctx, "ip", names[0])
		cancel()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("dnsmasq not answering for %s: %v; output: %s", names[0], err, out.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// CA is a throwaway certificate authority for the lab's TLS servers.
type CA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	PEM  []byte
}

// NewCA makes a CA valid for a day.
func NewCA() (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "egress-guard lab CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		KeyUsage:              x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	cert, _ := x509.ParseCertificate(der)
	return &CA{cert: cert, key: key, PEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}, nil
}

// Issue makes a server certificate for names (IP strings become IP SANs).
func (ca *CA) Issue(names ...string) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: "lab server"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, n := range names {
		if a, err := netip.ParseAddr(n); err == nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, a.AsSlice())
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, n)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}

// Require reports what is missing to run the lab: root, and the commands it uses.
func Require(commands ...string) error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("needs root to create network namespaces (running as uid %d)", os.Geteuid())
	}
	var missing []string
	for _, c := range append([]string{"ip", "dnsmasq"}, commands...) {
		if _, err := exec.LookPath(c); err != nil {
			missing = append(missing, c)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("needs %s on PATH (scripts/deps.sh installs them)", strings.Join(missing, ", "))
	}
	if _, err := os.Stat("/proc/thread-self/ns/net"); err != nil {
		return errors.New("needs network namespaces (/proc/thread-self/ns/net)")
	}
	return nil
}
