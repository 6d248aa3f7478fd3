package charttest

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/egress-guard/egress-guard/internal/kubelab"
)

// repoRoot is the directory above the working directory that holds go.mod
// and charts/egress-guard.
func repoRoot() (string, error) {
	wd, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for d := wd; ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "charts", "egress-guard", "Chart.yaml")); err == nil {
			return d, nil
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("charts/egress-guard not found above %s", wd)
		}
	}
}

// tool runs helm or kubectl with a private HOME for helm's config, cache and data.
type tool struct {
	t          testing.TB
	helm       string
	kubectl    string
	chart      string
	home       string
	kubeconfig string
}

func newTool(t testing.TB) *tool {
	t.Helper()
	root, err := repoRoot()
	if err != nil {
		t.Fatal(err)
	}
	return &tool{t: t, helm: kubelab.RequireHelm(t), chart: filepath.Join(root, "charts", "egress-guard"), home: t.TempDir()}
}

// with returns a copy of x that reports to t (a subtest).
func (x *tool) with(t testing.TB) *tool {
	y := *x
	y.t = t
	return &y
}

func (x *tool) env() []string {
	env := append(os.Environ(),
		"HELM_CONFIG_HOME="+filepath.Join(x.home, "config"),
		"HELM_CACHE_HOME="+filepath.Join(x.home, "cache"),
		"HELM_DATA_HOME="+filepath.Join(x.home, "data"),
		"HELM_NO_PLUGINS=1",
	)
	if x.kubeconfig != "" {
		env = append(env, "KUBECONFIG="+x.kubeconfig)
	} else {
		// helm template/lint must not reach any cluster of the developer's.
		env = append(env, "KUBECONFIG="+filepath.Join(x.home, "no-kubeconfig"))
	}
	return env
}

// run runs bin with args (stdin optional) and returns stdout, stderr and the error.
func (x *tool) run(stdin []byte, bin string, args ...string) (string, string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = x.env()
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	return stdout.String(), stderr.String(), err
}

// must runs and fails the test on error.
func (x *tool) must(stdin []byte, bin string, args ...string) string {
	x.t.Helper()
	out, errOut, err := x.run(stdin, bin, args...)
	if err != nil {
		x.t.Fatalf("%s %s: %v\nstdout:\n%s\nstderr:\n%s", filepath.Base(bin), strings.Join(args, " "), err, out, errOut)
	}
	return out
}

// template renders the chart as release rel in namespace ns with --set flags.
func (x *tool) template(rel, ns string, sets ...string) string {
	x.t.Helper()
	args := []string{"template", rel, x.chart, "--namespace", ns}
	for _, s := range sets {
		args = append(args, "--set", s)
	}
	return x.must(nil, x.helm, args...)
}

// object is one rendered manifest.
type object struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name      string            `json:"name"`
		Namespace string            `json:"namespace"`
		Labels    map[string]string `json:"labels"`
	} `json:"metadata"`
	raw []byte
}

func (o object) key() string {
	if o.Metadata.Namespace == "" {
		return o.Kind + "/" + o.Metadata.Name
	}
	return o.Kind + "/" + o.Metadata.Namespace + "/" + o.Metadata.Name
}

// splitManifests parses a multi-document YAML stream, dropping empty documents.
func splitManifests(t testing.TB, s string) []object {
	t.Helper()
	var objs []object
	for _, doc := range strings.Split("\n"+s, "\n---") {
		trimmed := strings.TrimSpace(doc)
		if trimmed == "" || !strings.Contains(trimmed, "kind:") {
			continue
		}
		var o object
		if err := yaml.Unmarshal([]byte(doc), &o); err != nil {
			t.Fatalf("rendered document does not parse: %v\n%s", err, doc)
		}
		if o.Kind == "" {
			continue
		}
		o.raw = []byte(doc)
		objs = append(objs, o)
	}
	return objs
}

// decode decodes one rendered object strictly (an unknown field is an error) into v.
func decode(t testing.TB, o object, v any) {
	t.Helper()
	if err := yaml.UnmarshalStrict(o.raw, v); err != nil {
		t.Fatalf("%s: %v\n%s", o.key(), err, o.raw)
	}
}

func find(t testing.TB, objs []object, kind, name string) object {
	t.Helper()
	for _, o := range objs {
		if o.Kind == kind && o.Metadata.Name == name {
			return o
		}
	}
	t.Fatalf("no %s %q rendered; have %v", kind, name, keys(objs))
	return object{}
}

func keys(objs []object) []string {
	var ks []string
	for _, o := range objs {
		ks = append(ks, o.key())
	}
	return ks
}

func joinManifests(objs []object, skipKinds ...string) []byte {
	var b bytes.Buffer
	for _, o := range objs {
		skip := false
		for _, k := range skipKinds {
			skip = skip || o.Kind == k
		}
		if !skip {
			b.WriteString("---\n")
			b.Write(bytes.TrimSpace(o.raw))
			b.WriteString("\n")
		}
	}
	return b.Bytes()
}
