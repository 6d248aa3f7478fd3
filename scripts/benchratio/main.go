// Command benchratio prints, from egressbench JSON lines, the median of the headline metrics
// for one target and its ratio to every other target (for example egress-guard / squid), so
// that `make bench` ends with a comparison rather than a table to read by eye.
//
// Usage: benchratio results.jsonl TARGET
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"strings"
)

// headline metrics and whether a larger value is better.
var headline = []struct {
	name         string
	higherBetter bool
}{
	{"mib_per_s", true},
	{"proxy_cpu_s_per_gib", false},
	{"tunnel_p50_us", false},
	{"p50_us", false},
	{"p99_us", false},
	{"tunnels_per_s", true},
	{"proxy_cpu_us_per_op", false},
	{"rss_per_tunnel_kib", false},
}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: benchratio results.jsonl TARGET")
		os.Exit(2)
	}
	if err := run(os.Args[1], os.Args[2]); err != nil {
		fmt.Fprintln(os.Stderr, "benchratio:", err)
		os.Exit(1)
	}
}

type key struct{ target, scenario, metric string }

func run(path, self string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	vals := map[key][]float64{}
	targets := map[string]bool{}
	var scenarios []string
	seen := map[string]bool{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var m map[string]any
		if json.Unmarshal(sc.Bytes(), &m) != nil {
			continue
		}
		t, _ := m["target"].(string)
		s, _ := m["scenario"].(string)
		if t == "" || s == "" {
			continue
		}
		targets[t] = true
		if !seen[s] {
			seen[s] = true
			scenarios = append(scenarios, s)
		}
		for k, v := range m {
			if fv, ok := v.(float64); ok {
				vals[key{t, s, k}] = append(vals[key{t, s, k}], fv)
			}
		}
	}
	if err := sc.Err(); err != nil {
		return err
	}
	if !targets[self] {
		return fmt.Errorf("no results for target %q", self)
	}
	var peers []string
	for t := range targets {
		if t != self {
			peers = append(peers, t)
		}
	}
	sort.Strings(peers)

	fmt.Printf("%-26s %-20s %12s", "scenario", "metric", self)
	for _, p := range peers {
		fmt.Printf("  %14s", "vs "+p)
	}
	fmt.Println()
	for _, s := range scenarios {
		for _, h := range headline {
			mine, ok := median(vals[key{self, s, h.name}])
			if !ok {
				continue
			}
			fmt.Printf("%-26s %-20s %12.1f", s, h.name, mine)
			for _, p := range peers {
				theirs, ok := median(vals[key{p, s, h.name}])
				if !ok || theirs == 0 {
					fmt.Printf("  %14s", "-")
					continue
				}
				r := mine / theirs
				mark := "better"
				if (r < 1) == h.higherBetter && r != 1 {
					mark = "worse"
				}
				fmt.Printf("  %7.2fx %-6s", r, mark)
			}
			fmt.Println()
		}
	}
	fmt.Println(strings.Repeat("-", 40))
	fmt.Printf("ratio = %s / peer; 'better' accounts for the metric's direction.\n", self)
	return nil
}

func median(v []float64) (float64, bool) {
	if len(v) == 0 {
		return 0, false
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2], true
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2, true
}
