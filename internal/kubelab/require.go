package kubelab

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// cacheRoot is where the scripts cache what they build, outside the clone:
// ${EGRESS_GUARD_CACHE:-$HOME/.cache/egress-guard}.
func cacheRoot() string {
	if root := os.Getenv("EGRESS_GUARD_CACHE"); root != "" {
		return root
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return ""
	}
	return filepath.Join(home, ".cache", "egress-guard")
}

// CacheBinDir returns where scripts/k8s-bins.sh puts the binaries:
// ${EGRESS_GUARD_CACHE:-$HOME/.cache/egress-guard}/k8s-v1.37.2.
func CacheBinDir() string { return filepath.Join(cacheRoot(), "k8s-"+KubernetesVersion) }

// HelmVersion is the helm scripts/helm-bin.sh builds.
const HelmVersion = "v4.3.1"

var (
	helmOnce  sync.Once
	helmBuilt string
	helmErr   error
)

// RequireHelm returns the helm binary for a test, as Require does the control plane's:
// $HELM_BIN when set, else the cache of scripts/helm-bin.sh; with CI=true it runs the
// script, else it skips the test saying how to get helm.
func RequireHelm(t testing.TB) string {
	t.Helper()
	if p := os.Getenv("HELM_BIN"); p != "" {
		if !isExecutable(p) {
			t.Fatalf("HELM_BIN=%s is not an executable", p)
		}
		return p
	}
	if p := filepath.Join(cacheRoot(), "helm-"+HelmVersion, "helm"); isExecutable(p) {
		return p
	}
	if os.Getenv("CI") != "true" {
		t.Skip("no helm: run `export HELM_BIN=$(scripts/helm-bin.sh)` (builds helm " + HelmVersion + " once) to run this test")
	}
	helmOnce.Do(func() {
		helmBuilt, helmErr = runScript("helm-bin.sh")
		if helmErr == nil && !isExecutable(helmBuilt) {
			helmErr = fmt.Errorf("scripts/helm-bin.sh printed %q, which is not an executable", helmBuilt)
		}
	})
	if helmErr != nil {
		t.Fatalf("CI=true and no helm: %v", helmErr)
	}
	return helmBuilt
}

func isExecutable(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0
}

func hasBins(dir string) bool {
	for _, b := range []string{"etcd", "kube-apiserver"} {
		if fi, err := os.Stat(filepath.Join(dir, b)); err != nil || fi.IsDir() {
			return false
		}
	}
	return dir != ""
}

var (
	buildOnce sync.Once
	buildDir  string
	buildErr  error
)

// Require returns the directory of the control-plane binaries for a test:
//   - $KUBE_BIN_DIR when set (the test fails if etcd or kube-apiserver is
//     missing there);
//   - else the cache dir of scripts/k8s-bins.sh when it is already built;
//   - else, with CI=true, it runs scripts/k8s-bins.sh (a cold build takes
//     5-8 minutes; better export KUBE_BIN_DIR=$(scripts/k8s-bins.sh) before
//     go test) and fails the test if that fails;
//   - else it skips the test, saying how to get the binaries.
func Require(t testing.TB) string {
	t.Helper()
	if dir := os.Getenv("KUBE_BIN_DIR"); dir != "" {
		if !hasBins(dir) {
			t.Fatalf("KUBE_BIN_DIR=%s has no etcd and kube-apiserver: run scripts/k8s-bins.sh and export KUBE_BIN_DIR to the directory it prints", dir)
		}
		return dir
	}
	if dir := CacheBinDir(); hasBins(dir) {
		return dir
	}
	if os.Getenv("CI") != "true" {
		t.Skip("kubelab: no Kubernetes control-plane binaries: run `export KUBE_BIN_DIR=$(scripts/k8s-bins.sh)` (builds once, 5-8 min) to run this test")
	}
	buildOnce.Do(func() { buildDir, buildErr = runBinsScript() })
	if buildErr != nil {
		t.Fatalf("kubelab: CI=true and no binaries: %v", buildErr)
	}
	return buildDir
}

// runBinsScript runs scripts/k8s-bins.sh and returns the directory it prints.
func runBinsScript() (string, error) {
	dir, err := runScript("k8s-bins.sh")
	if err == nil && !hasBins(dir) {
		err = fmt.Errorf("scripts/k8s-bins.sh printed %q, which has no etcd and kube-apiserver", dir)
	}
	return dir, err
}

// runScript finds scripts/<name> above the working directory, runs it and returns what it
// prints on stdout (a path).
func runScript(name string) (string, error) {
	wd, err := os.Getwd()
	if err != nil {
		return "", err
	}
	script := ""
	for d := wd; ; d = filepath.Dir(d) {
		p := filepath.Join(d, "scripts", name)
		if _, err := os.Stat(p); err == nil {
			script = p
			break
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("scripts/%s not found above %s", name, wd)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "bash", script)
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("%s: %v\n%s", script, err, stderr.String())
	}
	return strings.TrimSpace(stdout.String()), nil
}

// StartForTest is Require + Start, with Stop in t.Cleanup. It fails the test
// if the cluster does not start, and logs the tail of the apiserver's log
// when the test fails.
func StartForTest(t testing.TB, opts Options) *Cluster {
	t.Helper()
	if opts.BinDir == "" {
		opts.BinDir = Require(t)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	start := time.Now()
	c, err := Start(ctx, opts)
	if err != nil {
		t.Fatalf("kubelab: %v", err)
	}
	t.Logf("kubelab: control plane %s up at %s in %v", KubernetesVersion, c.URL(), time.Since(start).Round(time.Millisecond))
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("kube-apiserver log tail:\n%s", c.LogTail("kube-apiserver", 6000))
			if tail := c.LogTail("kube-controller-manager", 3000); tail != "" {
				t.Logf("kube-controller-manager log tail:\n%s", tail)
			}
		}
		c.Stop()
	})
	return c
}
