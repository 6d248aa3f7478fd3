package policy

import (
	"errors"
	"fmt"
	"strings"
)

// ParseServiceAccountSelector validates a ServiceAccount selector of the policy,
// "namespace/name" or "namespace/*", and returns it in its normal form.
func ParseServiceAccountSelector(s string) (string, error) {
	ns, name, ok := strings.Cut(strings.TrimSpace(s), "/")
	if !ok {
		return "", errors.New(`a ServiceAccount selector is "namespace/name" or "namespace/*"`)
	}
	if err := validLabel(ns); err != nil {
		return "", fmt.Errorf("namespace %q: %v", ns, err)
	}
	if name != "*" {
		if err := validSubdomain(name); err != nil {
			return "", fmt.Errorf("ServiceAccount name %q: %v", name, err)
		}
	}
	return ns + "/" + name, nil
}

// ServiceAccountFromUsername returns the namespace and name of a ServiceAccount user as the
// API server authenticates it ("system:serviceaccount:<namespace>:<name>"); ok is false for
// any other user, or when either part is not a valid Kubernetes name.
func ServiceAccountFromUsername(user string) (namespace, name string, ok bool) {
	rest, found := strings.CutPrefix(user, "system:serviceaccount:")
	if !found {
		return "", "", false
	}
	namespace, name, found = strings.Cut(rest, ":")
	if !found || validLabel(namespace) != nil || validSubdomain(name) != nil {
		return "", "", false
	}
	return namespace, name, true
}

// IdentityForServiceAccount returns the identity a ServiceAccount maps to: the one that
// selects "namespace/name" exactly, else the one that selects "namespace/*", else nil.
func (p *Policy) IdentityForServiceAccount(namespace, name string) *Identity {
	if id := p.bySA[namespace+"/"+name]; id != nil {
		return id
	}
	return p.bySA[namespace+"/*"]
}

// validLabel checks an RFC 1123 label (a namespace name): lower-case alphanumerics and '-',
// starting and ending alphanumeric, at most 63 characters.
func validLabel(s string) error {
	if s == "" || len(s) > 63 {
		return errors.New("want 1 to 63 characters")
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		alnum := c >= 'a' && c <= 'z' || c >= '0' && c <= '9'
		if !alnum && (c != '-' || i == 0 || i == len(s)-1) {
			return errors.New("want lower-case letters, digits and inner '-'")
		}
	}
	return nil
}

// validSubdomain checks an RFC 1123 subdomain (a ServiceAccount name): dot-separated labels,
// at most 253 characters.
func validSubdomain(s string) error {
	if s == "" || len(s) > 253 {
		return errors.New("want 1 to 253 characters")
	}
	for _, l := range strings.Split(s, ".") {
		if err := validLabel(l); err != nil {
			return errors.New("want dot-separated lower-case labels of letters, digits and inner '-'")
		}
	}
	return nil
}
