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

// CacheBinDir returns where scripts/k8s-bins.sh puts the binaries:
// ${EGRESS_GUARD_CACHE:-$HOME/.cache/egress-guard}/k8s-v1.37.2.
func CacheBinDir() string {
	root := os.Getenv("EGRESS_GUARD_CACHE")
	if root == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return ""
		}
		root = filepath.Join(home, ".cache", "egress-guard")
	}
	return filepath.Join(root, "k8s-"+KubernetesVersion)
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

// runBinsScript finds scripts/k8s-bins.sh above the working directory and
// runs it, returning the directory it prints.
func runBinsScript() (string, error) {
	wd, err := os.Getwd()
	if err != nil {
		return "", err
	}
	script := ""
	for d := wd; ; d = filepath.Dir(d) {
		p := filepath.Join(d, "scripts", "k8s-bins.sh")
		if _, err := os.Stat(p); err == nil {
			script = p
			break
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("scripts/k8s-bins.sh not found above %s", wd)
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
	dir := strings.TrimSpace(stdout.String())
	if !hasBins(dir) {
		return "", fmt.Errorf("%s printed %q, which has no etcd and kube-apiserver", script, dir)
	}
	return dir, nil
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
