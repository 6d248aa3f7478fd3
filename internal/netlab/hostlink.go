package netlab

import (
	"crypto/ecdsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
)

// Addresses of the link between this (the host's) network namespace and the pod, for
// services the tests run on the host that a pod must reach (a control plane next to a real
// API server on the host's loopback). 198.18.0.0/15, like every lab address.
const (
	HostLinkHost = "198.19.254.1"
	HostLinkPod  = "198.19.254.2"
)

// LinkHost connects the pod namespace to the host's with a veth pair (/30 on each side) and
// returns the host side's address. It is removed with the lab, or by the returned function.
func (l *Lab) LinkHost() (string, func(), error) {
	host := "eghost" + fmt.Sprint(os.Getpid()%10000)
	peer := host + "p"
	steps := [][]string{
		{"ip", "link", "add", host, "type", "veth", "peer", "name", peer},
		{"ip", "link", "set", peer, "netns", l.Pod.Name},
		{"ip", "addr", "add", HostLinkHost + "/30", "dev", host},
		{"ip", "link", "set", host, "up"},
		{"ip", "netns", "exec", l.Pod.Name, "ip", "addr", "add", HostLinkPod + "/30", "dev", peer},
		{"ip", "netns", "exec", l.Pod.Name, "ip", "link", "set", peer, "up"},
	}
	remove := func() { exec.Command("ip", "link", "del", host).Run() }
	for _, s := range steps {
		if out, err := exec.Command(s[0], s[1:]...).CombinedOutput(); err != nil {
			remove()
			return "", nil, fmt.Errorf("%s: %v: %s", strings.Join(s, " "), err, out)
		}
	}
	l.mu.Lock()
	l.closers = append(l.closers, remove)
	l.mu.Unlock()
	return HostLinkHost, remove, nil
}

// WriteKeyPair writes a certificate (as issued by CA.Issue) and its key as PEM files, for
// programs that read their serving certificate from files.
func WriteKeyPair(cert tls.Certificate, certFile, keyFile string) error {
	key, ok := cert.PrivateKey.(*ecdsa.PrivateKey)
	if !ok || len(cert.Certificate) == 0 {
		return errors.New("want an ECDSA certificate from CA.Issue")
	}
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Certificate[0]}), 0o644); err != nil {
		return err
	}
	return os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), 0o600)
}
