// Command egress-guard-controller is the control plane: it serves each sidecar its own
// identity's policy (see controller). Settings come from the environment or flags
// (--help lists them).
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/egress-guard/egress-guard/controller"
)

func main() {
	var cfg controller.Config
	set := controller.Settings(&cfg)
	if len(os.Args) == 2 && (os.Args[1] == "--help" || os.Args[1] == "-h") {
		set.PrintUsage(os.Stdout)
		return
	}
	if err := set.Load("egress-guard-controller", os.Args[1:], os.Getenv); err != nil {
		fmt.Fprintln(os.Stderr, "egress-guard-controller:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := controller.Run(ctx, cfg, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "egress-guard-controller:", err)
		os.Exit(1)
	}
}
