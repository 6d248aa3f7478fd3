package certreload

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func writePair(t *testing.T, dir, cn string) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), DNSNames: []string{cn}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, _ := x509.MarshalECPrivateKey(key)
	os.WriteFile(filepath.Join(dir, "tls.crt"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	os.WriteFile(filepath.Join(dir, "tls.key"), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600)
}

func served(t *testing.T, r *Reloader) string {
	t.Helper()
	c, err := r.GetCertificate(&tls.ClientHelloInfo{})
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(c.Certificate[0])
	return leaf.Subject.CommonName
}

func TestReloadsChangedFilesAndKeepsTheLastGood(t *testing.T) {
	dir := t.TempDir()
	writePair(t, dir, "first")
	var errs []error
	r, err := New(filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key"))
	if err != nil {
		t.Fatal(err)
	}
	r.OnError = func(e error) { errs = append(errs, e) }
	if cn := served(t, r); cn != "first" {
		t.Fatalf("serving %q", cn)
	}
	writePair(t, dir, "second")
	r.checked = time.Time{} // as if a second had passed
	if cn := served(t, r); cn != "second" {
		t.Fatalf("after renewal serving %q, want second", cn)
	}
	os.WriteFile(filepath.Join(dir, "tls.key"), []byte("garbage"), 0o600)
	r.checked = time.Time{}
	if cn := served(t, r); cn != "second" || len(errs) != 1 {
		t.Fatalf("a broken pair replaced the good one: serving %q, errors %v", cn, errs)
	}
	if _, err := New(filepath.Join(dir, "tls.crt"), filepath.Join(dir, "missing")); err == nil {
		t.Fatal("a missing key accepted at start")
	}
}
