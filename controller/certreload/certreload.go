// Package certreload serves a TLS certificate from files that may be replaced while the
// server runs (cert-manager renews them; a Secret volume swaps them behind a symlink). The
// files are read again, at most once a second, when a handshake needs the certificate; a
// pair that fails to load keeps the last good one in service.
package certreload

import (
	"bytes"
	"crypto/tls"
	"fmt"
	"os"
	"sync"
	"time"
)

// Reloader is a tls.Config.GetCertificate that follows the files.
type Reloader struct {
	CertFile, KeyFile string
	// OnError is told when a changed pair cannot be loaded (the last good one stays).
	OnError func(error)

	mu      sync.Mutex
	cert    *tls.Certificate
	certPEM []byte
	keyPEM  []byte
	checked time.Time
}

// New loads the pair once; a pair that does not load at start is an error.
func New(certFile, keyFile string) (*Reloader, error) {
	r := &Reloader{CertFile: certFile, KeyFile: keyFile}
	if err := r.reload(); err != nil {
		return nil, err
	}
	r.checked = time.Now()
	return r, nil
}

// GetCertificate implements tls.Config.GetCertificate.
func (r *Reloader) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if time.Since(r.checked) >= time.Second {
		r.checked = time.Now()
		if err := r.reloadLocked(); err != nil && r.OnError != nil {
			r.OnError(err)
		}
	}
	return r.cert, nil
}

func (r *Reloader) reload() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.reloadLocked()
}

// reloadLocked reads both files and swaps the certificate when their content changed.
func (r *Reloader) reloadLocked() error {
	certPEM, err := os.ReadFile(r.CertFile)
	if err != nil {
		return fmt.Errorf("serving certificate: %w", err)
	}
	keyPEM, err := os.ReadFile(r.KeyFile)
	if err != nil {
		return fmt.Errorf("serving key: %w", err)
	}
	if r.cert != nil && bytes.Equal(certPEM, r.certPEM) && bytes.Equal(keyPEM, r.keyPEM) {
		return nil
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		// A renewal writes the two files one after the other: a mismatch now usually
		// resolves itself within a second.
		return fmt.Errorf("serving certificate %s / %s: %w", r.CertFile, r.KeyFile, err)
	}
	r.cert, r.certPEM, r.keyPEM = &cert, certPEM, keyPEM
	return nil
}
