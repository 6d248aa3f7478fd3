package controller

import (
	"os"
	"strings"
	"testing"
)

// The README's control-plane table describes every setting with its default.
func TestREADMEDocumentsEverySetting(t *testing.T) {
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	s := string(readme)
	i := strings.Index(s, "## Control plane")
	if i < 0 {
		t.Fatal("README has no control plane section")
	}
	section := s[i:]
	if j := strings.Index(section[3:], "\n## "); j >= 0 {
		section = section[:j+3]
	}
	var c Config
	if err := Settings(&c).CheckDocumented(section); err != nil {
		t.Fatal(err)
	}
}

func TestSettingsDefaultsAndErrors(t *testing.T) {
	var c Config
	if err := Settings(&c).Load("t", nil, func(string) string { return "" }); err != nil {
		t.Fatal(err)
	}
	if c.Port != 8443 || c.MetricsPort != 9090 || c.Audience != "egress-guard" || c.WatchInterval.Seconds() != 1 || c.MaxWait.Seconds() != 60 {
		t.Fatalf("defaults %+v", c)
	}
	err := Settings(&c).Load("t", []string{"--port", "0"}, func(k string) string {
		return map[string]string{"WATCH_INTERVAL": "soon", "LISTEN_ADDR": "nowhere"}[k]
	})
	for _, want := range []string{"--port", "WATCH_INTERVAL", "LISTEN_ADDR"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error does not name %s: %v", want, err)
		}
	}
}
