package capture

import (
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"

	"github.com/coreos/go-iptables/iptables"
)

// Backend is an iptables variant: the nf_tables one or the legacy x_tables one. Rules
// written with one are invisible to the other, and only the one the node's kernel path uses
// has effect on its traffic.
type Backend string

// Backends.
const (
	BackendNFT    Backend = "nft"
	BackendLegacy Backend = "legacy"
)

// commands returns the binaries of the backend for a family.
func (b Backend) commands(fam Family) (cmd, save string) {
	base := "iptables"
	if fam == IPv6 {
		base = "ip6tables"
	}
	return base + "-" + string(b), base + "-" + string(b) + "-save"
}

// DetectBackend chooses the backend by looking at the nat table: the one that already holds
// rules (kube-proxy's, the CNI's, or ours from an earlier run) is the one the node uses. With
// no rules anywhere (a fresh pod namespace), the variant that plain "iptables" runs is used.
// It never probes by inserting a rule.
func DetectBackend(run func(name string, args ...string) (string, error)) (Backend, string, error) {
	counts := map[Backend]int{}
	var seen []Backend
	for _, b := range []Backend{BackendLegacy, BackendNFT} {
		if b == BackendLegacy && !legacyNatLoaded() {
			// Reading the legacy nat table would create it; its absence already says it
			// holds no rules.
			continue
		}
		_, save := b.commands(IPv4)
		out, err := run(save, "-t", "nat")
		if err != nil {
			continue
		}
		seen = append(seen, b)
		for _, l := range strings.Split(out, "\n") {
			if strings.HasPrefix(l, "-A ") {
				counts[b]++
			}
		}
	}
	switch {
	case counts[BackendLegacy] > 0 && counts[BackendNFT] == 0:
		return BackendLegacy, fmt.Sprintf("legacy nat table has %d rules, nft has none", counts[BackendLegacy]), nil
	case counts[BackendNFT] > 0 && counts[BackendLegacy] == 0:
		return BackendNFT, fmt.Sprintf("nft nat table has %d rules, legacy has none", counts[BackendNFT]), nil
	case counts[BackendNFT] > 0 && counts[BackendLegacy] > 0:
		// Both in use: the one with more rules is the node's (the other is usually a stray
		// probe or an old leftover). Say so, so the operator can pin it.
		b := BackendNFT
		if counts[BackendLegacy] > counts[BackendNFT] {
			b = BackendLegacy
		}
		return b, fmt.Sprintf("both nat tables have rules (legacy %d, nft %d); chose %s (set --iptables-backend to override)", counts[BackendLegacy], counts[BackendNFT], b), nil
	}
	out, err := run("iptables", "--version")
	if err != nil {
		if len(seen) == 1 {
			return seen[0], "only " + string(seen[0]) + " is installed", nil
		}
		return "", "", fmt.Errorf("no iptables found: install iptables (both iptables-nft and iptables-legacy come with Debian's iptables package)")
	}
	if strings.Contains(out, "nf_tables") {
		return BackendNFT, "nat tables empty; iptables is the nf_tables variant", nil
	}
	return BackendLegacy, "nat tables empty; iptables is the legacy variant", nil
}

// legacyNatLoaded reports whether this namespace has a legacy (x_tables) nat table. The
// kernel lists the tables that exist; a missing file means no legacy tables at all.
func legacyNatLoaded() bool {
	b, err := os.ReadFile("/proc/net/ip_tables_names")
	if err != nil {
		return false
	}
	return slices.Contains(strings.Fields(string(b)), "nat")
}

// IPTables is the subset of iptables operations the installer uses, one method per iptables
// command, so that apply, verify and cleanup can be tested against an in-memory table.
// *iptables.IPTables from github.com/coreos/go-iptables is the production implementation.
type IPTables interface {
	ListChains(table string) ([]string, error)                 // -S: the names of every chain
	List(table, chain string) ([]string, error)                // -S chain: "-P"/"-N" line, then "-A" lines
	NewChain(table, chain string) error                        // -N
	ClearChain(table, chain string) error                      // -F (go-iptables tries -N first)
	Append(table, chain string, rule ...string) error          // -A
	Insert(table, chain string, pos int, rule ...string) error // -I
	Exists(table, chain string, rule ...string) (bool, error)  // -C
	Delete(table, chain string, rule ...string) error          // -D
	DeleteChain(table, chain string) error                     // -X
	RenameChain(table, oldChain, newChain string) error        // -E
}

var _ IPTables = (*iptables.IPTables)(nil)

// Installer applies plans with one backend.
type Installer struct {
	Backend Backend
	v4, v6  IPTables
}

// NewInstaller prepares the backend's commands for the families requested.
func NewInstaller(b Backend, families ...Family) (*Installer, error) {
	in := &Installer{Backend: b}
	for _, fam := range families {
		cmd, _ := b.commands(fam)
		path, err := exec.LookPath(cmd)
		if err != nil {
			return nil, fmt.Errorf("%s not found: install iptables (Debian: apt-get install iptables): %w", cmd, err)
		}
		proto := iptables.ProtocolIPv4
		if fam == IPv6 {
			proto = iptables.ProtocolIPv6
		}
		ipt, err := iptables.New(iptables.IPFamily(proto), iptables.Path(path), iptables.Timeout(5))
		if err != nil {
			return nil, fmt.Errorf("%s: %w", cmd, err)
		}
		in.set(fam, ipt)
	}
	return in, nil
}

// NewInstallerWith returns an installer that uses ipt for one family (tests use an in-memory
// implementation).
func NewInstallerWith(b Backend, fam Family, ipt IPTables) *Installer {
	in := &Installer{Backend: b}
	in.set(fam, ipt)
	return in
}

func (in *Installer) set(fam Family, ipt IPTables) {
	if fam == IPv6 {
		in.v6 = ipt
	} else {
		in.v4 = ipt
	}
}

func (in *Installer) ipt(fam Family) IPTables {
	if fam == IPv6 {
		return in.v6
	}
	return in.v4
}

// Apply makes the kernel's rules equal the plan. It is idempotent: when the rules already
// match, nothing is touched. Otherwise the new chain is built completely under a temporary
// name, the jump to it is inserted at the top of OUTPUT, and only then are the old jump and
// chain removed and the new chain renamed (a rename keeps the jump pointing at it). At every
// moment OUTPUT jumps to a complete chain, so no connection escapes while a kubelet re-run of
// the init container reconciles.
func (in *Installer) Apply(p Plan) (changed bool, err error) {
	ipt := in.ipt(p.Family)
	for _, t := range p.Tables {
		tmp := t.Chain + "_NEW"
		finished, err := finishCrashedRun(ipt, t.Table, t.Chain, tmp)
		if err != nil {
			return changed, explain(p.Family, t.Table, err)
		}
		changed = changed || finished
		ok, err := matches(ipt, t)
		if err != nil {
			return changed, explain(p.Family, t.Table, err)
		}
		if ok {
			continue
		}
		changed = true
		if err := emptyChain(ipt, t.Table, tmp); err != nil { // creates it, or empties a leftover
			return changed, explain(p.Family, t.Table, err)
		}
		for _, r := range t.Rules {
			if err := ipt.Append(t.Table, tmp, r...); err != nil {
				return changed, explain(p.Family, t.Table, fmt.Errorf("append %q: %w", r, err))
			}
		}
		if err := ipt.Insert(t.Table, "OUTPUT", 1, Jump(tmp)...); err != nil {
			return changed, explain(p.Family, t.Table, err)
		}
		if err := removeChain(ipt, t.Table, t.Chain); err != nil {
			return changed, explain(p.Family, t.Table, err)
		}
		if err := ipt.RenameChain(t.Table, tmp, t.Chain); err != nil {
			return changed, explain(p.Family, t.Table, err)
		}
	}
	return changed, in.verify(p)
}

// finishCrashedRun completes a run that crashed after it jumped to its temporary chain: that
// chain was complete when the jump was inserted, and the jump may be all that captures traffic
// now, so it must be neither flushed nor unhooked. The crashed run's remaining steps are done
// instead (remove the old chain and its jumps, rename the temporary one), which keeps OUTPUT
// jumping to a complete chain throughout. A temporary chain without a jump (a crash while it
// was being filled) is left for Apply to empty and refill.
func finishCrashedRun(ipt IPTables, table, chain, tmp string) (bool, error) {
	exists, err := chainExists(ipt, table, tmp)
	if err != nil || !exists {
		return false, err
	}
	jumped, err := ipt.Exists(table, "OUTPUT", Jump(tmp)...)
	if err != nil || !jumped {
		return false, err
	}
	if err := removeChain(ipt, table, chain); err != nil {
		return false, err
	}
	return true, ipt.RenameChain(table, tmp, chain)
}

// matches reports whether OUTPUT starts with our only jump and our chain holds the plan.
func matches(ipt IPTables, t TablePlan) (bool, error) {
	exists, err := chainExists(ipt, t.Table, t.Chain)
	if err != nil || !exists {
		return false, err
	}
	if err := check(ipt, t); err != nil {
		return false, nil
	}
	return true, nil
}

// check compares the live rules with the plan.
func check(ipt IPTables, t TablePlan) error {
	out, err := ipt.List(t.Table, "OUTPUT")
	if err != nil {
		return err
	}
	jump := "-A OUTPUT " + Jump(t.Chain).String()
	var jumps []int
	for i, l := range out {
		if strings.HasPrefix(l, "-A OUTPUT") && strings.Contains(l, "-j "+t.Chain) {
			jumps = append(jumps, i)
		}
	}
	// out[0] is the chain's policy line ("-P OUTPUT ACCEPT").
	if len(jumps) != 1 || jumps[0] != 1 || out[1] != jump {
		return fmt.Errorf("OUTPUT in %s must start with the only %q; found %q", t.Table, jump, out)
	}
	got, err := ipt.List(t.Table, t.Chain)
	if err != nil {
		return err
	}
	want := []string{"-N " + t.Chain}
	for _, r := range t.Rules {
		want = append(want, "-A "+t.Chain+" "+r.String())
	}
	if !slices.Equal(got, want) {
		return fmt.Errorf("chain %s in %s differs from the plan:\n got: %q\nwant: %q", t.Chain, t.Table, got, want)
	}
	return nil
}

// verify reads the rules back and fails unless they are exactly the plan.
func (in *Installer) verify(p Plan) error {
	ipt := in.ipt(p.Family)
	for _, t := range p.Tables {
		if err := check(ipt, t); err != nil {
			return fmt.Errorf("verify %s %s rules with %s backend: %w", p.Family, t.Table, in.Backend, err)
		}
	}
	return nil
}

// Cleanup removes our jumps and chains (and a temporary chain a crashed run left) from every
// table of the plan, and nothing else. Removing what is not there is not an error. Only the
// plan's tables and chain names are used, not its rules, so any plan of the family will do.
func (in *Installer) Cleanup(p Plan) error {
	ipt := in.ipt(p.Family)
	for _, t := range p.Tables {
		for _, c := range []string{t.Chain, t.Chain + "_NEW"} {
			if err := removeChain(ipt, t.Table, c); err != nil {
				return explain(p.Family, t.Table, err)
			}
		}
	}
	return nil
}

func chainExists(ipt IPTables, table, chain string) (bool, error) {
	chains, err := ipt.ListChains(table)
	if err != nil {
		return false, err
	}
	return slices.Contains(chains, chain), nil
}

// emptyChain creates chain, or flushes it if it exists.
func emptyChain(ipt IPTables, table, chain string) error {
	exists, err := chainExists(ipt, table, chain)
	if err != nil {
		return err
	}
	if exists {
		return ipt.ClearChain(table, chain)
	}
	return ipt.NewChain(table, chain)
}

// removeChain deletes every jump from OUTPUT to chain, then the chain.
func removeChain(ipt IPTables, table, chain string) error {
	exists, err := chainExists(ipt, table, chain)
	if err != nil || !exists {
		return err // no chain, so no jump to it can exist either
	}
	for {
		ok, err := ipt.Exists(table, "OUTPUT", Jump(chain)...)
		if err != nil {
			return err
		}
		if !ok {
			break
		}
		if err := ipt.Delete(table, "OUTPUT", Jump(chain)...); err != nil {
			return err
		}
	}
	if err := ipt.ClearChain(table, chain); err != nil {
		return err
	}
	return ipt.DeleteChain(table, chain)
}

// explain turns the usual failures into one line that says what is missing.
func explain(fam Family, table string, err error) error {
	msg := err.Error()
	switch {
	case strings.Contains(msg, "Permission denied") || strings.Contains(msg, "Operation not permitted"):
		return fmt.Errorf("%s %s table: permission denied: the init container needs the NET_ADMIN capability (and NET_RAW for iptables): %w", fam, table, err)
	case strings.Contains(msg, "Table does not exist") || strings.Contains(msg, "can't initialize"):
		return fmt.Errorf("%s %s table is not available: load the kernel module (%s) on the node: %w", fam, table, natModule(fam, table), err)
	}
	return fmt.Errorf("%s %s table: %w", fam, table, err)
}

func natModule(fam Family, table string) string {
	prefix := "ip"
	if fam == IPv6 {
		prefix = "ip6"
	}
	if table == "nat" {
		return prefix + "table_nat / nf_nat"
	}
	return prefix + "table_filter"
}
