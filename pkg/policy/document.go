package policy

import (
	"encoding/json"
	"fmt"
)

// Document writes one identity out as a policy file of its own: its mode and rules, with
// every rule option spelled out (allow_internal included, so the reader's INTERNAL_DOMAINS do
// not change its meaning), and nothing else: no API keys, no ServiceAccount selectors, no other
// identity. It is what the control plane serves a sidecar; Parse reads it back into the same
// rules (same entries, so the same metric labels). The output is JSON, which is YAML, and
// deterministic: equal rules give equal bytes and so an equal hash.
func (p *Policy) Document(identity string) ([]byte, error) {
	id := p.byName[identity]
	if id == nil {
		return nil, fmt.Errorf("policy %s: no identity %q", p.Hash, identity)
	}
	type rule struct {
		Destination   string   `json:"destination"`
		Ports         []string `json:"ports,omitempty"`
		AllowInternal bool     `json:"allow_internal"`
		TLS           string   `json:"tls,omitempty"`
		ECH           string   `json:"ech,omitempty"`
	}
	type ident struct {
		Mode                Mode   `json:"mode"`
		AllowedDestinations []rule `json:"allowed_destinations"`
	}
	out := ident{Mode: id.Mode, AllowedDestinations: []rule{}}
	for _, r := range id.Rules {
		w := rule{Destination: r.Dest, Ports: r.PortText, AllowInternal: r.AllowInternal}
		if r.TLSOptional {
			w.TLS = "optional"
		}
		if r.AllowECH {
			w.ECH = "allow"
		}
		out.AllowedDestinations = append(out.AllowedDestinations, w)
	}
	return json.Marshal(map[string]map[string]ident{"identities": {id.Name: out}})
}
