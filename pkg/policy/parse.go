// Package policy parses, validates and compiles egress-guard's policy file, matches
// destinations per identity, and reloads the file atomically.
//
// The format is the original egress-guard's (identities with api_keys and
// allowed_destinations of exact names, *.suffix wildcards, IPs and CIDRs), which loads
// unchanged and keeps its meaning, plus ports, per-identity audit mode and an object form for
// rules that may reach internal addresses. Loading is strict: a file with any error is
// rejected whole, with the file, line, identity and entry of every problem, so that a typo
// never silently changes what is allowed.
package policy

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"

	"gopkg.in/yaml.v3"
)

// Mode is an identity's enforcement mode.
type Mode string

// Modes.
const (
	ModeEnforce Mode = "enforce"
	ModeAudit   Mode = "audit" // allow, but log and count what enforce would deny
)

// Options change how a file is read.
type Options struct {
	// InternalDomains are private-use DNS suffixes: exact-name rules under them get
	// AllowInternal implicitly, so the original example's "db.internal.svc.cluster.local" and
	// "prometheus.internal" keep their meaning. Wildcards never get it implicitly. The zero
	// value means no such suffix; callers pass DefaultInternalDomains.
	InternalDomains []string
}

// DefaultInternalDomains are DNS namespaces that only resolve inside a cluster or site.
var DefaultInternalDomains = []string{"cluster.local", "internal", "home.arpa", "local"}

// Policy is a loaded, validated and compiled policy. It is immutable.
type Policy struct {
	Source string // the file path or the name given to Parse
	Hash   string // first 16 hex characters of the sha256 of the file's bytes

	byName map[string]*Identity
	byKey  map[string]*Identity
	bySA   map[string]*Identity // "namespace/name" and "namespace/*" selectors
	sorted []*Identity
}

// IdentityByAPIKey returns the identity an API key belongs to (exact match), or nil.
func (p *Policy) IdentityByAPIKey(key string) *Identity { return p.byKey[key] }

// Identity returns the identity with that name, or nil.
func (p *Policy) Identity(name string) *Identity { return p.byName[name] }

// Identities returns all identities sorted by name.
func (p *Policy) Identities() []*Identity { return p.sorted }

// Load reads and parses the policy file at path.
func Load(path string, opts Options) (*Policy, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("load policy %s: %w", path, err)
	}
	p, err := Parse(path, data, opts)
	if err != nil {
		return nil, fmt.Errorf("load policy %s: %w", path, err)
	}
	return p, nil
}

// maxErrors bounds how many problems one error reports.
const maxErrors = 20

// problems collects validation errors with their positions.
type problems struct {
	source string
	list   []string
}

func (ps *problems) add(line int, identity, entry, format string, args ...any) {
	if len(ps.list) >= maxErrors {
		return
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%s:%d: ", ps.source, line)
	if identity != "" {
		fmt.Fprintf(&b, "identity %q: ", identity)
	}
	if entry != "" {
		fmt.Fprintf(&b, "%q: ", entry)
	}
	fmt.Fprintf(&b, format, args...)
	ps.list = append(ps.list, b.String())
}

func (ps *problems) err() error {
	if len(ps.list) == 0 {
		return nil
	}
	return errors.New(strings.Join(ps.list, "\n"))
}

// Parse parses a policy from data; source names it in errors.
func Parse(source string, data []byte, opts Options) (*Policy, error) {
	ps := &problems{source: source}
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return nil, fmt.Errorf("%s: %v", source, err)
	}
	if len(doc.Content) == 0 {
		return nil, fmt.Errorf("%s: empty policy: want a mapping with \"identities\"", source)
	}
	root := doc.Content[0]
	if root.Kind != yaml.MappingNode {
		return nil, fmt.Errorf("%s:%d: want a mapping with \"identities\"", source, root.Line)
	}
	p := &Policy{
		Source: source,
		byName: map[string]*Identity{},
		byKey:  map[string]*Identity{},
		bySA:   map[string]*Identity{},
	}
	sum := sha256.Sum256(data)
	p.Hash = hex.EncodeToString(sum[:])[:16]

	var identities *yaml.Node
	forEachPair(ps, root, "", func(k, v *yaml.Node) {
		switch k.Value {
		case "identities":
			identities = v
		default:
			ps.add(k.Line, "", "", "unknown field %q (known: identities)", k.Value)
		}
	})
	switch {
	case identities == nil:
		ps.add(root.Line, "", "", "no \"identities\"")
	case identities.Kind != yaml.MappingNode:
		ps.add(identities.Line, "", "", "\"identities\" must be a mapping of identity names")
	case len(identities.Content) == 0:
		ps.add(identities.Line, "", "", "no identities")
	default:
		keyOwner := map[string]string{}
		saOwner := map[string]saClaim{}
		forEachPair(ps, identities, "", func(k, v *yaml.Node) {
			id := parseIdentity(ps, k, v, opts, keyOwner, saOwner)
			if id == nil {
				return
			}
			p.byName[id.Name] = id
			for _, key := range id.APIKeys {
				p.byKey[key] = id
			}
			for _, sel := range id.ServiceAccounts {
				p.bySA[sel] = id
			}
		})
	}
	if err := ps.err(); err != nil {
		return nil, err
	}
	for _, id := range p.byName {
		p.sorted = append(p.sorted, id)
	}
	sort.Slice(p.sorted, func(i, j int) bool { return p.sorted[i].Name < p.sorted[j].Name })
	return p, nil
}

// forEachPair walks a mapping's key/value pairs, reporting duplicate and non-scalar keys
// (yaml.v3 does not when decoding into a Node).
func forEachPair(ps *problems, m *yaml.Node, identity string, fn func(k, v *yaml.Node)) {
	seen := map[string]int{}
	for i := 0; i+1 < len(m.Content); i += 2 {
		k, v := m.Content[i], m.Content[i+1]
		if k.Kind != yaml.ScalarNode {
			ps.add(k.Line, identity, "", "mapping keys must be strings")
			continue
		}
		if first, dup := seen[k.Value]; dup {
			ps.add(k.Line, identity, "", "duplicate key %q (first at line %d)", k.Value, first)
			continue
		}
		seen[k.Value] = k.Line
		fn(k, v)
	}
}

// saClaim records which identity claimed a ServiceAccount selector, and where.
type saClaim struct {
	identity string
	line     int
}

func parseIdentity(ps *problems, k, v *yaml.Node, opts Options, keyOwner map[string]string, saOwner map[string]saClaim) *Identity {
	name := strings.TrimSpace(k.Value)
	if name == "" {
		ps.add(k.Line, "", "", "empty identity name")
		return nil
	}
	if v.Kind != yaml.MappingNode {
		ps.add(v.Line, name, "", "an identity must be a mapping with api_keys and allowed_destinations")
		return nil
	}
	id := &Identity{Name: name, Mode: ModeEnforce}
	forEachPair(ps, v, name, func(fk, fv *yaml.Node) {
		switch fk.Value {
		case "mode":
			switch Mode(fv.Value) {
			case ModeEnforce, ModeAudit:
				id.Mode = Mode(fv.Value)
			default:
				ps.add(fv.Line, name, fv.Value, "mode must be enforce or audit")
			}
		case "api_keys":
			for _, kn := range sequence(ps, fv, name, "api_keys") {
				if kn.Kind != yaml.ScalarNode || kn.Value == "" {
					ps.add(kn.Line, name, "", "an API key must be a non-empty string")
					continue
				}
				if owner, dup := keyOwner[kn.Value]; dup {
					// The key itself is a credential: name the identities, not the key.
					ps.add(kn.Line, name, "", "API key already belongs to identity %q (keys must be unique)", owner)
					continue
				}
				keyOwner[kn.Value] = name
				id.APIKeys = append(id.APIKeys, kn.Value)
			}
		case "service_accounts":
			for _, sn := range sequence(ps, fv, name, "service_accounts") {
				sel, err := ParseServiceAccountSelector(sn.Value)
				if sn.Kind != yaml.ScalarNode || err != nil {
					ps.add(sn.Line, name, sn.Value, "%v", err)
					continue
				}
				if prev, dup := saOwner[sel]; dup {
					ps.add(sn.Line, name, sn.Value, "ServiceAccount selector already claimed by identity %q at line %d", prev.identity, prev.line)
					continue
				}
				saOwner[sel] = saClaim{identity: name, line: sn.Line}
				id.ServiceAccounts = append(id.ServiceAccounts, sel)
			}
		case "allowed_destinations":
			for _, dn := range sequence(ps, fv, name, "allowed_destinations") {
				if r := parseRule(ps, dn, name, opts); r != nil {
					id.Rules = append(id.Rules, r)
				}
			}
		default:
			ps.add(fk.Line, name, "", "unknown field %q (known: mode, api_keys, service_accounts, allowed_destinations)", fk.Value)
		}
	})
	id.Rules = dedupe(id.Rules)
	id.compile()
	return id
}

func sequence(ps *problems, n *yaml.Node, identity, field string) []*yaml.Node {
	if n.Kind == yaml.ScalarNode && n.Tag == "!!null" {
		return nil
	}
	if n.Kind != yaml.SequenceNode {
		ps.add(n.Line, identity, "", "%s must be a list", field)
		return nil
	}
	return n.Content
}

// parseRule reads a destination string or an object {destination, ports, allow_internal}.
func parseRule(ps *problems, n *yaml.Node, identity string, opts Options) *Rule {
	switch n.Kind {
	case yaml.ScalarNode:
		r, err := parseDestination(n.Value)
		if err != nil {
			ps.add(n.Line, identity, n.Value, "%v", err)
			return nil
		}
		r.Line = n.Line
		r.AllowInternal = r.Kind == KindExact && underAny(r.Host, opts.InternalDomains)
		return r
	case yaml.MappingNode:
		var dest *yaml.Node
		var ports []PortRange
		var portsWritten []string
		allowInternal, portsGiven, tlsOptional, allowECH := false, false, false, false
		forEachPair(ps, n, identity, func(k, v *yaml.Node) {
			switch k.Value {
			case "destination":
				dest = v
			case "tls":
				tlsOptional = oneOf(ps, v, identity, "tls", "required", "optional") == "optional"
			case "ech":
				allowECH = oneOf(ps, v, identity, "ech", "allow", "deny") == "allow"
			case "allow_internal":
				allowInternal = oneOf(ps, v, identity, "allow_internal", "true", "false") == "true"
			case "ports":
				portsGiven = true
				for _, pn := range sequence(ps, v, identity, "ports") {
					pr, err := parsePortRange(pn.Value)
					if pn.Kind != yaml.ScalarNode || err != nil {
						ps.add(pn.Line, identity, pn.Value, "bad port: %v", err)
						continue
					}
					ports = append(ports, pr)
					portsWritten = append(portsWritten, pn.Value)
				}
			default:
				ps.add(k.Line, identity, "", "unknown field %q (known: destination, ports, allow_internal, tls, ech)", k.Value)
			}
		})
		if dest == nil || dest.Kind != yaml.ScalarNode {
			ps.add(n.Line, identity, "", "a destination object needs a \"destination\" string")
			return nil
		}
		r, err := parseDestination(dest.Value)
		if err != nil {
			ps.add(dest.Line, identity, dest.Value, "%v", err)
			return nil
		}
		if portsGiven {
			if len(r.Ports) > 0 {
				ps.add(dest.Line, identity, dest.Value, "ports given both in the destination and in \"ports\"")
				return nil
			}
			r.Ports, r.PortText = ports, portsWritten
			if strings.Contains(r.Entry, ":") && !strings.HasPrefix(r.Entry, "[") {
				r.Entry = "[" + r.Entry + "]"
			}
			r.Entry += ":" + strings.Join(portsWritten, ",")
		}
		r.Line = dest.Line
		r.AllowInternal = allowInternal || r.Kind == KindExact && underAny(r.Host, opts.InternalDomains)
		r.TLSOptional, r.AllowECH = tlsOptional, allowECH
		return r
	default:
		ps.add(n.Line, identity, "", "a destination must be a string or an object")
		return nil
	}
}

// oneOf reads a two-valued option of a rule: a or b, or "" and a problem for anything else.
func oneOf(ps *problems, v *yaml.Node, identity, field, a, b string) string {
	if v.Kind != yaml.ScalarNode || (v.Value != a && v.Value != b) {
		ps.add(v.Line, identity, v.Value, "%s must be %s or %s", field, a, b)
		return ""
	}
	return v.Value
}

func underAny(host string, domains []string) bool {
	for _, d := range domains {
		d = strings.ToLower(strings.Trim(d, "."))
		if d != "" && (host == d || strings.HasSuffix(host, "."+d)) {
			return true
		}
	}
	return false
}

// dedupe drops repeated identical entries (a harmless copy-paste, not an error).
func dedupe(rules []*Rule) []*Rule {
	seen := map[string]bool{}
	out := rules[:0]
	for _, r := range rules {
		key := fmt.Sprintf("%s|%v|%v|%v", r.Entry, r.AllowInternal, r.TLSOptional, r.AllowECH)
		if seen[key] {
			continue
		}
		seen[key] = true
		out = append(out, r)
	}
	return out
}
