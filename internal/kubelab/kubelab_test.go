package kubelab_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/egress-guard/egress-guard/internal/kubelab"
)

// One control plane for the whole package: starting one costs 3-5 s.
var (
	sharedOnce    sync.Once
	sharedCluster *kubelab.Cluster
	sharedErr     error
)

func cluster(t *testing.T) *kubelab.Cluster {
	t.Helper()
	bin := kubelab.Require(t)
	sharedOnce.Do(func() {
		start := time.Now()
		sharedCluster, sharedErr = kubelab.Start(context.Background(), kubelab.Options{BinDir: bin})
		if sharedErr == nil {
			fmt.Fprintf(os.Stderr, "kubelab: control plane %s up at %s in %v\n",
				kubelab.KubernetesVersion, sharedCluster.URL(), time.Since(start).Round(time.Millisecond))
		}
	})
	if sharedErr != nil {
		t.Fatal(sharedErr)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("kube-apiserver log tail:\n%s", sharedCluster.LogTail("kube-apiserver", 6000))
		}
	})
	return sharedCluster
}

func TestMain(m *testing.M) {
	code := m.Run()
	if sharedCluster != nil {
		sharedCluster.Stop()
	}
	os.Exit(code)
}

// TestTokenRequestReview proves the harness end to end: a real apiserver
// issues a pod-bound token for audience "egress-guard", and its TokenReview
// API accepts it for that audience only, and only while the Pod exists.
func TestTokenRequestReview(t *testing.T) {
	c := cluster(t)
	const ns, sa, pod = "kubelab-t1", "app-sa", "app"

	if _, err := c.CreateNamespace(ns); err != nil {
		t.Fatal(err)
	}
	if _, err := c.CreateServiceAccount(ns, sa); err != nil {
		t.Fatal(err)
	}
	p, err := c.CreatePod(ns, pod, sa)
	if err != nil {
		t.Fatal(err)
	}
	if p.Spec.ServiceAccountName != sa || p.UID == "" {
		t.Fatalf("created pod: sa %q uid %q", p.Spec.ServiceAccountName, p.UID)
	}

	tok, err := c.Token(ns, sa, "egress-guard", time.Hour, pod)
	if err != nil {
		t.Fatal(err)
	}

	st, err := c.ReviewToken(tok, "egress-guard")
	if err != nil {
		t.Fatal(err)
	}
	want := "system:serviceaccount:" + ns + ":" + sa
	if !st.Authenticated || st.User.Username != want {
		t.Fatalf("review(egress-guard): authenticated=%v user=%q error=%q; want %s", st.Authenticated, st.User.Username, st.Error, want)
	}
	if got := st.User.Extra["authentication.kubernetes.io/pod-name"]; len(got) != 1 || got[0] != pod {
		t.Errorf("pod-name extra = %v, want [%s]", got, pod)
	}
	if got := st.User.Extra["authentication.kubernetes.io/pod-uid"]; len(got) != 1 || got[0] != string(p.UID) {
		t.Errorf("pod-uid extra = %v, want [%s]", got, p.UID)
	}
	if len(st.Audiences) != 1 || st.Audiences[0] != "egress-guard" {
		t.Errorf("audiences = %v", st.Audiences)
	}

	st, err = c.ReviewToken(tok, "other")
	if err != nil {
		t.Fatal(err)
	}
	if st.Authenticated {
		t.Fatalf("review(other): authenticated as %q, want rejected", st.User.Username)
	}
	t.Logf("review(other): %s", st.Error)

	// A second token bound to the same Pod, not reviewed before the Pod goes.
	fresh, err := c.Token(ns, sa, "egress-guard", time.Hour, pod)
	if err != nil {
		t.Fatal(err)
	}

	if err := c.DeletePod(ns, pod); err != nil {
		t.Fatal(err)
	}
	// The apiserver looks the Pod up through an informer first, which can lag
	// the delete by a moment.
	rejectedWithin(t, c, fresh, 5*time.Second)

	// The apiserver caches successful token authentications for 10 s
	// (TokenSuccessCacheTTL, no flag), so the token reviewed above keeps
	// authenticating for up to 10 s after its Pod is deleted. Checking that
	// costs those 10 s; run with KUBELAB_SLOW=1 to include it.
	if os.Getenv("KUBELAB_SLOW") == "1" {
		rejectedWithin(t, c, tok, 15*time.Second)
	}
}

// rejectedWithin polls TokenReview until tok is no longer authenticated for
// "egress-guard".
func rejectedWithin(t *testing.T, c *kubelab.Cluster, tok string, d time.Duration) {
	t.Helper()
	start := time.Now()
	for {
		st, err := c.ReviewToken(tok, "egress-guard")
		if err != nil {
			t.Fatal(err)
		}
		if !st.Authenticated {
			t.Logf("review after pod deletion (%v): %s", time.Since(start).Round(time.Millisecond), st.Error)
			return
		}
		if time.Since(start) > d {
			t.Fatalf("token still authenticates as %q %v after its pod was deleted", st.User.Username, d)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestClientAccess checks the other ways in: the kubeconfig file (as
// client-go and kubectl load it) and the CA bundle.
func TestClientAccess(t *testing.T) {
	c := cluster(t)
	if !strings.HasPrefix(c.URL(), "https://127.0.0.1:") {
		t.Errorf("URL = %s", c.URL())
	}
	if !strings.Contains(string(c.CAPEM()), "BEGIN CERTIFICATE") {
		t.Errorf("CAPEM is not PEM")
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", c.Kubeconfig())
	if err != nil {
		t.Fatal(err)
	}
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	v, err := cs.Discovery().ServerVersion()
	if err != nil {
		t.Fatal(err)
	}
	if v.GitVersion != kubelab.KubernetesVersion {
		t.Errorf("server version %s, want %s (version ldflags missing?)", v.GitVersion, kubelab.KubernetesVersion)
	}
	svc, err := cs.CoreV1().Services("default").Get(ctx, "kubernetes", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(svc.Spec.ClusterIP, "127.100.0.") {
		t.Errorf("kubernetes Service ClusterIP %s is not in the loopback service CIDR", svc.Spec.ClusterIP)
	}

	kubectl := c.BinDir() + "/kubectl"
	if _, err := os.Stat(kubectl); err == nil {
		out, err := exec.Command(kubectl, "--kubeconfig", c.Kubeconfig(), "get", "namespace", "kube-system", "-o", "name").CombinedOutput()
		if err != nil || strings.TrimSpace(string(out)) != "namespace/kube-system" {
			t.Errorf("kubectl get namespace: %v: %s", err, out)
		}
	}

	if !c.HasControllerManager() {
		return
	}
	// With the controller manager, new namespaces get their default
	// ServiceAccount.
	if err := c.StartControllerManager(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := c.CreateNamespace("kubelab-kcm"); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := c.Client().CoreV1().ServiceAccounts("kubelab-kcm").Get(ctx, "default", metav1.GetOptions{})
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no default ServiceAccount in a new namespace with the controller manager: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
