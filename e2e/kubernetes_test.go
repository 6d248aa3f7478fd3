package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/egress-guard/egress-guard/controller/inject"
	"github.com/egress-guard/egress-guard/internal/kubelab"
	"github.com/egress-guard/egress-guard/internal/netlab"
	"github.com/egress-guard/egress-guard/pkg/contract"
)

// The platform team's path, end to end against a real API server and controller manager:
// helm install the chart with the injector, run the control plane as a process behind the
// chart's own Service (its ClusterIP is on loopback) with the chart's certificate and
// environment, label a namespace, create a Deployment — and the pods the real ReplicaSet
// controller creates come out injected through the chart's own webhook configuration.
func TestHelmInstallInjectsDeploymentPods(t *testing.T) {
	helm := kubelab.RequireHelm(t)
	binDir := kubelab.Require(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cl, err := kubelab.Start(ctx, kubelab.Options{BinDir: binDir})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Stop()
	if err := cl.StartControllerManager(ctx); err != nil {
		t.Fatal(err)
	}
	c := cl.Client()
	const ns, release = "egress-guard", "eg"
	if _, err := cl.CreateNamespace(ns); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	values := filepath.Join(dir, "values.yaml")
	os.WriteFile(values, []byte(`
injector:
  enabled: true
policy:
  identities:
    shop:
      service_accounts: ["shop/*"]
      allowed_destinations: ["api.example.com"]
`), 0o644)
	root, _ := filepath.Abs("..")
	run := func(args ...string) string {
		out, err := exec.CommandContext(ctx, helm, append(args, "--kubeconfig", cl.Kubeconfig())...).CombinedOutput()
		if err != nil {
			t.Fatalf("helm %v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	run("install", release, filepath.Join(root, "charts", "egress-guard"), "-n", ns, "-f", values)

	// The control plane behind the chart's Service: its address, certificate, policy and
	// environment are the chart's; only file paths and the API access are this test's.
	fullname := release + "-egress-guard"
	svc, err := c.CoreV1().Services(ns).Get(ctx, fullname, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	sec, err := c.CoreV1().Secrets(ns).Get(ctx, fullname+"-tls", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cm, err := c.CoreV1().ConfigMaps(ns).Get(ctx, fullname+"-policy", metav1.GetOptions{})
	if err != nil {
		cms, _ := c.CoreV1().ConfigMaps(ns).List(ctx, metav1.ListOptions{})
		t.Fatalf("policy ConfigMap: %v (have %d)", err, len(cms.Items))
	}
	files := map[string][]byte{"tls.crt": sec.Data["tls.crt"], "tls.key": sec.Data["tls.key"], "ca.crt": sec.Data["ca.crt"],
		"egress-policy.yaml": []byte(cm.Data["egress-policy.yaml"])}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	dep, err := c.AppsV1().Deployments(ns).Get(ctx, fullname, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	env := []string{}
	for _, e := range dep.Spec.Template.Spec.Containers[0].Env {
		switch e.Name {
		case "TLS_CERT_FILE", "TLS_KEY_FILE", "INJECT_CA_FILE", contract.EnvPolicyPath:
			continue
		}
		env = append(env, e.Name+"="+e.Value)
	}
	clusterIP := svc.Spec.ClusterIP
	if !strings.HasPrefix(clusterIP, "127.") {
		t.Fatalf("ClusterIP %s is not on loopback: the API server would dial it", clusterIP)
	}
	env = append(env, "LISTEN_ADDR="+clusterIP, "KUBECONFIG="+cl.Kubeconfig(),
		"TLS_CERT_FILE="+filepath.Join(dir, "tls.crt"), "TLS_KEY_FILE="+filepath.Join(dir, "tls.key"),
		"INJECT_CA_FILE="+filepath.Join(dir, "ca.crt"), contract.EnvPolicyPath+"="+filepath.Join(dir, "egress-policy.yaml"))
	cp, err := netlab.StartHost(binary(t, "./cmd/egress-guard-controller"), env)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		cp.Stop(5 * time.Second)
		if t.Failed() {
			t.Logf("controller log tail:\n%s", cp.Tail(30))
		}
	}()
	if err := waitHostReady(fmt.Sprintf("http://%s:9090/ready", clusterIP), cp); err != nil {
		t.Fatal(err)
	}

	// A workload team labels its namespace and deploys, with no proxy settings.
	if _, err := c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{
		Name: "shop", Labels: map[string]string{inject.LabelInject: "enabled"}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	two := int32(2)
	labels := map[string]string{"app": "web"}
	if _, err := c.AppsV1().Deployments("shop").Create(ctx, &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: appsv1.DeploymentSpec{
			Replicas: &two,
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "app:1"}}},
			},
		},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	var pods []corev1.Pod
	deadline := time.Now().Add(60 * time.Second)
	for {
		list, err := c.CoreV1().Pods("shop").List(ctx, metav1.ListOptions{LabelSelector: "app=web"})
		if err == nil && len(list.Items) == 2 {
			pods = list.Items
			break
		}
		if time.Now().After(deadline) {
			rs, _ := c.AppsV1().ReplicaSets("shop").List(ctx, metav1.ListOptions{})
			msg := ""
			for _, r := range rs.Items {
				for _, cond := range r.Status.Conditions {
					msg += cond.Message + "; "
				}
			}
			t.Fatalf("the ReplicaSet controller made no injected pods: %v %s", err, msg)
		}
		time.Sleep(200 * time.Millisecond)
	}
	for _, p := range pods {
		var names []string
		for _, ic := range p.Spec.InitContainers {
			names = append(names, ic.Name)
		}
		if strings.Join(names, ",") != contract.InitContainer+","+contract.SidecarContainer || p.Annotations[inject.AnnotationStatus] == "" {
			t.Fatalf("pod %s: init containers %v, status %q", p.Name, names, p.Annotations[inject.AnnotationStatus])
		}
		if got := p.Spec.InitContainers[1].Env; len(got) == 0 || got[1].Value != "https://"+fullname+"."+ns+".svc:443" {
			t.Fatalf("pod %s: sidecar env %v", p.Name, got)
		}
	}

	run("uninstall", release, "-n", ns)
	if _, err := c.AdmissionregistrationV1().MutatingWebhookConfigurations().Get(ctx, fullname+"-"+ns, metav1.GetOptions{}); err == nil {
		t.Fatal("helm uninstall left the webhook configuration")
	}
}
