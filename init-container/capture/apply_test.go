package capture

import (
	"flag"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/egress-guard/egress-guard/pkg/contract"
)

// Golden tests in the style of Istio's tools/istio-iptables TestIptables: each scenario runs
// the installer against the in-memory fake and compares the iptables commands it issued, and
// the tables it left, with testdata/<scenario>_<family>.golden. Rewrite them after a deliberate
// change with
//
//	go test ./init-container/capture/ -run TestApplyGolden -update
//
// and review the diff: it is the change in what the installer does to a node.
var update = flag.Bool("update", false, "rewrite testdata/*.golden with the commands the installer issues now")

// configA is the plan installed first; configB differs from it (another excluded port and range), as a
// ConfigMap edit followed by a re-run of the init container would; it changes both tables.
func configA() Config {
	return Config{
		ProxyUID: contract.ProxyUID, RedirectPort: contract.TransparentPort,
		DNSServers: []netip.Addr{netip.MustParseAddr("10.96.0.10"), netip.MustParseAddr("fd00:96::a")},
		UDPPolicy:  UDPDrop,
	}
}

func configB() Config {
	c := configA()
	c.ExcludePorts = []uint16{5432}
	c.ExcludeCIDRs = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("fd00:1::/64")}
	return c
}

// foreign adds rules that are not ours (kube-proxy's, an operator's) and must survive.
func foreign(t *testing.T, f *fakeIPTables, fam Family) {
	t.Helper()
	dst := "198.18.9.9/32"
	if fam == IPv6 {
		dst = "2001:db8::9/128"
	}
	must(t, f.NewChain("nat", "KUBE-SERVICES"))
	must(t, f.Append("nat", "OUTPUT", "-j", "KUBE-SERVICES"))
	must(t, f.Append("nat", "OUTPUT", "-d", dst, "-j", "RETURN"))
	must(t, f.Append("filter", "OUTPUT", "-d", dst, "-j", "ACCEPT"))
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// applied installs a plan before the scenario starts.
func applied(t *testing.T, in *Installer, c Config, fam Family) {
	t.Helper()
	if _, err := in.Apply(BuildPlan(c, fam)); err != nil {
		t.Fatal(err)
	}
}

type scenario struct {
	name  string
	about string
	setup func(t *testing.T, f *fakeIPTables, in *Installer, fam Family)
	run   func(t *testing.T, f *fakeIPTables, in *Installer, fam Family) string
}

var scenarios = []scenario{
	{
		name:  "fresh",
		about: "first run in a pod: chains built under the temporary names, jumped to, renamed",
		setup: func(t *testing.T, f *fakeIPTables, in *Installer, fam Family) { foreign(t, f, fam) },
		run: func(t *testing.T, f *fakeIPTables, in *Installer, fam Family) string {
			changed, err := in.Apply(BuildPlan(configA(), fam))
			if err != nil || !changed {
				t.Fatalf("Apply: changed %v, %v", changed, err)
			}
			return fmt.Sprintf("changed: %v", changed)
		},
	},
	{
		name:  "unchanged",
		about: "re-run with the plan in place: rules read and verified, nothing changed",
		setup: func(t *testing.T, f *fakeIPTables, in *Installer, fam Family) {
			foreign(t, f, fam)
			applied(t, in, configA(), fam)
		},
		run: func(t *testing.T, f *fakeIPTables, in *Installer, fam Family) string {
			changed, err := in.Apply(BuildPlan(configA(), fam))
			if err != nil || changed {
				t.Fatalf("Apply: changed %v, %v", changed, err)
			}
			if m := f.mutations(); len(m) > 0 {
				t.Errorf("a re-run with the plan in place changed the tables:\n%s", strings.Join(m, "\n"))
			}
			return fmt.Sprintf("changed: %v", changed)
		},
	},
	{
		name:  "changed",
		about: "re-run with a changed plan: the new chain is filled and jumped to before the old one goes",
		setup: func(t *testing.T, f *fakeIPTables, in *Installer, fam Family) {
			foreign(t, f, fam)
			applied(t, in, configA(), fam)
		},
		run: changedTo(configB()),
	},
	{
		name:  "leftover_new",
		about: "a run crashed while filling the temporary chain: it is emptied and reused",
		setup: func(t *testing.T, f *fakeIPTables, in *Installer, fam Family) {
			foreign(t, f, fam)
			applied(t, in, configA(), fam)
			tmp := contract.NatChain + "_NEW"
			must(t, f.NewChain("nat", tmp))
			must(t, f.Append("nat", tmp, BuildPlan(configB(), fam).Tables[0].Rules[0]...))
		},
		run: changedTo(configB()),
	},
	{
		name:  "crashed_after_jump",
		about: "a run crashed after jumping to the complete temporary chain: its last steps are finished, then the plan is checked",
		setup: func(t *testing.T, f *fakeIPTables, in *Installer, fam Family) {
			foreign(t, f, fam)
			applied(t, in, configA(), fam)
			crash(t, f, BuildPlan(configB(), fam).Tables[0], false)
		},
		run: changedTo(configB()),
	},
	{
		name:  "crashed_before_rename",
		about: "a run crashed after removing the old chain: the temporary one, the only capture, is renamed, not emptied",
		setup: func(t *testing.T, f *fakeIPTables, in *Installer, fam Family) {
			foreign(t, f, fam)
			applied(t, in, configA(), fam)
			crash(t, f, BuildPlan(configB(), fam).Tables[0], true)
		},
		run: changedTo(configB()),
	},
	{
		name:  "crashed_then_plan_changed",
		about: "a run crashed after jumping to its temporary chain, and the plan changed again before the re-run",
		setup: func(t *testing.T, f *fakeIPTables, in *Installer, fam Family) {
			foreign(t, f, fam)
			applied(t, in, configA(), fam)
			crash(t, f, BuildPlan(configB(), fam).Tables[0], true)
		},
		run: func(t *testing.T, f *fakeIPTables, in *Installer, fam Family) string {
			b, c := BuildPlan(configB(), fam), BuildPlan(configA(), fam)
			f.after = func(call string) {
				// nat holds B (the crashed run's), filter holds A: both are complete.
				if err := captured(f, Plan{Tables: []TablePlan{b.Tables[0], c.Tables[1]}}, c); err != nil {
					t.Errorf("after %q: %v", call, err)
				}
			}
			changed, err := in.Apply(c)
			if err != nil || !changed {
				t.Fatalf("Apply: changed %v, %v", changed, err)
			}
			return fmt.Sprintf("changed: %v", changed)
		},
	},
	{
		name:  "cleanup",
		about: "cleanup removes our jumps and chains (a leftover temporary one too), and nothing else",
		setup: func(t *testing.T, f *fakeIPTables, in *Installer, fam Family) {
			foreign(t, f, fam)
			applied(t, in, configA(), fam)
			must(t, f.NewChain("filter", contract.FilterChain+"_NEW"))
		},
		run: func(t *testing.T, f *fakeIPTables, in *Installer, fam Family) string {
			must(t, in.Cleanup(BuildPlan(configA(), fam)))
			n := len(f.log)
			must(t, in.Cleanup(BuildPlan(configB(), fam)))
			if m := slices.DeleteFunc(f.mutations(), func(l string) bool { return slices.Contains(f.log[:n], l) }); len(m) > 0 {
				t.Errorf("a second cleanup changed the tables:\n%s", strings.Join(m, "\n"))
			}
			saved := f.save()
			if strings.Contains(saved, "EGRESS_GUARD") {
				t.Errorf("cleanup left our rules:\n%s", saved)
			}
			if !strings.Contains(saved, "-A OUTPUT -j KUBE-SERVICES") || strings.Count(saved, "-A OUTPUT -d ") != 2 {
				t.Errorf("cleanup removed a foreign rule:\n%s", saved)
			}
			return "cleaned twice (the second run finds nothing to remove)"
		},
	},
}

// changedTo applies the plan of c over configA's, checking after every change that OUTPUT
// jumps first to a complete chain of one plan or the other.
func changedTo(c Config) func(t *testing.T, f *fakeIPTables, in *Installer, fam Family) string {
	return func(t *testing.T, f *fakeIPTables, in *Installer, fam Family) string {
		old, plan := BuildPlan(configA(), fam), BuildPlan(c, fam)
		f.after = func(call string) {
			if err := captured(f, old, plan); err != nil {
				t.Errorf("after %q: %v", call, err)
			}
		}
		changed, err := in.Apply(plan)
		if err != nil || !changed {
			t.Fatalf("Apply: changed %v, %v", changed, err)
		}
		return fmt.Sprintf("changed: %v", changed)
	}
}

// crash leaves the state of an Apply of tp that stopped right after inserting the jump to its
// temporary chain, or (removed) after it also removed the old chain.
func crash(t *testing.T, f *fakeIPTables, tp TablePlan, removed bool) {
	t.Helper()
	tmp := tp.Chain + "_NEW"
	must(t, f.NewChain(tp.Table, tmp))
	for _, r := range tp.Rules {
		must(t, f.Append(tp.Table, tmp, r...))
	}
	must(t, f.Insert(tp.Table, "OUTPUT", 1, Jump(tmp)...))
	if removed {
		must(t, f.Delete(tp.Table, "OUTPUT", Jump(tp.Chain)...))
		must(t, f.ClearChain(tp.Table, tp.Chain))
		must(t, f.DeleteChain(tp.Table, tp.Chain))
	}
}

func TestApplyGolden(t *testing.T) {
	for _, sc := range scenarios {
		for _, fam := range []Family{IPv4, IPv6} {
			name := fmt.Sprintf("%s_%s", sc.name, strings.ToLower(fam.String()))
			t.Run(name, func(t *testing.T) {
				f := newFakeIPTables(fam)
				in := NewInstallerWith(BackendNFT, fam, f)
				sc.setup(t, f, in, fam)
				f.log = nil
				result := sc.run(t, f, in, fam)

				var b strings.Builder
				fmt.Fprintf(&b, "# %s (%s)\n# %s\n\n", sc.name, fam, sc.about)
				for _, l := range f.log {
					b.WriteString(l + "\n")
				}
				fmt.Fprintf(&b, "\n# %s; the tables now:\n%s", result, f.save())
				golden(t, filepath.Join("testdata", name+".golden"), b.String())
			})
		}
	}
}

func golden(t *testing.T, path, got string) {
	t.Helper()
	if *update {
		must(t, os.MkdirAll(filepath.Dir(path), 0o755))
		must(t, os.WriteFile(path, []byte(got), 0o644))
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run the test with -update to create it)", err)
	}
	if got != string(want) {
		t.Errorf("%s differs (rerun with -update and review the diff if the change is intended):\n--- got\n%s\n--- want\n%s", path, got, want)
	}
}

// captured checks the windowless property: in every table of the plans, OUTPUT's first rule
// jumps to a chain that holds exactly the old or the new plan's rules.
func captured(f *fakeIPTables, old, plan Plan) error {
	for i, tp := range plan.Tables {
		t := f.tables[tp.Table]
		out := t.chains["OUTPUT"]
		if len(out) == 0 {
			return fmt.Errorf("%s OUTPUT is empty", tp.Table)
		}
		target := jumpTarget(out[0])
		rules, ok := t.chains[target]
		if !ok || !strings.HasPrefix(target, tp.Chain) {
			return fmt.Errorf("%s OUTPUT starts with %q, not a jump to our chain", tp.Table, out[0])
		}
		complete := func(p TablePlan) bool {
			var want []string
			for _, r := range p.Rules {
				want = append(want, r.String())
			}
			return slices.Equal(rules, want)
		}
		if !complete(old.Tables[i]) && !complete(tp) {
			return fmt.Errorf("%s OUTPUT jumps to %s, which is neither the old nor the new plan: %q", tp.Table, target, rules)
		}
	}
	return nil
}

// TestApplyFamiliesApart checks that the families stay apart: applying IPv6 leaves
// the IPv4 fake untouched, and each plan names only its own family's addresses.
func TestApplyFamiliesApart(t *testing.T) {
	f4, f6 := newFakeIPTables(IPv4), newFakeIPTables(IPv6)
	in := &Installer{Backend: BackendLegacy, v4: f4, v6: f6}
	if _, err := in.Apply(BuildPlan(configA(), IPv6)); err != nil {
		t.Fatal(err)
	}
	if len(f4.log) != 0 {
		t.Fatalf("IPv6 apply used the IPv4 iptables:\n%s", strings.Join(f4.log, "\n"))
	}
	if s := f6.save(); strings.Contains(s, "10.96.0.10") || !strings.Contains(s, "fd00:96::a/128") {
		t.Fatalf("IPv6 tables:\n%s", s)
	}
}

// TestApplyExplainsFailures checks that a failing iptables call comes back as one line naming
// the family and table.
func TestApplyExplainsFailures(t *testing.T) {
	f := newFakeIPTables(IPv4)
	delete(f.tables, "nat")
	_, err := NewInstallerWith(BackendNFT, IPv4, f).Apply(BuildPlan(configA(), IPv4))
	if err == nil || !strings.Contains(err.Error(), "IPv4 nat table is not available") || strings.Contains(err.Error(), "\n") {
		t.Fatalf("want a one-line explanation, got %v", err)
	}
}
