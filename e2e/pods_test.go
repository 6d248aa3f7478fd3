package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/egress-guard/egress-guard/controller/inject"
	"github.com/egress-guard/egress-guard/internal/kubelab"
	"github.com/egress-guard/egress-guard/internal/netlab"
	"github.com/egress-guard/egress-guard/pkg/contract"
)

// Images the real-pod test runs (scripts/images.sh builds them; tags as it gives them).
const (
	imageSidecar    = "localhost/egress-guard:dev" // the proxy: gateway and injected sidecar
	imageController = "localhost/egress-guard-controller:dev"
	imageInit       = "localhost/egress-guard-init:dev"
	imagePause      = "localhost/egress-guard-e2e/pause:1"
	// The app: Debian's curl, a client nobody here wrote.
	imageCurl = "localhost/egress-guard-e2e/curl:1"
)

// Test hosts in the node's network namespace: pods reach them through the bridge's gateway.
const (
	allowedHost = "198.18.127.10"
	deniedHost  = "198.18.127.11"
	hostPort    = "18080"
)

// requireImages returns the image tarballs of scripts/images.sh: $EGRESS_GUARD_IMAGES when
// set, else (CI=true) it runs the script, else it skips saying how to build them.
func requireImages(t *testing.T) []string {
	t.Helper()
	dir := os.Getenv("EGRESS_GUARD_IMAGES")
	if dir == "" {
		if os.Getenv("CI") != "true" {
			t.Skip("no images: run `export EGRESS_GUARD_IMAGES=$(scripts/images.sh)` (buildah, cached) to run this test")
		}
		out, err := exec.Command("bash", "../scripts/images.sh").Output()
		if err != nil {
			t.Fatalf("CI=true and scripts/images.sh failed: %v", err)
		}
		dir = strings.TrimSpace(string(out))
	}
	var tars []string
	for _, n := range []string{"egress-guard.tar", "egress-guard-controller.tar", "egress-guard-init.tar", "pause.tar", "curl.tar"} {
		p := filepath.Join(dir, n)
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("image %s: %v (scripts/images.sh builds it)", p, err)
		}
		tars = append(tars, p)
	}
	return tars
}

// The whole product on a real node: the platform team installs the chart (the control plane
// runs from its own image as a real pod behind its Service and webhook; the sidecar is
// injected from the proxy image), a workload team annotates a
// Deployment, and the pods the kubelet runs on containerd come out captured: the init
// container installs and verifies the rules in the pod's own network namespace, the native
// sidecar gets its identity and policy from the control plane with its projected token,
// and the app — no proxy settings — reaches the allowed host and is refused the other, with
// decision lines naming the pod's identity. A Job completes; deleting a pod drains its
// sidecar.
func TestRealPodsAreCapturedAndDecided(t *testing.T) {
	require(t, kubelab.NodeCommands...)
	binDir := kubelab.Require(t)
	helm := kubelab.RequireHelm(t)
	images := requireImages(t)
	ctx, cancel := context.WithTimeout(context.Background(), 12*time.Minute)
	defer cancel()

	start := time.Now()
	node, err := kubelab.StartNode(ctx, kubelab.NodeOptions{BinDir: binDir, Images: images, SandboxImage: imagePause})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("node Ready in %v", time.Since(start).Round(time.Millisecond))
	defer func() {
		if t.Failed() {
			for _, c := range []string{"kubelet", "containerd", "kube-apiserver"} {
				t.Logf("%s log tail:\n%s", c, node.LogTail(c, 3000))
			}
			out, _ := node.Kubectl(context.Background(), "get", "pods", "-A", "-o", "wide")
			t.Logf("pods:\n%s", out)
			out, _ = node.Kubectl(context.Background(), "get", "events", "-A")
			t.Logf("events:\n%s", out)
		}
		node.Stop()
	}()
	c := node.Client()

	// The "internet": two plain HTTP servers in the node's namespace.
	var deniedAccepts atomic.Int64
	for _, ip := range []string{allowedHost, deniedHost} {
		if _, err := node.NS.Run(ctx, "ip", "addr", "add", ip+"/32", "dev", "lo"); err != nil {
			t.Fatal(err)
		}
		ln, err := node.NS.Listen("tcp", net.JoinHostPort(ip, hostPort))
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		body := "hello from " + ip
		if ip == deniedHost {
			ln = &netlab.CountingListener{Listener: ln, N: &deniedAccepts}
		}
		go http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, body) }))
	}

	// The platform team's install.
	const ns, release = "egress-guard", "eg"
	fullname := release + "-egress-guard"
	values := filepath.Join(t.TempDir(), "values.yaml")
	os.WriteFile(values, []byte(fmt.Sprintf(`
image:
  repository: %s
  tag: %s
  pullPolicy: Never
controller:
  image:
    repository: %s
    tag: %s
injector:
  enabled: true
  initImage:
    repository: %s
    tag: %s
policy:
  identities:
    shop:
      service_accounts: ["shop/*"]
      allowed_destinations: ["%s:%s"]
`, repo(imageSidecar), tag(imageSidecar), repo(imageController), tag(imageController), repo(imageInit), tag(imageInit), allowedHost, hostPort)), 0o644)
	root, _ := filepath.Abs("..")
	start = time.Now()
	if out, err := exec.CommandContext(ctx, helm, "install", release, filepath.Join(root, "charts", "egress-guard"),
		"-n", ns, "--create-namespace", "-f", values, "--wait", "--timeout", "4m", "--kubeconfig", node.Kubeconfig()).CombinedOutput(); err != nil {
		t.Fatalf("helm install: %v\n%s", err, out)
	}
	t.Logf("helm install --wait (control plane pods Ready) in %v", time.Since(start).Round(time.Millisecond))
	// The control plane runs from its own image, not the proxy's.
	cps, err := c.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=controller"})
	if err != nil {
		t.Fatal(err)
	}
	if len(cps.Items) == 0 {
		t.Fatal("no control plane pods")
	}
	for _, p := range cps.Items {
		if img := p.Spec.Containers[0].Image; img != imageController {
			t.Fatalf("control plane pod %s runs %s, want %s", p.Name, img, imageController)
		}
	}
	// The cluster DNS answers the control plane's Service name, as CoreDNS would.
	if err := node.SetServiceDNS(ctx, ns, fullname); err != nil {
		t.Fatal(err)
	}

	// The workload team: one annotation on the pod template, no proxy settings.
	if _, err := c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	one, uid, grace := int32(1), int64(1000), int64(5)
	labels := map[string]string{"app": "web"}
	annotated := metav1.ObjectMeta{Labels: labels, Annotations: map[string]string{inject.AnnotationInject: "true"}}
	app := corev1.Container{Name: "app", Image: imageCurl, ImagePullPolicy: corev1.PullNever,
		Command: []string{"sleep", "3600"}, SecurityContext: &corev1.SecurityContext{RunAsUser: &uid}}
	if _, err := c.AppsV1().Deployments("shop").Create(ctx, &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: appsv1.DeploymentSpec{
			Replicas: &one,
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{ObjectMeta: annotated, Spec: corev1.PodSpec{
				TerminationGracePeriodSeconds: &grace, Containers: []corev1.Container{app}}},
		},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	pod := waitPodReady(ctx, t, node, "shop", "app=web")
	var inits []string
	for _, ic := range pod.Spec.InitContainers {
		inits = append(inits, ic.Name)
	}
	if strings.Join(inits, ",") != "egress-guard-init,egress-guard" || pod.Spec.InitContainers[1].RestartPolicy == nil ||
		*pod.Spec.InitContainers[1].RestartPolicy != corev1.ContainerRestartPolicyAlways {
		t.Fatalf("init containers %v: want the capture init container, then the native sidecar", inits)
	}
	if img := pod.Spec.InitContainers[1].Image; img != imageSidecar {
		t.Fatalf("the injected sidecar runs %s, want the proxy image %s", img, imageSidecar)
	}
	if pod.Annotations[inject.AnnotationStatus] == "" {
		t.Fatalf("pod has no %s annotation", inject.AnnotationStatus)
	}

	// The init container installed and verified capture in the pod's own namespace.
	initLog, err := node.Kubectl(ctx, "logs", "-n", "shop", pod.Name, "-c", "egress-guard-init")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"IPv4 rules installed and verified", "IPv6 rules installed and verified", "self-test passed"} {
		if !strings.Contains(initLog, want) {
			t.Fatalf("init container log lacks %q:\n%s", want, initLog)
		}
	}

	side := podLog{node: node, ns: "shop", pod: pod.Name, container: "egress-guard"}
	inApp := func(args ...string) (string, error) {
		return node.Kubectl(ctx, append([]string{"exec", "-n", "shop", pod.Name, "-c", "app", "--"}, args...)...)
	}

	// Allowed: the app's plain HTTP reaches the host, decided under the pod's identity.
	mark := side.mark(ctx, t)
	out, err := inApp("curl", "-sS", "--max-time", "10", "http://"+allowedHost+":"+hostPort+"/")
	if err != nil || strings.TrimSpace(out) != "hello from "+allowedHost {
		t.Fatalf("allowed host: %q, %v", out, err)
	}
	side.wait(ctx, t, mark, "decision", map[string]string{"identity": "shop", "target": allowedHost + ":" + hostPort,
		"action": "allowed", "reason": "rule"})

	// The sidecar's Go runtime runs with what the injector set (the chart's goMaxProcs 1 and
	// 80 % of the 128Mi memory limit), as its own metrics report from inside the pod.
	metricsOut, err := inApp("curl", "-sS", "--max-time", "10", fmt.Sprintf("http://127.0.0.1:%d/metrics", contract.AdminPort))
	if err != nil {
		t.Fatalf("sidecar metrics: %v", err)
	}
	for _, want := range []string{"go_sched_gomaxprocs_threads 1\n", "go_gc_gomemlimit_bytes 1.07374176e+08\n"} {
		if !strings.Contains(metricsOut, want) {
			t.Fatalf("sidecar metrics lack %q", strings.TrimSpace(want))
		}
	}

	// Denied: no rule names it; the server never sees a connection.
	mark = side.mark(ctx, t)
	if out, err := inApp("curl", "-sS", "--max-time", "10", "http://"+deniedHost+":"+hostPort+"/"); err == nil {
		t.Fatalf("denied host answered: %q", out)
	}
	side.wait(ctx, t, mark, "decision", map[string]string{"identity": "shop", "target": deniedHost + ":" + hostPort,
		"action": "denied", "reason": "no_matching_rule"})
	if n := deniedAccepts.Load(); n != 0 {
		t.Fatalf("the denied host accepted %d connections", n)
	}

	// A Job completes: its native sidecar does not keep the pod running.
	never := corev1.RestartPolicyNever
	backoff := int32(0)
	if _, err := c.BatchV1().Jobs("shop").Create(ctx, &batchv1.Job{
		ObjectMeta: metav1.ObjectMeta{Name: "fetch"},
		Spec: batchv1.JobSpec{BackoffLimit: &backoff, Template: corev1.PodTemplateSpec{
			ObjectMeta: metav1.ObjectMeta{Annotations: map[string]string{inject.AnnotationInject: "true"}},
			Spec: corev1.PodSpec{RestartPolicy: never, Containers: []corev1.Container{{
				Name: "fetch", Image: imageCurl, ImagePullPolicy: corev1.PullNever, SecurityContext: &corev1.SecurityContext{RunAsUser: &uid},
				Command: []string{"curl", "-sS", "--max-time", "10", "http://" + allowedHost + ":" + hostPort + "/"}}}}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	for {
		j, err := c.BatchV1().Jobs("shop").Get(ctx, "fetch", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if j.Status.Succeeded == 1 {
			out, err := node.Kubectl(ctx, "logs", "-n", "shop", "job/fetch", "-c", "fetch")
			if err != nil || strings.TrimSpace(out) != "hello from "+allowedHost {
				t.Fatalf("job's output %q, %v", out, err)
			}
			break
		}
		if j.Status.Failed > 0 {
			t.Fatalf("job failed: %+v", j.Status)
		}
		if ctx.Err() != nil {
			t.Fatalf("job did not complete: %+v", j.Status)
		}
		time.Sleep(500 * time.Millisecond)
	}

	// Deleting the pod drains the sidecar: the app stops first, then the sidecar drains and
	// exits by itself (its last lines), well within the grace period.
	follow := exec.CommandContext(ctx, filepath.Join(binDir, "kubectl"), "--kubeconfig", node.Kubeconfig(),
		"logs", "-f", "--tail=0", "-n", "shop", pod.Name, "-c", "egress-guard")
	stdout, _ := follow.StdoutPipe()
	if err := follow.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second) // the stream is open before the deletion
	if err := c.CoreV1().Pods("shop").Delete(ctx, pod.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	var last []string
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		var rec map[string]any
		if json.Unmarshal(sc.Bytes(), &rec) == nil {
			if m, _ := rec["msg"].(string); m != "" {
				last = append(last, m)
			}
		}
	}
	follow.Wait()
	if !containsInOrder(last, "draining", "drained; exiting") {
		t.Fatalf("sidecar's lines after deletion: %q; want draining, then drained; exiting", last)
	}
}

func repo(image string) string { return image[:strings.LastIndex(image, ":")] }
func tag(image string) string  { return image[strings.LastIndex(image, ":")+1:] }

func containsInOrder(lines []string, want ...string) bool {
	for _, l := range lines {
		if len(want) > 0 && l == want[0] {
			want = want[1:]
		}
	}
	return len(want) == 0
}

// waitPodReady waits for the one pod matching selector to be Ready and returns it.
func waitPodReady(ctx context.Context, t *testing.T, node *kubelab.Node, ns, selector string) *corev1.Pod {
	t.Helper()
	for {
		list, err := node.Client().CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: selector})
		if err == nil && len(list.Items) == 1 {
			p := &list.Items[0]
			for _, cond := range p.Status.Conditions {
				if cond.Type == corev1.PodReady && cond.Status == corev1.ConditionTrue {
					return p
				}
			}
		}
		if ctx.Err() != nil {
			out, _ := node.Kubectl(context.Background(), "describe", "pods", "-n", ns, "-l", selector)
			t.Fatalf("no Ready pod for %s in %s:\n%s", selector, ns, out)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// podLog reads a container's log through the apiserver and the kubelet.
type podLog struct {
	node               *kubelab.Node
	ns, pod, container string
}

func (p podLog) lines(ctx context.Context, t *testing.T) []string {
	t.Helper()
	out, err := p.node.Kubectl(ctx, "logs", "-n", p.ns, p.pod, "-c", p.container)
	if err != nil {
		t.Fatal(err)
	}
	return strings.Split(strings.TrimRight(out, "\n"), "\n")
}

// mark is the number of lines so far: wait reads only the lines after it.
func (p podLog) mark(ctx context.Context, t *testing.T) int { return len(p.lines(ctx, t)) }

// wait waits for a JSON line after mark with msg and the fields want.
func (p podLog) wait(ctx context.Context, t *testing.T, mark int, msg string, want map[string]string) map[string]any {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		lines := p.lines(ctx, t)
		for _, l := range lines[min(mark, len(lines)):] {
			var rec map[string]any
			if json.Unmarshal([]byte(l), &rec) != nil || rec["msg"] != msg {
				continue
			}
			ok := true
			for k, v := range want {
				ok = ok && fmt.Sprint(rec[k]) == v
			}
			if ok {
				return rec
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %q line with %v after line %d of %s/%s:\n%s", msg, want, mark, p.pod, p.container,
				strings.Join(lines[min(mark, len(lines)):], "\n"))
		}
		time.Sleep(250 * time.Millisecond)
	}
}
