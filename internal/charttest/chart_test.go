// Package charttest checks the Helm chart charts/egress-guard with the real helm (scripts/helm-bin.sh)
// and a real kube-apiserver (internal/kubelab): lint, render, schema, server-side validation,
// and an install / upgrade / uninstall round trip.
package charttest

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strings"
	"testing"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/egress-guard/egress-guard/controller"
	"github.com/egress-guard/egress-guard/pkg/contract"
	"github.com/egress-guard/egress-guard/pkg/policy"
)

const (
	rel      = "eg"
	ns       = "egress-guard"
	fullname = "eg-egress-guard"
)

// allEnabled turns on every optional part (the ServiceMonitor last: the test API server has
// no Prometheus Operator CRDs).
var allEnabled = []string{
	"--set", "gateway.enabled=true",
	"--set", "networkPolicy.enabled=true",
	"--set", "networkPolicy.namespaces={apps-a,apps-b}",
	"--set", "injector.enabled=true",
	"--set", "serviceMonitor.enabled=true",
}

func render(x *tool, args ...string) []object {
	x.t.Helper()
	all := append([]string{"template", rel, x.chart, "--namespace", ns}, args...)
	return splitManifests(x.t, x.must(nil, x.helm, all...))
}

func chartAppVersion(t *testing.T, chart string) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(chart, "Chart.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var c struct {
		AppVersion string `json:"appVersion"`
	}
	if err := yaml.Unmarshal(data, &c); err != nil {
		t.Fatal(err)
	}
	return c.AppVersion
}

func TestLint(t *testing.T) {
	t.Parallel()
	x := newTool(t)
	for _, args := range [][]string{
		{"lint", x.chart},
		{"lint", "--strict", x.chart},
		append([]string{"lint", "--strict", x.chart}, allEnabled...),
		{"lint", "--strict", x.chart, "--set", "certManager.enabled=true", "--set", "injector.enabled=true"},
	} {
		out := x.must(nil, x.helm, args...)
		if !strings.Contains(out, "1 chart(s) linted, 0 chart(s) failed") {
			t.Errorf("helm %s:\n%s", strings.Join(args, " "), out)
		}
		if strings.Contains(out, "[WARNING]") || strings.Contains(out, "[ERROR]") {
			t.Errorf("helm %s: not clean:\n%s", strings.Join(args, " "), out)
		}
	}
}

func env(c corev1.Container) map[string]string {
	m := map[string]string{}
	for _, e := range c.Env {
		m[e.Name] = e.Value
	}
	return m
}

func checkPodHardening(t *testing.T, what string, spec corev1.PodSpec) {
	t.Helper()
	psc := spec.SecurityContext
	if psc == nil || psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot || psc.RunAsUser == nil || *psc.RunAsUser != contract.ProxyUID ||
		psc.RunAsGroup == nil || *psc.RunAsGroup != contract.ProxyGID || psc.SeccompProfile == nil || psc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("%s: pod securityContext %+v", what, psc)
	}
	if len(spec.Containers) != 1 {
		t.Fatalf("%s: %d containers", what, len(spec.Containers))
	}
	sc := spec.Containers[0].SecurityContext
	if sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation ||
		sc.Capabilities == nil || !reflect.DeepEqual(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || len(sc.Capabilities.Add) != 0 {
		t.Errorf("%s: container securityContext %+v", what, sc)
	}
	c := spec.Containers[0]
	for _, p := range []*corev1.Probe{c.LivenessProbe, c.ReadinessProbe} {
		if p == nil || p.HTTPGet == nil || p.HTTPGet.Port.String() != "metrics" {
			t.Errorf("%s: probe %+v", what, p)
		}
	}
	if c.LivenessProbe.HTTPGet.Path != "/health" || c.ReadinessProbe.HTTPGet.Path != "/ready" {
		t.Errorf("%s: probe paths %s, %s", what, c.LivenessProbe.HTTPGet.Path, c.ReadinessProbe.HTTPGet.Path)
	}
}

func TestTemplateDefault(t *testing.T) {
	t.Parallel()
	x := newTool(t)
	objs := render(x)
	got := keys(objs)
	sort.Strings(got)
	want := []string{
		"ClusterRole/" + fullname + "-" + ns,
		"ClusterRoleBinding/" + fullname + "-" + ns,
		"ConfigMap/" + ns + "/" + fullname + "-policy",
		"Deployment/" + ns + "/" + fullname,
		"PodDisruptionBudget/" + ns + "/" + fullname,
		"Secret/" + ns + "/" + fullname + "-tls",
		"Service/" + ns + "/" + fullname,
		"ServiceAccount/" + ns + "/" + fullname,
	}
	if !slices.Equal(got, want) {
		t.Fatalf("rendered %v\nwant %v", got, want)
	}
	selector := map[string]string{
		"app.kubernetes.io/name":      "egress-guard",
		"app.kubernetes.io/instance":  rel,
		"app.kubernetes.io/component": "controller",
	}
	for _, o := range objs {
		l := o.Metadata.Labels
		if l["app.kubernetes.io/managed-by"] != "Helm" || l["app.kubernetes.io/instance"] != rel || l["app.kubernetes.io/name"] != "egress-guard" ||
			!strings.HasPrefix(l["helm.sh/chart"], "egress-guard-") || l["app.kubernetes.io/version"] == "" {
			t.Errorf("%s: labels %v", o.key(), l)
		}
	}

	var d appsv1.Deployment
	decode(t, find(t, objs, "Deployment", fullname), &d)
	if *d.Spec.Replicas != 2 || !reflect.DeepEqual(d.Spec.Selector.MatchLabels, selector) {
		t.Errorf("deployment replicas %d selector %v", *d.Spec.Replicas, d.Spec.Selector.MatchLabels)
	}
	pod := d.Spec.Template.Spec
	checkPodHardening(t, "controller", pod)
	if pod.ServiceAccountName != fullname || pod.AutomountServiceAccountToken == nil || !*pod.AutomountServiceAccountToken {
		t.Errorf("serviceAccountName %q automount %v", pod.ServiceAccountName, pod.AutomountServiceAccountToken)
	}
	if len(pod.TopologySpreadConstraints) != 2 || pod.TopologySpreadConstraints[0].TopologyKey != "kubernetes.io/hostname" ||
		pod.TopologySpreadConstraints[1].TopologyKey != "topology.kubernetes.io/zone" {
		t.Errorf("topologySpreadConstraints %+v", pod.TopologySpreadConstraints)
	}
	for _, c := range pod.TopologySpreadConstraints {
		if c.LabelSelector == nil || !reflect.DeepEqual(c.LabelSelector.MatchLabels, selector) || c.MaxSkew != 1 {
			t.Errorf("topologySpreadConstraint %+v", c)
		}
	}
	c := pod.Containers[0]
	// The control plane runs from its own image (Dockerfile.controller), not the proxy's.
	if want := "ghcr.io/egress-guard/egress-guard-controller:" + chartAppVersion(t, x.chart); c.Image != want {
		t.Errorf("image %q, want %q", c.Image, want)
	}
	if c.ImagePullPolicy != corev1.PullIfNotPresent {
		t.Errorf("imagePullPolicy %q, want IfNotPresent (image.pullPolicy)", c.ImagePullPolicy)
	}
	if !slices.Equal(c.Command, []string{"/usr/local/bin/egress-guard-controller"}) {
		t.Errorf("command %v", c.Command)
	}
	wantEnv := map[string]string{
		"PORT": "8443", "METRICS_PORT": "9090", contract.EnvPolicyPath: "/etc/config/egress-policy.yaml",
		"TLS_CERT_FILE": "/etc/egress-guard/tls/tls.crt", "TLS_KEY_FILE": "/etc/egress-guard/tls/tls.key",
		"TOKEN_AUDIENCE": contract.TokenAudience, "WATCH_INTERVAL": "1", "MAX_WAIT": "60s", "LOG_LEVEL": "INFO",
		"GOMEMLIMIT": "214748364", // 80 % of the default limit 256Mi, in bytes
	}
	if !reflect.DeepEqual(env(c), wantEnv) {
		t.Errorf("env %v\nwant %v", env(c), wantEnv)
	}
	if _, ok := env(c)["KUBECONFIG"]; ok {
		t.Error("KUBECONFIG set: the controller must use the in-cluster ServiceAccount")
	}
	mounts := map[string]string{}
	for _, m := range c.VolumeMounts {
		if !m.ReadOnly || m.SubPath != "" {
			t.Errorf("mount %+v: want read-only, no subPath (subPath mounts never see updates)", m)
		}
		mounts[m.Name] = m.MountPath
	}
	if !reflect.DeepEqual(mounts, map[string]string{"policy": "/etc/config", "tls": "/etc/egress-guard/tls"}) {
		t.Errorf("mounts %v", mounts)
	}

	var svc corev1.Service
	decode(t, find(t, objs, "Service", fullname), &svc)
	if len(svc.Spec.Ports) != 2 ||
		svc.Spec.Ports[0].Name != "https" || svc.Spec.Ports[0].Port != 443 || svc.Spec.Ports[0].TargetPort.String() != "https" ||
		svc.Spec.Ports[1].Name != "metrics" || svc.Spec.Ports[1].Port != 9090 || !reflect.DeepEqual(svc.Spec.Selector, selector) {
		t.Errorf("service %+v", svc.Spec)
	}
	ports := map[string]int32{}
	for _, p := range c.Ports {
		ports[p.Name] = p.ContainerPort
	}
	if !reflect.DeepEqual(ports, map[string]int32{"https": 8443, "metrics": 9090}) {
		t.Errorf("container ports %v", ports)
	}

	var pdb policyv1.PodDisruptionBudget
	decode(t, find(t, objs, "PodDisruptionBudget", fullname), &pdb)
	if pdb.Spec.MinAvailable == nil || pdb.Spec.MinAvailable.IntValue() != 1 || !reflect.DeepEqual(pdb.Spec.Selector.MatchLabels, selector) {
		t.Errorf("pdb %+v", pdb.Spec)
	}

	var cr rbacv1.ClusterRole
	decode(t, find(t, objs, "ClusterRole", fullname+"-"+ns), &cr)
	wantRules := []rbacv1.PolicyRule{
		{APIGroups: []string{"authentication.k8s.io"}, Resources: []string{"tokenreviews"}, Verbs: []string{"create"}},
		{APIGroups: []string{""}, Resources: []string{"namespaces"}, Verbs: []string{"get", "list", "watch"}},
	}
	if !reflect.DeepEqual(cr.Rules, wantRules) {
		t.Errorf("clusterrole rules %+v", cr.Rules)
	}
	var crb rbacv1.ClusterRoleBinding
	decode(t, find(t, objs, "ClusterRoleBinding", fullname+"-"+ns), &crb)
	if crb.RoleRef.Name != cr.Name || !reflect.DeepEqual(crb.Subjects, []rbacv1.Subject{{Kind: "ServiceAccount", Name: fullname, Namespace: ns}}) {
		t.Errorf("clusterrolebinding %+v", crb)
	}

	var cm corev1.ConfigMap
	decode(t, find(t, objs, "ConfigMap", fullname+"-policy"), &cm)
	if _, err := policy.Parse("egress-policy.yaml", []byte(cm.Data["egress-policy.yaml"]), policy.Options{}); err != nil {
		t.Errorf("the default policy does not load: %v\n%s", err, cm.Data["egress-policy.yaml"])
	}

	var sec corev1.Secret
	decode(t, find(t, objs, "Secret", fullname+"-tls"), &sec)
	checkServingCert(t, sec.Data)
}

// checkServingCert checks that tls.crt is for <svc>.<ns>.svc, is signed by ca.crt, and matches tls.key.
func checkServingCert(t *testing.T, data map[string][]byte) {
	t.Helper()
	if sec := data; len(sec["ca.crt"]) == 0 || len(sec["tls.crt"]) == 0 || len(sec["tls.key"]) == 0 {
		t.Fatalf("secret keys %v", slices.Sorted(mapsKeys(data)))
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(data["ca.crt"]) {
		t.Fatal("ca.crt: no PEM certificate")
	}
	blk, _ := pem.Decode(data["tls.crt"])
	if blk == nil {
		t.Fatal("tls.crt: no PEM")
	}
	cert, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	host := fullname + "." + ns + ".svc"
	if _, err := cert.Verify(x509.VerifyOptions{DNSName: host, Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
		t.Errorf("serving certificate for %s: %v (SANs %v)", host, err, cert.DNSNames)
	}
	if _, err := tls.X509KeyPair(data["tls.crt"], data["tls.key"]); err != nil {
		t.Errorf("tls.crt and tls.key: %v", err)
	}
}

func mapsKeys[V any](m map[string]V) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

func TestTemplateAllEnabled(t *testing.T) {
	t.Parallel()
	x := newTool(t)
	objs := render(x, allEnabled...)
	got := keys(objs)
	sort.Strings(got)
	want := []string{
		"ClusterRole/" + fullname + "-" + ns,
		"ClusterRole/" + fullname + "-gateway-" + ns,
		"ClusterRoleBinding/" + fullname + "-" + ns,
		"ClusterRoleBinding/" + fullname + "-gateway-" + ns,
		"ConfigMap/" + ns + "/" + fullname + "-policy",
		"Deployment/" + ns + "/" + fullname,
		"Deployment/" + ns + "/" + fullname + "-gateway",
		"MutatingWebhookConfiguration/" + fullname + "-" + ns,
		"NetworkPolicy/apps-a/" + fullname + "-egress",
		"NetworkPolicy/apps-b/" + fullname + "-egress",
		"PodDisruptionBudget/" + ns + "/" + fullname,
		"PodDisruptionBudget/" + ns + "/" + fullname + "-gateway",
		"Secret/" + ns + "/" + fullname + "-tls",
		"Service/" + ns + "/" + fullname,
		"Service/" + ns + "/" + fullname + "-gateway",
		"ServiceAccount/" + ns + "/" + fullname,
		"ServiceAccount/" + ns + "/" + fullname + "-gateway",
		"ServiceMonitor/" + ns + "/" + fullname,
	}
	if !slices.Equal(got, want) {
		t.Fatalf("rendered %v\nwant %v", got, want)
	}

	var sec corev1.Secret
	decode(t, find(t, objs, "Secret", fullname+"-tls"), &sec)
	var mwc admissionregistrationv1.MutatingWebhookConfiguration
	decode(t, find(t, objs, "MutatingWebhookConfiguration", fullname+"-"+ns), &mwc)
	checkWebhook(t, mwc, sec.Data["ca.crt"])

	// The controller's environment, as the chart renders it with the injector on, is
	// accepted by the controller's own settings and configures the webhook.
	var ctl appsv1.Deployment
	decode(t, find(t, objs, "Deployment", fullname), &ctl)
	ctlEnv := env(ctl.Spec.Template.Spec.Containers[0])
	var cfg controller.Config
	if err := controller.Settings(&cfg).Load("controller", nil, func(k string) string { return ctlEnv[k] }); err != nil {
		t.Fatalf("the controller refuses the chart's environment: %v", err)
	}
	// The injected sidecar and the gateway run the proxy image; the controller its own.
	appVersion := chartAppVersion(t, x.chart)
	proxyImage := "ghcr.io/egress-guard/egress-guard:" + appVersion
	if got, want := ctl.Spec.Template.Spec.Containers[0].Image, "ghcr.io/egress-guard/egress-guard-controller:"+appVersion; got != want {
		t.Errorf("controller image %q, want %q", got, want)
	}
	if cfg.Inject.SidecarImage != proxyImage || cfg.Inject.InitImage != "ghcr.io/egress-guard/egress-guard-init:"+appVersion {
		t.Errorf("injected images: sidecar %q, init %q; want the proxy image %q and the init image",
			cfg.Inject.SidecarImage, cfg.Inject.InitImage, proxyImage)
	}
	if cfg.WebhookPort != 9443 || cfg.Inject.SidecarImage == "" || cfg.Inject.InitImage == "" || cfg.InjectCAFile != "/etc/egress-guard/tls/ca.crt" ||
		cfg.Inject.ControlPlaneURL != "https://"+fullname+"."+ns+".svc:443" || cfg.Inject.ProxyUID != contract.ProxyUID || cfg.Inject.UDPPolicy != "drop" ||
		cfg.Inject.Resources.Limits.Memory().String() != "128Mi" || cfg.Inject.GoMaxProcs != 1 {
		t.Fatalf("injector configuration from the chart: %+v", cfg)
	}

	var gw appsv1.Deployment
	decode(t, find(t, objs, "Deployment", fullname+"-gateway"), &gw)
	checkPodHardening(t, "gateway", gw.Spec.Template.Spec)
	gc := gw.Spec.Template.Spec.Containers[0]
	if gc.Image != proxyImage || gc.ImagePullPolicy != corev1.PullIfNotPresent {
		t.Errorf("gateway image %q (%s), want %q (IfNotPresent)", gc.Image, gc.ImagePullPolicy, proxyImage)
	}
	wantEnv := map[string]string{
		contract.EnvMode: contract.ModeGateway, "PROXY_PORT": "4750", "METRICS_PORT": "9090",
		contract.EnvPolicyPath: "/etc/config/egress-policy.yaml", "TOKEN_AUTH": "auto", "TOKEN_AUDIENCE": contract.TokenAudience,
		"DRAIN_TIMEOUT": "25s", "LOG_LEVEL": "INFO", "GOMEMLIMIT": "429496729", // 80 % of 512Mi
	}
	if !reflect.DeepEqual(env(gc), wantEnv) || !slices.Equal(gc.Command, []string{"/usr/local/bin/egress-guard"}) {
		t.Errorf("gateway env %v command %v", env(gc), gc.Command)
	}
	if gw.Spec.Template.Spec.ServiceAccountName != fullname+"-gateway" || *gw.Spec.Template.Spec.TerminationGracePeriodSeconds != 30 {
		t.Errorf("gateway sa %q grace %d", gw.Spec.Template.Spec.ServiceAccountName, *gw.Spec.Template.Spec.TerminationGracePeriodSeconds)
	}
	if len(gw.Spec.Template.Spec.Volumes) != 1 || gw.Spec.Template.Spec.Volumes[0].ConfigMap.Name != fullname+"-policy" {
		t.Errorf("gateway volumes %+v", gw.Spec.Template.Spec.Volumes)
	}
	var gsvc corev1.Service
	decode(t, find(t, objs, "Service", fullname+"-gateway"), &gsvc)
	if gsvc.Spec.Ports[0].Port != contract.GatewayProxyPort || gsvc.Spec.Ports[0].Name != "proxy" {
		t.Errorf("gateway service ports %+v", gsvc.Spec.Ports)
	}
	// The control plane's binding is its own ServiceAccount's only; the gateway's
	// ServiceAccount is bound to a role that can create TokenReviews and nothing else.
	var crb rbacv1.ClusterRoleBinding
	decode(t, find(t, objs, "ClusterRoleBinding", fullname+"-"+ns), &crb)
	if !reflect.DeepEqual(crb.Subjects, []rbacv1.Subject{{Kind: "ServiceAccount", Name: fullname, Namespace: ns}}) {
		t.Errorf("controller clusterrolebinding subjects %+v", crb.Subjects)
	}
	checkGatewayRBAC(t, objs)

	var np networkingv1.NetworkPolicy
	decode(t, find(t, objs, "NetworkPolicy", fullname+"-egress"), &np)
	checkNetworkPolicy(t, np)
}

// TestGatewayRBAC: with the gateway on (TestTemplateAllEnabled checks it with everything on),
// the gateway's ServiceAccount is bound only to its own ClusterRole, which may create
// TokenReviews and nothing else.
func TestGatewayRBAC(t *testing.T) {
	t.Parallel()
	checkGatewayRBAC(t, render(newTool(t), "--set", "gateway.enabled=true"))
}

// checkGatewayRBAC checks that every (Cluster)RoleBinding naming the gateway's ServiceAccount
// is the gateway's own ClusterRoleBinding, and that its ClusterRole has exactly one rule:
// create authentication.k8s.io tokenreviews (the one API call the proxy makes,
// pkg/tokenreview). Binding the gateway to the control plane's role (namespaces too) fails.
func checkGatewayRBAC(t *testing.T, objs []object) {
	t.Helper()
	gatewaySA := rbacv1.Subject{Kind: "ServiceAccount", Name: fullname + "-gateway", Namespace: ns}
	var bound []string
	for _, o := range objs {
		if o.Kind != "ClusterRoleBinding" && o.Kind != "RoleBinding" {
			continue
		}
		var b rbacv1.ClusterRoleBinding // a RoleBinding has the same fields
		decode(t, o, &b)
		for _, s := range b.Subjects {
			if s.Kind == gatewaySA.Kind && s.Name == gatewaySA.Name && s.Namespace == gatewaySA.Namespace {
				bound = append(bound, o.Kind+"/"+b.Name+" -> "+b.RoleRef.Kind+"/"+b.RoleRef.Name)
			}
		}
	}
	name := fullname + "-gateway-" + ns
	if want := []string{"ClusterRoleBinding/" + name + " -> ClusterRole/" + name}; !slices.Equal(bound, want) {
		t.Errorf("the gateway's ServiceAccount is bound by %v, want only %v", bound, want)
	}
	var crb rbacv1.ClusterRoleBinding
	decode(t, find(t, objs, "ClusterRoleBinding", name), &crb)
	if crb.RoleRef != (rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: name}) ||
		!reflect.DeepEqual(crb.Subjects, []rbacv1.Subject{gatewaySA}) {
		t.Errorf("gateway clusterrolebinding roleRef %+v subjects %+v", crb.RoleRef, crb.Subjects)
	}
	var cr rbacv1.ClusterRole
	decode(t, find(t, objs, "ClusterRole", name), &cr)
	if want := []rbacv1.PolicyRule{
		{APIGroups: []string{"authentication.k8s.io"}, Resources: []string{"tokenreviews"}, Verbs: []string{"create"}},
	}; !reflect.DeepEqual(cr.Rules, want) || cr.AggregationRule != nil {
		t.Errorf("gateway clusterrole rules %+v aggregation %+v, want exactly %+v", cr.Rules, cr.AggregationRule, want)
	}
	for _, o := range []object{find(t, objs, "ClusterRole", name), find(t, objs, "ClusterRoleBinding", name)} {
		if o.Metadata.Labels["app.kubernetes.io/component"] != "gateway" || o.Metadata.Labels["app.kubernetes.io/instance"] != rel {
			t.Errorf("%s labels %v", o.key(), o.Metadata.Labels)
		}
	}
}

func checkWebhook(t *testing.T, mwc admissionregistrationv1.MutatingWebhookConfiguration, ca []byte) {
	t.Helper()
	if len(mwc.Webhooks) != 1 {
		t.Fatalf("webhooks %+v", mwc.Webhooks)
	}
	w := mwc.Webhooks[0]
	svc := w.ClientConfig.Service
	if svc == nil || svc.Name != fullname || svc.Namespace != ns || svc.Path == nil || *svc.Path != "/inject" || svc.Port == nil || *svc.Port != 9443 || w.ClientConfig.URL != nil {
		t.Errorf("clientConfig %+v", w.ClientConfig)
	}
	if len(ca) == 0 || string(w.ClientConfig.CABundle) != string(ca) {
		t.Errorf("caBundle differs from the Secret's ca.crt")
	}
	// The API server defaults an absent objectSelector to {} (every object).
	if w.ObjectSelector != nil && (len(w.ObjectSelector.MatchLabels) != 0 || len(w.ObjectSelector.MatchExpressions) != 0) {
		t.Errorf("objectSelector %+v, want none", w.ObjectSelector)
	}
	if *w.FailurePolicy != admissionregistrationv1.Fail || *w.SideEffects != admissionregistrationv1.SideEffectClassNone ||
		*w.ReinvocationPolicy != admissionregistrationv1.IfNeededReinvocationPolicy || *w.TimeoutSeconds != 10 ||
		!slices.Equal(w.AdmissionReviewVersions, []string{"v1"}) {
		t.Errorf("webhook failurePolicy %s sideEffects %s reinvocationPolicy %s timeoutSeconds %d admissionReviewVersions %v",
			*w.FailurePolicy, *w.SideEffects, *w.ReinvocationPolicy, *w.TimeoutSeconds, w.AdmissionReviewVersions)
	}
	wantNS := metav1.LabelSelectorRequirement{Key: "kubernetes.io/metadata.name", Operator: metav1.LabelSelectorOpNotIn, Values: []string{"kube-system", "kube-public", "kube-node-lease", ns}}
	if w.NamespaceSelector == nil || len(w.NamespaceSelector.MatchLabels) != 0 || len(w.NamespaceSelector.MatchExpressions) != 1 ||
		!reflect.DeepEqual(w.NamespaceSelector.MatchExpressions[0], wantNS) {
		t.Errorf("namespaceSelector %+v", w.NamespaceSelector)
	}
	// Pod CREATE (injection) and UPDATE of ephemeral containers (kubectl debug, checked), and
	// nothing else.
	var rules []string
	for _, r := range w.Rules {
		if !slices.Equal(r.APIGroups, []string{""}) || !slices.Equal(r.APIVersions, []string{"v1"}) {
			t.Errorf("rule %+v: want the core group, v1", r)
		}
		for _, op := range r.Operations {
			for _, res := range r.Resources {
				rules = append(rules, string(op)+" "+res)
			}
		}
	}
	if want := []string{"CREATE pods", "UPDATE pods/ephemeralcontainers"}; !slices.Equal(rules, want) {
		t.Errorf("rules %v, want %v", rules, want)
	}
}

func checkNetworkPolicy(t *testing.T, np networkingv1.NetworkPolicy) {
	t.Helper()
	if len(np.Spec.PodSelector.MatchLabels) != 0 || len(np.Spec.PodSelector.MatchExpressions) != 0 ||
		!slices.Equal(np.Spec.PolicyTypes, []networkingv1.PolicyType{networkingv1.PolicyTypeEgress}) || len(np.Spec.Ingress) != 0 {
		t.Errorf("networkpolicy spec %+v", np.Spec)
	}
	type hole struct {
		ns, component string
		ports         string
	}
	var got []hole
	for _, r := range np.Spec.Egress {
		if len(r.To) != 1 || r.To[0].NamespaceSelector == nil || r.To[0].PodSelector == nil || r.To[0].IPBlock != nil {
			t.Fatalf("egress rule %+v", r)
		}
		h := hole{ns: r.To[0].NamespaceSelector.MatchLabels["kubernetes.io/metadata.name"]}
		pl := r.To[0].PodSelector.MatchLabels
		h.component = pl["app.kubernetes.io/component"] + pl["k8s-app"]
		var ps []string
		for _, p := range r.Ports {
			ps = append(ps, string(*p.Protocol)+"/"+p.Port.String())
		}
		h.ports = strings.Join(ps, ",")
		got = append(got, h)
	}
	want := []hole{
		{"kube-system", "kube-dns", "UDP/53,TCP/53"},
		{ns, "controller", "TCP/8443"},
		{ns, "gateway", "TCP/4750"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("egress holes %+v\nwant %+v", got, want)
	}
}

// TestValues checks what the values turn into, and that bad values are refused with the
// field's name (schema) or the template's own message.
func TestValues(t *testing.T) {
	t.Parallel()
	x := newTool(t)
	gomem := func(args ...string) (string, bool) {
		var d appsv1.Deployment
		decode(t, find(t, render(x, args...), "Deployment", fullname), &d)
		v, ok := env(d.Spec.Template.Spec.Containers[0])["GOMEMLIMIT"]
		return v, ok
	}
	for _, tc := range []struct {
		args   []string
		want   string
		wantOK bool
	}{
		{[]string{"--set", "controller.resources.limits.memory=1Gi"}, "858993459", true},
		{[]string{"--set", "controller.resources.limits.memory=500M"}, "400000000", true},
		{[]string{"--set", "controller.goMemLimit=300MiB"}, "300MiB", true},
		{[]string{"--set", "controller.goMemLimit=off"}, "", false},
		{[]string{"--set", "controller.resources.limits=null"}, "", false},
	} {
		got, ok := gomem(tc.args...)
		if got != tc.want || ok != tc.wantOK {
			t.Errorf("%v: GOMEMLIMIT %q (set %v), want %q (%v)", tc.args, got, ok, tc.want, tc.wantOK)
		}
	}
	if got, _ := gomem("--set", "controller.resources.limits.memory=1073741824"); got != "858993459" {
		t.Errorf("limit in bytes: GOMEMLIMIT %q", got)
	}

	// The images: the controller's own settings move only the controller; the proxy's move the
	// gateway and the injected sidecar, and its pull policy is the controller's default.
	images := func(args ...string) (ctl corev1.Container, gw corev1.Container, sidecar string) {
		t.Helper()
		objs := render(x, append([]string{"--set", "gateway.enabled=true", "--set", "injector.enabled=true"}, args...)...)
		var d appsv1.Deployment
		decode(t, find(t, objs, "Deployment", fullname), &d)
		ctl = d.Spec.Template.Spec.Containers[0]
		decode(t, find(t, objs, "Deployment", fullname+"-gateway"), &d)
		return ctl, d.Spec.Template.Spec.Containers[0], env(ctl)["INJECT_SIDECAR_IMAGE"]
	}
	appVersion := chartAppVersion(t, x.chart)
	for _, tc := range []struct {
		args                           []string
		ctl, ctlPull, proxy, proxyPull string
	}{
		{nil, "ghcr.io/egress-guard/egress-guard-controller:" + appVersion, "IfNotPresent", "ghcr.io/egress-guard/egress-guard:" + appVersion, "IfNotPresent"},
		{[]string{"--set", "controller.image.repository=reg.example/ctl", "--set", "controller.image.tag=v2", "--set", "controller.image.pullPolicy=Always"},
			"reg.example/ctl:v2", "Always", "ghcr.io/egress-guard/egress-guard:" + appVersion, "IfNotPresent"},
		{[]string{"--set", "image.repository=reg.example/proxy", "--set", "image.tag=v3", "--set", "image.pullPolicy=Never"},
			"ghcr.io/egress-guard/egress-guard-controller:" + appVersion, "Never", "reg.example/proxy:v3", "Never"},
	} {
		ctl, gw, sidecar := images(tc.args...)
		if ctl.Image != tc.ctl || string(ctl.ImagePullPolicy) != tc.ctlPull {
			t.Errorf("%v: controller image %q (%s), want %q (%s)", tc.args, ctl.Image, ctl.ImagePullPolicy, tc.ctl, tc.ctlPull)
		}
		if gw.Image != tc.proxy || string(gw.ImagePullPolicy) != tc.proxyPull || sidecar != tc.proxy {
			t.Errorf("%v: gateway image %q (%s), injected sidecar %q, want %q (%s)", tc.args, gw.Image, gw.ImagePullPolicy, sidecar, tc.proxy, tc.proxyPull)
		}
	}

	// A user policy arrives in the ConfigMap unchanged in meaning.
	pol := `policy:
  identities:
    shop:
      service_accounts: ["shop/*"]
      allowed_destinations:
        - "*.shop-vendor.example.com"
        - destination: "db.internal"
          ports: [5432]
          allow_internal: true
`
	vf := filepath.Join(t.TempDir(), "values.yaml")
	if err := os.WriteFile(vf, []byte(pol), 0o644); err != nil {
		t.Fatal(err)
	}
	var cm corev1.ConfigMap
	decode(t, find(t, render(x, "-f", vf), "ConfigMap", fullname+"-policy"), &cm)
	p, err := policy.Parse("egress-policy.yaml", []byte(cm.Data["egress-policy.yaml"]), policy.Options{})
	if err != nil {
		t.Fatalf("rendered policy: %v\n%s", err, cm.Data["egress-policy.yaml"])
	}
	if ids := p.Identities(); len(ids) != 1 || p.Identity("shop") == nil {
		t.Errorf("rendered policy identities %v", ids)
	}

	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--set", "injector.udpPolicy=bogus"}, "udpPolicy"},
		{[]string{"--set", "injector.nativeSidecar=sometimes"}, "nativeSidecar"},
		{[]string{"--set", "image.repository="}, "repository"},
		{[]string{"--set", "image.pullPolicy=Sometimes"}, "pullPolicy"},
		{[]string{"--set", "controller.image.repository="}, "repository"},
		{[]string{"--set", "controller.image.pullPolicy=Sometimes"}, "pullPolicy"},
		{[]string{"--set", "controller.image.registry=x"}, "registry"},
		{[]string{"--set", "gatway.enabled=true"}, "gatway"},
		{[]string{"--set", "gateway.tokenAuth=maybe"}, "tokenAuth"},
		{[]string{"--set", "injector.redirectPort=70000"}, "redirectPort"},
		{[]string{"--set", "injector.excludePorts={http}"}, "excludePorts"},
		{[]string{"--set", "injector.excludeCIDRs={10.0.0.1}"}, "excludeCIDRs"},
		{[]string{"--set", "injector.sidecar.goMaxProcs=-1"}, "goMaxProcs"},
		{[]string{"--set", "controller.replicas=two"}, "replicas"},
		{[]string{"--set", "controller.logLevel=TRACE"}, "logLevel"},
		{[]string{"--set", "controller.goMemLimit=lots"}, "goMemLimit"},
		{[]string{"--set", "policy=null"}, "policy"},
		{[]string{"--set", "controller.resources.limits.memory=0.5Gi"}, "cannot derive GOMEMLIMIT"},
		{[]string{"--set", "networkPolicy.enabled=true", "--set", "networkPolicy.namespaces={" + ns + "}"}, "must not contain the release namespace"},
	} {
		args := append([]string{"template", rel, x.chart, "--namespace", ns}, tc.args...)
		out, errOut, err := x.run(nil, x.helm, args...)
		if err == nil {
			t.Errorf("%v: rendered (%d bytes), want an error naming %q", tc.args, len(out), tc.want)
		} else if !strings.Contains(errOut, tc.want) {
			t.Errorf("%v: error does not name %q:\n%s", tc.args, tc.want, errOut)
		}
	}

	// cert-manager: no generated Secret; Issuers and Certificates instead; the webhook's CA
	// comes from cert-manager's cainjector.
	objs := render(x, "--set", "certManager.enabled=true", "--set", "injector.enabled=true")
	var kinds []string
	for _, o := range objs {
		if o.Kind == "Secret" || o.APIVersion == "cert-manager.io/v1" {
			kinds = append(kinds, o.Kind+"/"+o.Metadata.Name)
		}
	}
	sort.Strings(kinds)
	if want := []string{"Certificate/" + fullname + "-ca", "Certificate/" + fullname + "-tls", "Issuer/" + fullname + "-ca", "Issuer/" + fullname + "-selfsigned"}; !slices.Equal(kinds, want) {
		t.Errorf("cert-manager objects %v, want %v", kinds, want)
	}
	var mwc admissionregistrationv1.MutatingWebhookConfiguration
	decode(t, find(t, objs, "MutatingWebhookConfiguration", fullname+"-"+ns), &mwc)
	if mwc.Annotations["cert-manager.io/inject-ca-from"] != ns+"/"+fullname+"-tls" || len(mwc.Webhooks[0].ClientConfig.CABundle) != 0 {
		t.Errorf("cert-manager webhook annotations %v caBundle %d bytes", mwc.Annotations, len(mwc.Webhooks[0].ClientConfig.CABundle))
	}
}
