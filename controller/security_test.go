package controller

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"io"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

// reviewAnswering is a clientset whose TokenReviews answer status.
func reviewAnswering(status authnv1.TokenReviewStatus) *fake.Clientset {
	c := fake.NewClientset()
	c.PrependReactor("create", "tokenreviews", func(a k8stesting.Action) (bool, runtime.Object, error) {
		tr := a.(k8stesting.CreateAction).GetObject().(*authnv1.TokenReview).DeepCopy()
		tr.Status = status
		return true, tr, nil
	})
	return c
}

// The control plane's reviewer checks status.audiences like the proxy's HTTPReviewer: an API
// server that ignores spec.audiences must not widen them.
func TestKubeReviewerChecksAudiences(t *testing.T) {
	user := authnv1.UserInfo{Username: "system:serviceaccount:shop:frontend"}
	for _, c := range []struct {
		name    string
		status  authnv1.TokenReviewStatus
		want    bool
		wantErr bool
	}{
		{"audience granted", authnv1.TokenReviewStatus{Authenticated: true, Audiences: []string{"egress-guard"}, User: user}, true, false},
		{"one of several", authnv1.TokenReviewStatus{Authenticated: true, Audiences: []string{"other", "egress-guard"}, User: user}, true, false},
		{"another audience", authnv1.TokenReviewStatus{Authenticated: true, Audiences: []string{"https://kubernetes.default.svc"}, User: user}, false, false},
		{"no audience", authnv1.TokenReviewStatus{Authenticated: true, User: user}, false, false},
		{"not authenticated", authnv1.TokenReviewStatus{Audiences: []string{"egress-guard"}}, false, false},
	} {
		ok, username, err := kubeReviewer{reviewAnswering(c.status)}.Review(context.Background(), "a.b.c", []string{"egress-guard"})
		if ok != c.want || err != nil {
			t.Errorf("%s: authenticated %v (%v), want %v", c.name, ok, err, c.want)
		}
		if ok && username != user.Username {
			t.Errorf("%s: user %q", c.name, username)
		}
	}
}

// The webhook's http.Server adds "h2" to its TLS config's NextProtos when it starts: the policy
// listener, which speaks HTTP/1.1 only, must not share that config.
func TestWebhookDoesNotChangeThePolicyListenersTLSConfig(t *testing.T) {
	cert := selfSigned(t)
	tlsConfig := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12, NextProtos: []string{"http/1.1"}}
	free, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := free.Addr().(*net.TCPAddr).Port
	free.Close()
	ca := filepath.Join(t.TempDir(), "ca.crt")
	os.WriteFile(ca, []byte("ca"), 0o600)
	cfg := Config{ListenAddr: "127.0.0.1", WebhookPort: uint16(port), InjectCAFile: ca, NativeMode: "true"}
	wh, err := newWebhook(cfg, fake.NewClientset(), slog.New(slog.NewTextHandler(io.Discard, nil)), tlsConfig)
	if err != nil {
		t.Fatal(err)
	}
	defer wh.srv.Close()
	go wh.srv.ServeTLS(wh.ln, "", "")
	// A handshake with the webhook proves it has started (and set up HTTP/2).
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", wh.ln.Addr().String(),
		&tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2", "http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	conn.Close()
	if !slices.Equal(tlsConfig.NextProtos, []string{"http/1.1"}) {
		t.Fatalf("the policy listener's NextProtos became %v after the webhook started, want [http/1.1]", tlsConfig.NextProtos)
	}
}

func selfSigned(t *testing.T) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		DNSNames: []string{"localhost"}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}
