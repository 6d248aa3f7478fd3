package kubelab

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// ControllerManagerControllers are the controllers StartControllerManager
// runs by default: namespace deletion, the "default" ServiceAccount and the
// kube-root-ca.crt ConfigMap in every namespace, garbage collection, and
// Deployment → ReplicaSet → Pod.
var ControllerManagerControllers = []string{
	"namespace-controller",
	"serviceaccount-controller",
	"root-ca-certificate-publisher-controller",
	"garbage-collector-controller",
	"replicaset-controller",
	"deployment-controller",
}

// HasControllerManager reports whether the bin dir holds
// kube-controller-manager.
func (c *Cluster) HasControllerManager() bool {
	_, err := os.Stat(filepath.Join(c.binDir, "kube-controller-manager"))
	return err == nil
}

// StartControllerManager starts kube-controller-manager against the cluster
// with controllers (none means ControllerManagerControllers), and waits until
// it has created the "default" ServiceAccount in namespace "default" (when
// serviceaccount-controller runs). Stop ends it too.
func (c *Cluster) StartControllerManager(ctx context.Context, controllers ...string) error {
	if !c.HasControllerManager() {
		return fmt.Errorf("kubelab: kube-controller-manager not found in %s (run scripts/k8s-bins.sh)", c.binDir)
	}
	if len(controllers) == 0 {
		controllers = ControllerManagerControllers
	}
	kcm, err := c.startProc("kube-controller-manager",
		"--kubeconfig="+c.kubeconfig,
		"--leader-elect=false",
		"--secure-port=0",
		"--controllers="+strings.Join(controllers, ","),
		"--root-ca-file="+filepath.Join(c.dir, "pki", "ca.crt"),
		"--service-account-private-key-file="+c.saKeyPath,
		"--concurrent-namespace-syncs=2",
	)
	if err != nil {
		return err
	}
	waitSA := false
	for _, n := range controllers {
		waitSA = waitSA || n == "serviceaccount-controller"
	}
	if !waitSA {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	for {
		_, err := c.Client().CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{})
		if err == nil {
			return nil
		}
		if !apierrors.IsNotFound(err) && ctx.Err() == nil {
			return fmt.Errorf("kubelab: waiting for the default ServiceAccount: %w", err)
		}
		select {
		case <-kcm.done:
			return kcm.exitError()
		case <-ctx.Done():
			return fmt.Errorf("kubelab: kube-controller-manager did not create default/default ServiceAccount: %w\nlog tail:\n%s",
				ctx.Err(), kcm.tail(4000))
		case <-time.After(100 * time.Millisecond):
		}
	}
}
