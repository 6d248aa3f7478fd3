package charttest

import (
	"context"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/egress-guard/egress-guard/internal/kubelab"
)

// TestAgainstAPIServer validates the rendered manifests with a real kube-apiserver
// (server-side dry run, strict field validation, admission) and runs helm install, upgrade
// and uninstall against it.
func TestAgainstAPIServer(t *testing.T) {
	t.Parallel()
	bin := kubelab.Require(t)
	x := newTool(t)
	x.kubectl = filepath.Join(bin, "kubectl")
	if _, err := os.Stat(x.kubectl); err != nil {
		// scripts/k8s-bins.sh always builds kubectl: a missing one is a broken cache, not a
		// reason to skip the chart's server-side checks.
		t.Fatalf("no kubectl in %s: rebuild with scripts/k8s-bins.sh (%v)", bin, err)
	}
	cl := kubelab.StartForTest(t, kubelab.Options{BinDir: bin})
	x.kubeconfig = cl.Kubeconfig()
	cs := cl.Client()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for _, n := range []string{ns, "apps-a", "apps-b"} {
		if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: n}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}

	dryRun := func(t *testing.T, objs []object) {
		t.Helper()
		x := x.with(t)
		manifests := joinManifests(objs, "ServiceMonitor") // no Prometheus Operator CRDs here
		out := x.must(manifests, x.kubectl, "--kubeconfig", x.kubeconfig, "apply", "--dry-run=server", "--validate=strict", "-f", "-")
		lines := strings.Split(strings.TrimSpace(out), "\n")
		n := 0
		for _, o := range objs {
			if o.Kind != "ServiceMonitor" {
				n++
			}
		}
		if len(lines) != n {
			t.Fatalf("kubectl applied %d objects, rendered %d:\n%s", len(lines), n, out)
		}
		for _, l := range lines {
			if !strings.HasSuffix(l, " created (server dry run)") {
				t.Errorf("kubectl: %q", l)
			}
		}
	}
	t.Run("DryRunDefault", func(t *testing.T) { dryRun(t, render(x.with(t))) })
	t.Run("DryRunAllEnabled", func(t *testing.T) { dryRun(t, render(x.with(t), allEnabled...)) })

	t.Run("InstallUpgradeUninstall", func(t *testing.T) {
		x := x.with(t)
		sets := []string{
			"--set", "gateway.enabled=true",
			"--set", "networkPolicy.enabled=true",
			"--set", "networkPolicy.namespaces={apps-a,apps-b}",
			"--set", "injector.enabled=true",
		}
		x.must(nil, x.helm, append([]string{"install", rel, x.chart, "--namespace", ns}, sets...)...)
		manifest := splitManifests(t, x.must(nil, x.helm, "get", "manifest", rel, "--namespace", ns))
		want := keys(manifest)
		sort.Strings(want)
		if len(want) != 17 {
			t.Fatalf("release manifest has %d objects: %v", len(want), want)
		}
		if got := liveObjects(t, ctx, cs); !slices.Equal(got, want) {
			t.Fatalf("after install the API server has %v\nwant %v", got, want)
		}
		sec, err := cs.CoreV1().Secrets(ns).Get(ctx, fullname+"-tls", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		checkServingCert(t, sec.Data)
		mwc, err := cs.AdmissionregistrationV1().MutatingWebhookConfigurations().Get(ctx, fullname+"-"+ns, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		checkWebhook(t, *mwc, sec.Data["ca.crt"])
		checkRBACLive(t, ctx, cs)

		// An upgrade that changes something keeps the serving certificate and the CA (lookup).
		x.must(nil, x.helm, append([]string{"upgrade", rel, x.chart, "--namespace", ns, "--set", "controller.logLevel=DEBUG"}, sets...)...)
		sec2, err := cs.CoreV1().Secrets(ns).Get(ctx, fullname+"-tls", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(sec2.Data, sec.Data) {
			t.Error("helm upgrade replaced the serving certificate Secret's data")
		}
		mwc2, err := cs.AdmissionregistrationV1().MutatingWebhookConfigurations().Get(ctx, fullname+"-"+ns, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		checkWebhook(t, *mwc2, sec.Data["ca.crt"])
		d, err := cs.AppsV1().Deployments(ns).Get(ctx, fullname, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if got := env(d.Spec.Template.Spec.Containers[0])["LOG_LEVEL"]; got != "DEBUG" {
			t.Errorf("after upgrade LOG_LEVEL=%q: the upgrade did not apply", got)
		}
		if got := liveObjects(t, ctx, cs); !slices.Equal(got, want) {
			t.Errorf("after upgrade the API server has %v\nwant %v", got, want)
		}
		if out := x.must(nil, x.helm, "list", "--namespace", ns, "--short"); strings.TrimSpace(out) != rel {
			t.Errorf("helm list: %q", out)
		}

		x.must(nil, x.helm, "uninstall", rel, "--namespace", ns)
		if got := liveObjects(t, ctx, cs); len(got) != 0 {
			t.Errorf("after uninstall the API server still has %v", got)
		}
		if out := x.must(nil, x.helm, "list", "--namespace", ns, "--short"); strings.TrimSpace(out) != "" {
			t.Errorf("helm list after uninstall: %q", out)
		}
		// Helm's own release records (Secrets sh.helm.release.v1.*) are gone too.
		rs, err := cs.CoreV1().Secrets(ns).List(ctx, metav1.ListOptions{LabelSelector: "owner=helm"})
		if err != nil {
			t.Fatal(err)
		}
		if len(rs.Items) != 0 {
			t.Errorf("helm release records left: %d", len(rs.Items))
		}
	})
}

// checkRBACLive asks the API server's RBAC authorizer (SubjectAccessReview) what the
// installed chart lets each ServiceAccount do: the gateway may create TokenReviews and
// nothing else the control plane may; the control plane keeps its namespace access.
func checkRBACLive(t *testing.T, ctx context.Context, cs kubernetes.Interface) {
	t.Helper()
	for _, tc := range []struct {
		sa                    string
		group, resource, verb string
		want                  bool
	}{
		{fullname + "-gateway", "authentication.k8s.io", "tokenreviews", "create", true},
		{fullname + "-gateway", "", "namespaces", "get", false},
		{fullname + "-gateway", "", "namespaces", "list", false},
		{fullname + "-gateway", "", "namespaces", "watch", false},
		{fullname + "-gateway", "authorization.k8s.io", "subjectaccessreviews", "create", false},
		{fullname, "authentication.k8s.io", "tokenreviews", "create", true},
		{fullname, "", "namespaces", "list", true},
		{fullname, "", "namespaces", "watch", true},
	} {
		sar, err := cs.AuthorizationV1().SubjectAccessReviews().Create(ctx, &authorizationv1.SubjectAccessReview{
			Spec: authorizationv1.SubjectAccessReviewSpec{
				User:               "system:serviceaccount:" + ns + ":" + tc.sa,
				Groups:             []string{"system:serviceaccounts", "system:serviceaccounts:" + ns, "system:authenticated"},
				ResourceAttributes: &authorizationv1.ResourceAttributes{Group: tc.group, Resource: tc.resource, Verb: tc.verb},
			},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if sar.Status.Allowed != tc.want {
			t.Errorf("ServiceAccount %s %s %s.%s: allowed %v, want %v (%s)", tc.sa, tc.verb, tc.resource, tc.group, sar.Status.Allowed, tc.want, sar.Status.Reason)
		}
	}
}

// liveObjects lists, in the API server, every object of the kinds the chart renders that
// carries the release's instance label, as sorted Kind/namespace/name keys.
func liveObjects(t *testing.T, ctx context.Context, cs kubernetes.Interface) []string {
	t.Helper()
	opts := metav1.ListOptions{LabelSelector: "app.kubernetes.io/instance=" + rel + ",app.kubernetes.io/managed-by=Helm"}
	var got []string
	add := func(kind, namespace, name string) {
		k := kind + "/" + name
		if namespace != "" {
			k = kind + "/" + namespace + "/" + name
		}
		got = append(got, k)
	}
	check := func(err error) {
		t.Helper()
		if err != nil && !apierrors.IsNotFound(err) {
			t.Fatal(err)
		}
	}
	for _, n := range []string{ns, "apps-a", "apps-b"} {
		cms, err := cs.CoreV1().ConfigMaps(n).List(ctx, opts)
		check(err)
		for _, o := range cms.Items {
			add("ConfigMap", o.Namespace, o.Name)
		}
		secs, err := cs.CoreV1().Secrets(n).List(ctx, opts)
		check(err)
		for _, o := range secs.Items {
			add("Secret", o.Namespace, o.Name)
		}
		sas, err := cs.CoreV1().ServiceAccounts(n).List(ctx, opts)
		check(err)
		for _, o := range sas.Items {
			add("ServiceAccount", o.Namespace, o.Name)
		}
		svcs, err := cs.CoreV1().Services(n).List(ctx, opts)
		check(err)
		for _, o := range svcs.Items {
			add("Service", o.Namespace, o.Name)
		}
		ds, err := cs.AppsV1().Deployments(n).List(ctx, opts)
		check(err)
		for _, o := range ds.Items {
			add("Deployment", o.Namespace, o.Name)
		}
		pdbs, err := cs.PolicyV1().PodDisruptionBudgets(n).List(ctx, opts)
		check(err)
		for _, o := range pdbs.Items {
			add("PodDisruptionBudget", o.Namespace, o.Name)
		}
		nps, err := cs.NetworkingV1().NetworkPolicies(n).List(ctx, opts)
		check(err)
		for _, o := range nps.Items {
			add("NetworkPolicy", o.Namespace, o.Name)
		}
	}
	crs, err := cs.RbacV1().ClusterRoles().List(ctx, opts)
	check(err)
	for _, o := range crs.Items {
		add("ClusterRole", "", o.Name)
	}
	crbs, err := cs.RbacV1().ClusterRoleBindings().List(ctx, opts)
	check(err)
	for _, o := range crbs.Items {
		add("ClusterRoleBinding", "", o.Name)
	}
	mwcs, err := cs.AdmissionregistrationV1().MutatingWebhookConfigurations().List(ctx, opts)
	check(err)
	for _, o := range mwcs.Items {
		add("MutatingWebhookConfiguration", "", o.Name)
	}
	sort.Strings(got)
	return got
}
