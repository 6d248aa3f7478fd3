package inject

import (
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"
)

var update = flag.Bool("update", false, "rewrite the golden files")

func testConfig() Config {
	return Config{
		Version:         "test",
		SidecarImage:    "egress-guard:test",
		InitImage:       "egress-guard-init:test",
		ControlPlaneURL: "https://egress-guard.egress-guard.svc:443",
		ControlPlaneCA:  "-----BEGIN CERTIFICATE-----\nTEST\n-----END CERTIFICATE-----\n",
		ProxyUID:        15337,
		ProxyGID:        15337,
		RedirectPort:    15001,
		ExcludeCIDRs:    []netip.Prefix{netip.MustParsePrefix("10.96.0.1/32")},
		ExcludePorts:    []uint16{5432},
		UDPPolicy:       "drop",
		NativeSidecar:   true,
		GoMaxProcs:      1,
		Resources: corev1.ResourceRequirements{
			Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("20m"), corev1.ResourceMemory: resource.MustParse("32Mi")},
			Limits:   corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("128Mi")},
		},
	}
}

type testCase struct {
	Classic         bool              `json:"classic"`
	Strict          bool              `json:"strict"` // Config.RequireFixedUser
	NamespaceLabels map[string]string `json:"namespaceLabels"`
	Pod             corev1.Pod        `json:"pod"`
}

// TestMutateGolden runs every testdata/*.yaml through Mutate and compares the result with
// its .golden file: the injected pod as YAML, the pod unchanged, or the refusal's message.
// go test ./controller/inject -update rewrites them.
func TestMutateGolden(t *testing.T) {
	files, _ := filepath.Glob("testdata/*.yaml")
	if len(files) < 8 {
		t.Fatalf("%d cases", len(files))
	}
	for _, f := range files {
		t.Run(strings.TrimSuffix(filepath.Base(f), ".yaml"), func(t *testing.T) {
			raw, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			var tc testCase
			if err := yaml.UnmarshalStrict(raw, &tc); err != nil {
				t.Fatal(err)
			}
			cfg := testConfig()
			cfg.NativeSidecar = !tc.Classic
			cfg.RequireFixedUser = tc.Strict
			before, _ := yaml.Marshal(tc.Pod)
			out, err := Mutate(&tc.Pod, tc.NamespaceLabels, cfg)
			var got []byte
			switch {
			case err != nil:
				got = []byte("refused: " + err.Error() + "\n")
			case out == &tc.Pod:
				got = []byte("unchanged\n")
			default:
				got, _ = yaml.Marshal(out)
				// Idempotent: injecting the result again changes nothing.
				if again, err := Mutate(out, tc.NamespaceLabels, cfg); err != nil || again != out {
					t.Fatalf("a second injection changed the pod (%v)", err)
				}
			}
			if after, _ := yaml.Marshal(tc.Pod); string(after) != string(before) {
				t.Fatal("Mutate changed its argument")
			}
			golden := strings.TrimSuffix(f, ".yaml") + ".golden"
			if *update {
				os.WriteFile(golden, got, 0o644)
				return
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run with -update)", err)
			}
			if string(got) != string(want) {
				t.Fatalf("got:\n%s\nwant:\n%s", got, want)
			}
		})
	}
}

// The sidecar's Go runtime settings: GOMAXPROCS only when the platform set one, GOMEMLIMIT 80 %
// of the memory limit only when there is one.
func TestSidecarRuntimeEnv(t *testing.T) {
	env := func(cfg Config) map[string]string {
		out := map[string]string{}
		for _, e := range cfg.sidecar().Env {
			out[e.Name] = e.Value
		}
		return out
	}
	cfg := testConfig()
	cfg.GoMaxProcs = 2
	cfg.Resources.Limits = corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("100M")}
	if got := env(cfg); got["GOMAXPROCS"] != "2" || got["GOMEMLIMIT"] != "80000000" {
		t.Fatalf("GOMAXPROCS %q, GOMEMLIMIT %q; want 2 and 80000000", got["GOMAXPROCS"], got["GOMEMLIMIT"])
	}
	cfg.GoMaxProcs, cfg.Resources.Limits = 0, nil
	got := env(cfg)
	if _, ok := got["GOMAXPROCS"]; ok {
		t.Fatalf("GOMAXPROCS %q with GoMaxProcs 0, want the runtime's default", got["GOMAXPROCS"])
	}
	if _, ok := got["GOMEMLIMIT"]; ok {
		t.Fatalf("GOMEMLIMIT %q without a memory limit", got["GOMEMLIMIT"])
	}
}

// A later webhook adds a container to an injected pod and the API server re-invokes the
// injector (reinvocationPolicy IfNeeded): the added container is checked like any other.
func TestReinvocationChecksAddedContainers(t *testing.T) {
	cfg := testConfig()
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "app", Namespace: "shop"},
		Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "app:1"}}},
	}
	labels := map[string]string{LabelInject: "enabled"}
	injected, err := Mutate(pod, labels, cfg)
	if err != nil || injected == pod {
		t.Fatalf("first injection: %v", err)
	}
	if again, err := Mutate(injected, labels, cfg); err != nil || again != injected {
		t.Fatalf("re-invocation with the injection intact changed the pod (%v)", err)
	}
	added := injected.DeepCopy()
	uid := cfg.ProxyUID
	added.Spec.Containers = append(added.Spec.Containers, corev1.Container{
		Name: "added-by-another-webhook", Image: "agent:1",
		SecurityContext: &corev1.SecurityContext{RunAsUser: &uid},
	})
	_, err = Mutate(added, labels, cfg)
	want := `egress-guard refuses this pod: container "added-by-another-webhook" runs as UID 15337, the proxy's, whose traffic is not captured: choose another UID`
	if err == nil || err.Error() != want {
		t.Fatalf("got %v, want %s", err, want)
	}
}

// Ephemeral containers get the same checks as app containers, RequireFixedUser's included.
func TestCheckEphemeral(t *testing.T) {
	cfg := testConfig()
	uid, root, no := cfg.ProxyUID, int64(0), false
	pod := &corev1.Pod{Spec: corev1.PodSpec{EphemeralContainers: []corev1.EphemeralContainer{
		{EphemeralContainerCommon: corev1.EphemeralContainerCommon{Name: "plain"}},
		{EphemeralContainerCommon: corev1.EphemeralContainerCommon{Name: "root", SecurityContext: &corev1.SecurityContext{RunAsUser: &root, AllowPrivilegeEscalation: &no}}},
	}}}
	if err := CheckEphemeral(pod, cfg); err != nil {
		t.Fatalf("without RequireFixedUser: %v", err)
	}
	cfg.RequireFixedUser = true
	err := CheckEphemeral(pod, cfg)
	want := `egress-guard refuses this pod: ephemeral container "plain" has no runAsUser (nor has the pod): the image's user is unknown here and could be the proxy's, whose traffic is not captured: set runAsUser to a UID other than 0; ` +
		`ephemeral container "plain" allows privilege escalation, with which a setuid program could make it the proxy's UID: set allowPrivilegeEscalation: false; ` +
		`ephemeral container "root" runs as root, which can switch to the proxy's UID, whose traffic is not captured: set runAsUser to a UID other than 0`
	if err == nil || err.Error() != want {
		t.Fatalf("got %v\nwant %s", err, want)
	}
	pod.Spec.EphemeralContainers = []corev1.EphemeralContainer{{EphemeralContainerCommon: corev1.EphemeralContainerCommon{Name: "as-proxy", SecurityContext: &corev1.SecurityContext{RunAsUser: &uid, AllowPrivilegeEscalation: &no}}}}
	if err := CheckEphemeral(pod, cfg); err == nil || !strings.Contains(err.Error(), `ephemeral container "as-proxy" runs as UID 15337, the proxy's`) {
		t.Fatalf("as the proxy's UID: %v", err)
	}
}
