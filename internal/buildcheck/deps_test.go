// Package buildcheck holds tests about the build itself: what each shipped binary may link.
package buildcheck

import (
	"os/exec"
	"strings"
	"testing"
)

// deps lists the packages a main package links, through the go command.
func deps(t *testing.T, pkg string) []string {
	t.Helper()
	out, err := exec.Command("go", "list", "-deps", "-f", "{{.ImportPath}}", pkg).Output()
	if err != nil {
		t.Fatalf("go list -deps %s: %v", pkg, err)
	}
	return strings.Fields(string(out))
}

// The proxy and the init container run in every captured pod: Kubernetes client libraries (a
// large dependency tree and tens of MiB of RSS) belong in the control plane only. No shipped
// binary may link test code or the test lab.
func TestShippedBinariesStayLean(t *testing.T) {
	const module = "github.com/egress-guard/egress-guard/"
	forbidden := map[string][]string{
		"../../cmd/egress-guard":            {"k8s.io/client-go", module + "controller", module + "e2e", module + "internal/"},
		"../../cmd/egress-guard-init":       {"k8s.io/", "github.com/prometheus/", module + "e2e", module + "internal/", module + "sidecar", module + "controller"},
		"../../cmd/egress-guard-controller": {module + "e2e", module + "internal/", module + "sidecar"},
		"../../cmd/egress-guard-demo":       {"k8s.io/client-go", module + "e2e"},
	}
	for pkg, bad := range forbidden {
		list := deps(t, pkg)
		// Guard against a vacuous pass: each binary links its own program package.
		if !strings.Contains(strings.Join(list, "\n"), module) {
			t.Fatalf("%s: dependency list %v does not include this module", pkg, list)
		}
		for _, d := range list {
			for _, b := range bad {
				if d == strings.TrimSuffix(b, "/") || strings.HasPrefix(d, b) {
					t.Errorf("%s links %s (forbidden prefix %s)", pkg, d, b)
				}
			}
		}
	}
}
