package kubelab

import (
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"os"
	"time"
)

// SignServiceAccountToken signs a ServiceAccount token with the cluster's own signing key,
// with the claims the API server issues (issuer, audience, subject, the kubernetes.io
// namespace and ServiceAccount) and the validity given: the only way to test a token that has
// expired, since TokenRequest refuses lifetimes under ten minutes. uid is the ServiceAccount's.
func (c *Cluster) SignServiceAccountToken(ns, sa, uid, audience string, notBefore, expires time.Time) (string, error) {
	keyPEM, err := os.ReadFile(c.saKeyPath)
	if err != nil {
		return "", err
	}
	block, _ := pem.Decode(keyPEM)
	if block == nil {
		return "", errors.New("kubelab: no PEM in the ServiceAccount key")
	}
	parsed, err := x509.ParsePKCS1PrivateKey(block.Bytes)
	if err != nil {
		k, err2 := x509.ParsePKCS8PrivateKey(block.Bytes)
		if err2 != nil {
			return "", err
		}
		var ok bool
		if parsed, ok = k.(*rsa.PrivateKey); !ok {
			return "", errors.New("kubelab: the ServiceAccount key is not RSA")
		}
	}
	// The key id the API server puts in its tokens' headers: the base64url SHA-256 of the
	// public key's DER.
	pubDER, err := x509.MarshalPKIXPublicKey(&parsed.PublicKey)
	if err != nil {
		return "", err
	}
	kid := sha256.Sum256(pubDER)
	header, _ := json.Marshal(map[string]string{"alg": "RS256", "kid": base64.RawURLEncoding.EncodeToString(kid[:])})
	claims, _ := json.Marshal(map[string]any{
		"iss": c.issuer, "aud": []string{audience}, "sub": "system:serviceaccount:" + ns + ":" + sa,
		"iat": notBefore.Unix(), "nbf": notBefore.Unix(), "exp": expires.Unix(),
		"kubernetes.io": map[string]any{"namespace": ns, "serviceaccount": map[string]string{"name": sa, "uid": uid}},
	})
	signing := base64.RawURLEncoding.EncodeToString(header) + "." + base64.RawURLEncoding.EncodeToString(claims)
	digest := sha256.Sum256([]byte(signing))
	sig, err := rsa.SignPKCS1v15(rand.Reader, parsed, crypto.SHA256, digest[:])
	if err != nil {
		return "", err
	}
	return signing + "." + base64.RawURLEncoding.EncodeToString(sig), nil
}
