package capture

import (
	"errors"
	"fmt"
	"slices"
	"sort"
	"strconv"
	"strings"
)

// fakeIPTables is an in-memory IPTables for one family. Every call is recorded as the
// iptables command line it stands for; a failing call is recorded with its error. It enforces
// what the kernel enforces and the installer relies on: a chain must exist to be used, a
// referenced or non-empty chain cannot be deleted, a jump needs an existing target chain,
// names are unique.
type fakeIPTables struct {
	cmd    string // "iptables" or "ip6tables"
	tables map[string]*fakeTable
	log    []string
	// after, if set, is called after every successful mutating call.
	after func(call string)
}

type fakeTable struct {
	builtin []string            // built-in chains, in iptables-save order
	chains  map[string][]string // chain -> rules, each as its spec ("-d 10.0.0.0/8 -j RETURN")
}

// targets that are not chains.
var fakeTargets = []string{"ACCEPT", "DROP", "RETURN", "REDIRECT", "REJECT", "DNAT", "SNAT", "MASQUERADE"}

func newFakeIPTables(fam Family) *fakeIPTables {
	f := &fakeIPTables{cmd: "iptables", tables: map[string]*fakeTable{}}
	if fam == IPv6 {
		f.cmd = "ip6tables"
	}
	for table, builtin := range map[string][]string{
		"nat":    {"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"},
		"filter": {"INPUT", "FORWARD", "OUTPUT"},
	} {
		t := &fakeTable{builtin: builtin, chains: map[string][]string{}}
		for _, c := range builtin {
			t.chains[c] = nil
		}
		f.tables[table] = t
	}
	return f
}

// record logs a call and returns err unchanged.
func (f *fakeIPTables) record(mutating bool, err error, args ...string) error {
	line := f.cmd + " " + strings.Join(args, " ")
	if err != nil {
		line += "  # fails: " + err.Error()
	}
	f.log = append(f.log, line)
	if mutating && err == nil && f.after != nil {
		f.after(line)
	}
	return err
}

func (f *fakeIPTables) table(name string) (*fakeTable, error) {
	t, ok := f.tables[name]
	if !ok {
		return nil, fmt.Errorf("can't initialize %s table `%s': Table does not exist", f.cmd, name)
	}
	return t, nil
}

var (
	errNoChain     = errors.New("No chain/target/match by that name.")
	errChainExists = errors.New("Chain already exists.")
	errBadRule     = errors.New("Bad rule (does a matching rule exist in that chain?).")
	errLinks       = errors.New("Too many links.")
	errNotEmpty    = errors.New("Directory not empty.")
	errBuiltin     = errors.New("Invalid argument.")
)

func (t *fakeTable) isBuiltin(chain string) bool { return slices.Contains(t.builtin, chain) }

// userChains returns the user-defined chains sorted, as iptables -S lists them.
func (t *fakeTable) userChains() []string {
	var out []string
	for c := range t.chains {
		if !t.isBuiltin(c) {
			out = append(out, c)
		}
	}
	sort.Strings(out)
	return out
}

// references counts the rules that jump to chain.
func (t *fakeTable) references(chain string) int {
	n := 0
	for _, rules := range t.chains {
		for _, r := range rules {
			if jumpTarget(r) == chain {
				n++
			}
		}
	}
	return n
}

func jumpTarget(spec string) string {
	f := strings.Fields(spec)
	for i := 0; i+1 < len(f); i++ {
		if f[i] == "-j" {
			return f[i+1]
		}
	}
	return ""
}

// checkRule refuses a jump to a chain that does not exist, as iptables does.
func (t *fakeTable) checkRule(spec string) error {
	target := jumpTarget(spec)
	if target == "" || slices.Contains(fakeTargets, target) {
		return nil
	}
	if _, ok := t.chains[target]; !ok || t.isBuiltin(target) {
		return errNoChain
	}
	return nil
}

func (f *fakeIPTables) ListChains(table string) ([]string, error) {
	t, err := f.table(table)
	if err != nil {
		return nil, f.record(false, err, "-t", table, "-S")
	}
	f.record(false, nil, "-t", table, "-S")
	return append(slices.Clone(t.builtin), t.userChains()...), nil
}

func (f *fakeIPTables) List(table, chain string) ([]string, error) {
	args := []string{"-t", table, "-S", chain}
	t, err := f.table(table)
	if err != nil {
		return nil, f.record(false, err, args...)
	}
	rules, ok := t.chains[chain]
	if !ok {
		return nil, f.record(false, errNoChain, args...)
	}
	f.record(false, nil, args...)
	head := "-N " + chain
	if t.isBuiltin(chain) {
		head = "-P " + chain + " ACCEPT"
	}
	out := []string{head}
	for _, r := range rules {
		out = append(out, "-A "+chain+" "+r)
	}
	return out, nil
}

func (f *fakeIPTables) NewChain(table, chain string) error {
	args := []string{"-t", table, "-N", chain}
	t, err := f.table(table)
	if err != nil {
		return f.record(true, err, args...)
	}
	if _, ok := t.chains[chain]; ok {
		return f.record(true, errChainExists, args...)
	}
	t.chains[chain] = nil
	return f.record(true, nil, args...)
}

func (f *fakeIPTables) ClearChain(table, chain string) error {
	args := []string{"-t", table, "-F", chain}
	t, err := f.table(table)
	if err != nil {
		return f.record(true, err, args...)
	}
	if _, ok := t.chains[chain]; !ok {
		return f.record(true, errNoChain, args...)
	}
	t.chains[chain] = nil
	return f.record(true, nil, args...)
}

func (f *fakeIPTables) Append(table, chain string, rule ...string) error {
	args := append([]string{"-t", table, "-A", chain}, rule...)
	return f.record(true, f.insert(table, chain, -1, rule), args...)
}

func (f *fakeIPTables) Insert(table, chain string, pos int, rule ...string) error {
	args := append([]string{"-t", table, "-I", chain, strconv.Itoa(pos)}, rule...)
	return f.record(true, f.insert(table, chain, pos, rule), args...)
}

// insert puts rule at 1-based pos, or at the end for pos -1.
func (f *fakeIPTables) insert(table, chain string, pos int, rule []string) error {
	t, err := f.table(table)
	if err != nil {
		return err
	}
	rules, ok := t.chains[chain]
	if !ok {
		return errNoChain
	}
	spec := strings.Join(rule, " ")
	if err := t.checkRule(spec); err != nil {
		return err
	}
	if pos == -1 {
		pos = len(rules) + 1
	}
	if pos < 1 || pos > len(rules)+1 {
		return errors.New("Index of insertion too big.")
	}
	t.chains[chain] = slices.Insert(rules, pos-1, spec)
	return nil
}

func (f *fakeIPTables) Exists(table, chain string, rule ...string) (bool, error) {
	args := append([]string{"-t", table, "-C", chain}, rule...)
	t, err := f.table(table)
	if err != nil {
		return false, f.record(false, err, args...)
	}
	rules, ok := t.chains[chain]
	if !ok {
		return false, f.record(false, errNoChain, args...)
	}
	f.record(false, nil, args...)
	return slices.Contains(rules, strings.Join(rule, " ")), nil
}

func (f *fakeIPTables) Delete(table, chain string, rule ...string) error {
	args := append([]string{"-t", table, "-D", chain}, rule...)
	t, err := f.table(table)
	if err != nil {
		return f.record(true, err, args...)
	}
	rules, ok := t.chains[chain]
	if !ok {
		return f.record(true, errNoChain, args...)
	}
	i := slices.Index(rules, strings.Join(rule, " "))
	if i < 0 {
		return f.record(true, errBadRule, args...)
	}
	t.chains[chain] = slices.Delete(rules, i, i+1)
	return f.record(true, nil, args...)
}

func (f *fakeIPTables) DeleteChain(table, chain string) error {
	args := []string{"-t", table, "-X", chain}
	t, err := f.table(table)
	if err != nil {
		return f.record(true, err, args...)
	}
	rules, ok := t.chains[chain]
	switch {
	case !ok:
		err = errNoChain
	case t.isBuiltin(chain):
		err = errBuiltin
	case t.references(chain) > 0:
		err = errLinks
	case len(rules) > 0:
		err = errNotEmpty
	default:
		delete(t.chains, chain)
	}
	return f.record(true, err, args...)
}

func (f *fakeIPTables) RenameChain(table, oldChain, newChain string) error {
	args := []string{"-t", table, "-E", oldChain, newChain}
	t, err := f.table(table)
	if err != nil {
		return f.record(true, err, args...)
	}
	rules, ok := t.chains[oldChain]
	_, taken := t.chains[newChain]
	switch {
	case !ok || t.isBuiltin(oldChain):
		err = errNoChain
	case taken:
		err = errors.New("File exists.")
	default:
		delete(t.chains, oldChain)
		t.chains[newChain] = rules
		// Jumps follow the chain: they refer to it, not to its name.
		for c, rs := range t.chains {
			for i, r := range rs {
				if jumpTarget(r) == oldChain {
					rs[i] = strings.Replace(r, "-j "+oldChain, "-j "+newChain, 1)
				}
			}
			t.chains[c] = rs
		}
	}
	return f.record(true, err, args...)
}

// save renders the tables like iptables-save (without counters), tables in a fixed order.
func (f *fakeIPTables) save() string {
	var b strings.Builder
	for _, name := range []string{"nat", "filter"} {
		t := f.tables[name]
		fmt.Fprintf(&b, "*%s\n", name)
		for _, c := range t.builtin {
			fmt.Fprintf(&b, ":%s ACCEPT\n", c)
		}
		for _, c := range t.userChains() {
			fmt.Fprintf(&b, ":%s -\n", c)
		}
		for _, c := range append(slices.Clone(t.builtin), t.userChains()...) {
			for _, r := range t.chains[c] {
				fmt.Fprintf(&b, "-A %s %s\n", c, r)
			}
		}
		b.WriteString("COMMIT\n")
	}
	return b.String()
}

// mutations returns the logged calls that change the tables.
func (f *fakeIPTables) mutations() []string {
	var out []string
	for _, l := range f.log {
		if !strings.Contains(l, " -S") && !strings.Contains(l, " -C ") {
			out = append(out, l)
		}
	}
	return out
}
