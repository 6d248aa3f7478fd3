// Command egress-guard-demo plays a pod with captured egress on this machine and reports what
// egress-guard decided (see internal/demo). Run it through scripts/demo.sh, which builds the
// binaries and installs what it needs.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/egress-guard/egress-guard/internal/demo"
	"github.com/egress-guard/egress-guard/internal/netlab"
)

func main() {
	var cfg demo.Config
	flag.StringVar(&cfg.Sidecar, "egress-guard", "bin/egress-guard", "egress-guard binary")
	flag.StringVar(&cfg.Init, "init", "bin/egress-guard-init", "egress-guard-init binary")
	flag.StringVar(&cfg.Policy, "policy", "examples/demo-policy.yaml", "policy file")
	flag.Parse()
	if err := netlab.Require("curl", "iptables", "ip6tables", "setpriv", "bash"); err != nil {
		fmt.Fprintln(os.Stderr, "egress-guard-demo:", err)
		os.Exit(2)
	}
	// Ctrl-C and SIGTERM cancel the run; the deferred teardown then removes everything.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := demo.Run(ctx, cfg, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "egress-guard-demo:", err)
		os.Exit(1)
	}
}
