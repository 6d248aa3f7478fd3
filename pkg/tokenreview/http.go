package tokenreview

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// In-cluster defaults: where the kubelet mounts a pod's API credentials.
const (
	InClusterTokenPath = "/var/run/secrets/kubernetes.io/serviceaccount/token"
	InClusterCAPath    = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
)

// HTTPReviewer sends a TokenReview to the API server over one HTTPS call, authenticated with
// its own ServiceAccount token (re-read on every call: the kubelet rotates it). It needs RBAC
// for tokenreviews: create.
type HTTPReviewer struct {
	URL       string // the API server, e.g. https://kubernetes.default.svc
	TokenPath string // the reviewer's own credential
	client    *http.Client
}

// NewHTTPReviewer returns a reviewer for apiURL, trusting the CA certificates in caPath.
// Empty arguments mean the in-cluster values (KUBERNETES_SERVICE_HOST/PORT and the mounted
// ServiceAccount files).
func NewHTTPReviewer(apiURL, tokenPath, caPath string) (*HTTPReviewer, error) {
	if apiURL == "" {
		host, port := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")
		if host == "" || port == "" {
			return nil, fmt.Errorf("token review: no API server: not in a cluster (KUBERNETES_SERVICE_HOST unset) and no URL configured")
		}
		apiURL = "https://" + net.JoinHostPort(host, port)
	}
	if tokenPath == "" {
		tokenPath = InClusterTokenPath
	}
	if caPath == "" {
		caPath = InClusterCAPath
	}
	pem, err := os.ReadFile(caPath)
	if err != nil {
		return nil, fmt.Errorf("token review: API server CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("token review: no certificate in %s", caPath)
	}
	return &HTTPReviewer{
		URL:       strings.TrimSuffix(apiURL, "/"),
		TokenPath: tokenPath,
		client: &http.Client{
			Timeout: 10 * time.Second,
			Transport: &http.Transport{
				Proxy:               nil,
				TLSClientConfig:     &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12},
				MaxIdleConnsPerHost: 4,
				IdleConnTimeout:     90 * time.Second,
			},
		},
	}, nil
}

// Review implements Reviewer.
func (r *HTTPReviewer) Review(ctx context.Context, token string, audiences []string) (bool, string, error) {
	cred, err := os.ReadFile(r.TokenPath)
	if err != nil {
		return false, "", fmt.Errorf("token review: own credential: %w", err)
	}
	body, err := json.Marshal(authnv1.TokenReview{
		TypeMeta: metaTypeMeta(),
		Spec:     authnv1.TokenReviewSpec{Token: token, Audiences: audiences},
	})
	if err != nil {
		return false, "", err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, r.URL+"/apis/authentication.k8s.io/v1/tokenreviews", bytes.NewReader(body))
	if err != nil {
		return false, "", err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json")
	req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(cred)))
	resp, err := r.client.Do(req)
	if err != nil {
		return false, "", fmt.Errorf("token review: %w", err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return false, "", fmt.Errorf("token review: reading the answer: %w", err)
	}
	if resp.StatusCode != http.StatusCreated && resp.StatusCode != http.StatusOK {
		// The body is the API server's Status; it never contains the reviewed token.
		return false, "", fmt.Errorf("token review: API server answered %s: %.200s", resp.Status, data)
	}
	var out authnv1.TokenReview
	if err := json.Unmarshal(data, &out); err != nil {
		return false, "", fmt.Errorf("token review: malformed answer: %w", err)
	}
	if !out.Status.Authenticated {
		return false, "", nil
	}
	if !AudiencesGranted(out.Status.Audiences, audiences) {
		return false, "", nil
	}
	return true, out.Status.User.Username, nil
}

// AudiencesGranted reports whether a TokenReview that asked for requested audiences and was
// answered authenticated for granted (status.audiences) holds for one of them. An API server
// that ignores spec.audiences (it should not) must not widen them: every Reviewer checks this.
func AudiencesGranted(granted, requested []string) bool {
	return len(requested) == 0 || overlap(granted, requested)
}

func overlap(a, b []string) bool {
	for _, x := range a {
		for _, y := range b {
			if x == y {
				return true
			}
		}
	}
	return false
}

func metaTypeMeta() metav1.TypeMeta {
	return metav1.TypeMeta{APIVersion: "authentication.k8s.io/v1", Kind: "TokenReview"}
}
