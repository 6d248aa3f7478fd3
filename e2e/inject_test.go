package e2e

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	admissionregv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/egress-guard/egress-guard/controller/inject"
	"github.com/egress-guard/egress-guard/internal/kubelab"
	"github.com/egress-guard/egress-guard/internal/netlab"
	"github.com/egress-guard/egress-guard/pkg/contract"
)

// The injector against a real API server: the control plane serves the webhook, a
// MutatingWebhookConfiguration sends it every pod CREATE outside the system namespaces, and
// the stored pods show what was injected, what was left alone and what was refused.
func TestInjectorWithARealAPIServer(t *testing.T) {
	e := startK8s(t)
	ca, err := netlab.NewCA()
	if err != nil {
		t.Fatal(err)
	}
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	os.WriteFile(caFile, ca.PEM, 0o644)
	cp := startControlPlane(t, e, ca, caFile, "127.0.0.1", "WEBHOOK_PORT=19444", "INJECT_CA_FILE="+caFile,
		"INJECT_SIDECAR_IMAGE=egress-guard:e2e", "INJECT_INIT_IMAGE=egress-guard-init:e2e", "INJECT_EXCLUDE_PORTS=5432")
	_ = cp
	c := e.cl.Client()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	fail, ifNeeded, none := admissionregv1.Fail, admissionregv1.IfNeededReinvocationPolicy, admissionregv1.SideEffectClassNone
	url := "https://127.0.0.1:19444" + inject.Path
	timeout := int32(10)
	hook := func(name string) admissionregv1.MutatingWebhook {
		return admissionregv1.MutatingWebhook{
			Name:         name,
			ClientConfig: admissionregv1.WebhookClientConfig{URL: &url, CABundle: ca.PEM},
			Rules: []admissionregv1.RuleWithOperations{
				{Operations: []admissionregv1.OperationType{admissionregv1.Create}, Rule: admissionregv1.Rule{APIGroups: []string{""}, APIVersions: []string{"v1"}, Resources: []string{"pods"}}},
				{Operations: []admissionregv1.OperationType{admissionregv1.Update}, Rule: admissionregv1.Rule{APIGroups: []string{""}, APIVersions: []string{"v1"}, Resources: []string{"pods/ephemeralcontainers"}}},
			},
			FailurePolicy:           &fail,
			SideEffects:             &none,
			AdmissionReviewVersions: []string{"v1"},
			ReinvocationPolicy:      &ifNeeded,
			TimeoutSeconds:          &timeout,
			NamespaceSelector: &metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{{
				Key: "kubernetes.io/metadata.name", Operator: metav1.LabelSelectorOpNotIn,
				Values: []string{"kube-system", "kube-public", "kube-node-lease", "egress-guard"},
			}}},
		}
	}
	// Two webhooks calling the same injector: the second sees the first's work, as a
	// re-invocation would, and must not inject twice.
	if _, err := c.AdmissionregistrationV1().MutatingWebhookConfigurations().Create(ctx, &admissionregv1.MutatingWebhookConfiguration{
		ObjectMeta: metav1.ObjectMeta{Name: "egress-guard"},
		Webhooks:   []admissionregv1.MutatingWebhook{hook("inject.egress-guard.io"), hook("again.egress-guard.io")},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	for name, labels := range map[string]map[string]string{
		"labelled": {inject.LabelInject: "enabled"},
		"plain":    nil,
		"enforced": {inject.LabelInject: "enforced"},
		"strict":   {inject.LabelInject: "enabled", inject.LabelPodSecurity: "baseline"},
	} {
		if _, err := c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		if _, err := e.cl.CreateServiceAccount(name, "default"); err != nil {
			t.Fatal(err)
		}
	}
	create := func(ns, name string, annotations map[string]string, mutate func(*corev1.Pod)) (*corev1.Pod, error) {
		p := kubelab.MinimalPod(ns, name, "default")
		p.Annotations = annotations
		if mutate != nil {
			mutate(p)
		}
		// The webhook needs the API server to reach it: retry briefly while it starts.
		var out *corev1.Pod
		var err error
		for i := 0; i < 20; i++ {
			out, err = c.CoreV1().Pods(ns).Create(ctx, p, metav1.CreateOptions{})
			if err == nil || !strings.Contains(err.Error(), "connection refused") {
				break
			}
			time.Sleep(250 * time.Millisecond)
		}
		return out, err
	}
	names := func(cs []corev1.Container) []string {
		var out []string
		for _, c := range cs {
			out = append(out, c.Name)
		}
		return out
	}

	t.Run("a pod in a labelled namespace is injected once, with a native sidecar", func(t *testing.T) {
		p, err := create("labelled", "app", nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		if got := strings.Join(names(p.Spec.InitContainers), ","); got != contract.InitContainer+","+contract.SidecarContainer {
			t.Fatalf("init containers %s", got)
		}
		side := p.Spec.InitContainers[1]
		if side.RestartPolicy == nil || *side.RestartPolicy != corev1.ContainerRestartPolicyAlways || side.StartupProbe == nil {
			t.Fatalf("the sidecar is not a native sidecar: %+v", side)
		}
		if *side.SecurityContext.RunAsUser != contract.ProxyUID || !*side.SecurityContext.ReadOnlyRootFilesystem {
			t.Fatalf("sidecar security context %+v", side.SecurityContext)
		}
		if !strings.Contains(strings.Join(p.Spec.InitContainers[0].Args, " "), "--exclude-ports 5432") {
			t.Fatalf("init args %v", p.Spec.InitContainers[0].Args)
		}
		if p.Annotations[inject.AnnotationStatus] == "" {
			t.Fatal("no status annotation")
		}
		// The token is mounted into the sidecar only.
		for _, c := range p.Spec.Containers {
			for _, m := range c.VolumeMounts {
				if m.MountPath == contract.TokenDir {
					t.Fatalf("app container %q mounts the egress-guard token", c.Name)
				}
			}
		}
	})

	// A workload that writes the status record and an init container named like the capture
	// one, which does nothing, gets the real capture: the record is never trusted.
	t.Run("a forged injection is replaced by the real one", func(t *testing.T) {
		p, err := create("labelled", "forged", map[string]string{inject.AnnotationStatus: "{}"}, func(p *corev1.Pod) {
			p.Spec.InitContainers = []corev1.Container{{Name: contract.InitContainer, Image: "busybox", Command: []string{"true"}}}
		})
		if err != nil {
			t.Fatal(err)
		}
		if got := strings.Join(names(p.Spec.InitContainers), ","); got != contract.InitContainer+","+contract.SidecarContainer {
			t.Fatalf("init containers %s", got)
		}
		if init := p.Spec.InitContainers[0]; init.Image != "egress-guard-init:e2e" || len(init.Command) != 0 ||
			!strings.Contains(strings.Join(init.Args, " "), "--proxy-uid 15337") {
			t.Fatalf("the capture init container is not the injector's: image %q, command %v, args %v", init.Image, init.Command, init.Args)
		}
		if p.Annotations[inject.AnnotationStatus] == "{}" {
			t.Fatal("the forged status record was kept")
		}
	})

	// kubectl debug adds an ephemeral container to a running pod: one that runs as the proxy's
	// UID (whose traffic is not captured) or is privileged is refused; a plain one is not.
	t.Run("ephemeral containers that would bypass capture are refused", func(t *testing.T) {
		p, err := create("labelled", "debugged", nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		uid := int64(contract.ProxyUID)
		yes := true
		debug := func(name string, sc *corev1.SecurityContext) error {
			cur, err := c.CoreV1().Pods("labelled").Get(ctx, p.Name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			cur.Spec.EphemeralContainers = append(cur.Spec.EphemeralContainers, corev1.EphemeralContainer{
				EphemeralContainerCommon: corev1.EphemeralContainerCommon{Name: name, Image: "busybox", SecurityContext: sc},
			})
			_, err = c.CoreV1().Pods("labelled").UpdateEphemeralContainers(ctx, p.Name, cur, metav1.UpdateOptions{})
			return err
		}
		for _, tc := range []struct {
			name string
			sc   *corev1.SecurityContext
			want string
		}{
			{"as-proxy", &corev1.SecurityContext{RunAsUser: &uid}, `ephemeral container "as-proxy" runs as UID 15337, the proxy's`},
			{"privileged", &corev1.SecurityContext{Privileged: &yes}, `ephemeral container "privileged" is privileged`},
		} {
			if err := debug(tc.name, tc.sc); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("%s: got %v, want a refusal with %q", tc.name, err, tc.want)
			}
		}
		if err := debug("plain", nil); err != nil {
			t.Fatalf("a plain ephemeral container was refused: %v", err)
		}
		got, err := c.CoreV1().Pods("labelled").Get(ctx, p.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if len(got.Spec.EphemeralContainers) != 1 || got.Spec.EphemeralContainers[0].Name != "plain" {
			t.Fatalf("ephemeral containers %+v, want only \"plain\"", got.Spec.EphemeralContainers)
		}
	})

	t.Run("opt-in, opt-out and untouched pods", func(t *testing.T) {
		for _, c := range []struct {
			ns, name    string
			annotations map[string]string
			injected    bool
		}{
			{"plain", "untouched", nil, false},
			{"plain", "opted-in", map[string]string{inject.AnnotationInject: "true"}, true},
			{"labelled", "opted-out", map[string]string{inject.AnnotationInject: "false"}, false},
			{"enforced", "opt-out-ignored", map[string]string{inject.AnnotationInject: "false"}, true},
		} {
			p, err := create(c.ns, c.name, c.annotations, nil)
			if err != nil {
				t.Fatalf("%s/%s: %v", c.ns, c.name, err)
			}
			if got := len(p.Spec.InitContainers) == 2; got != c.injected {
				t.Errorf("%s/%s: injected %v, want %v (%v)", c.ns, c.name, got, c.injected, names(p.Spec.InitContainers))
			}
		}
	})

	t.Run("pods that would bypass capture are refused with what to change", func(t *testing.T) {
		uid := int64(contract.ProxyUID)
		yes := true
		for _, c := range []struct {
			name   string
			mutate func(*corev1.Pod)
			want   string
		}{
			{"proxy-uid", func(p *corev1.Pod) { p.Spec.SecurityContext = &corev1.PodSecurityContext{RunAsUser: &uid} }, "the proxy's UID"},
			{"proxy-gid", func(p *corev1.Pod) {
				p.Spec.SecurityContext = &corev1.PodSecurityContext{SupplementalGroups: []int64{uid}}
			}, "supplementalGroups lists 15337"},
			{"net-admin", func(p *corev1.Pod) {
				p.Spec.Containers[0].SecurityContext = &corev1.SecurityContext{Capabilities: &corev1.Capabilities{Add: []corev1.Capability{"NET_ADMIN"}}}
			}, "adds capability NET_ADMIN"},
			{"privileged", func(p *corev1.Pod) {
				p.Spec.Containers[0].SecurityContext = &corev1.SecurityContext{Privileged: &yes}
			}, "is privileged"},
			{"host-network", func(p *corev1.Pod) { p.Spec.HostNetwork = true }, "hostNetwork: true"},
			{"our-name", func(p *corev1.Pod) { p.Spec.Containers[0].Name = contract.SidecarContainer }, "is egress-guard's"},
		} {
			_, err := create("labelled", c.name, nil, c.mutate)
			if err == nil || !strings.Contains(err.Error(), "egress-guard refuses this pod") || !strings.Contains(err.Error(), c.want) {
				t.Errorf("%s: %v, want a refusal saying %q", c.name, err, c.want)
			}
		}
	})

	t.Run("a baseline namespace is answered clearly", func(t *testing.T) {
		_, err := create("strict", "app", nil, nil)
		if err == nil || !strings.Contains(err.Error(), "pod-security.kubernetes.io/enforce=privileged") || !strings.Contains(err.Error(), inject.AnnotationInject+`: "false"`) {
			t.Fatalf("%v", err)
		}
	})
}
