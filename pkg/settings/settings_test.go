package settings

import (
	"net/netip"
	"strings"
	"testing"
	"time"
)

func env(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

type values struct {
	port  uint16
	d     time.Duration
	n     int
	b     bool
	s     string
	cidrs []netip.Prefix
}

func declare() (*Set, *values) {
	v := &values{}
	var set Set
	set.Port(&v.port, "PORT", "port", "4750", "a port")
	set.Duration(&v.d, "WAIT", "", "5s", "a duration")
	set.PositiveInt(&v.n, "N", "n", "10", "a count")
	set.Bool(&v.b, "ON", "on", "false", "a switch")
	set.OneOf(&v.s, []string{"a", "b"}, "CHOICE", "choice", "a", "a choice")
	set.Prefixes(&v.cidrs, "CIDRS", "cidrs", "", "ranges")
	return &set, v
}

func TestDefaultsEnvAndFlagsInThatOrder(t *testing.T) {
	set, v := declare()
	if err := set.Load("t", nil, env(nil)); err != nil {
		t.Fatal(err)
	}
	if v.port != 4750 || v.d != 5*time.Second || v.n != 10 || v.b || v.s != "a" || v.cidrs != nil {
		t.Fatalf("defaults: %+v", v)
	}
	set, v = declare()
	err := set.Load("t", []string{"--port", "99", "--on"}, env(map[string]string{"PORT": "80", "WAIT": "1s", "CHOICE": "b", "CIDRS": "10.0.0.0/8, fd00::/8"}))
	if err != nil {
		t.Fatal(err)
	}
	if v.port != 99 || v.d != time.Second || !v.b || v.s != "b" || len(v.cidrs) != 2 || v.cidrs[1] != netip.MustParsePrefix("fd00::/8") {
		t.Fatalf("flag over env over default: %+v", v)
	}
}

func TestEveryBadValueIsReportedWithItsSource(t *testing.T) {
	set, _ := declare()
	err := set.Load("t", []string{"--n=0"}, env(map[string]string{"PORT": "70000", "WAIT": "-1s", "ON": "maybe", "CHOICE": "c", "CIDRS": "10.0.0.1/8"}))
	if err == nil {
		t.Fatal("bad values accepted")
	}
	for _, want := range []string{`PORT="70000"`, `WAIT="-1s"`, `--n="0"`, `ON="maybe"`, `CHOICE="c"`, `CIDRS="10.0.0.1/8"`} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not name %s: %v", want, err)
		}
	}
	set, _ = declare()
	if err := set.Load("t", []string{"extra"}, env(nil)); err == nil || !strings.Contains(err.Error(), "unexpected argument") {
		t.Fatalf("positional argument: %v", err)
	}
	set, _ = declare()
	if err := set.Load("t", []string{"--nope"}, env(nil)); err == nil {
		t.Fatal("unknown flag accepted")
	}
}

func TestCheckDocumented(t *testing.T) {
	set, _ := declare()
	doc := "| `PORT` | `4750` | x |\n| `WAIT` | `5s` |\n| `N` | `10` |\n| `ON` | `false` |\n| `CHOICE` | `a` |\n| `CIDRS` | none |\n"
	if err := set.CheckDocumented(doc); err != nil {
		t.Fatal(err)
	}
	// A default shown without backquotes, or a different one, does not count.
	if err := set.CheckDocumented(strings.Replace(doc, "`10`", "10", 1)); err == nil || !strings.Contains(err.Error(), "N (") {
		t.Fatalf("unquoted default accepted: %v", err)
	}
	err := set.CheckDocumented(strings.Replace(doc, "`5s`", "`6s`", 1))
	if err == nil || !strings.Contains(err.Error(), "WAIT") || strings.Contains(err.Error(), "PORT") {
		t.Fatalf("wrong default not reported exactly: %v", err)
	}
}

func TestPrintUsage(t *testing.T) {
	set, _ := declare()
	var b strings.Builder
	set.PrintUsage(&b)
	if !strings.Contains(b.String(), "--port") || !strings.Contains(b.String(), "WAIT") {
		t.Fatal(b.String())
	}
}
