// Command egress-guard is the egress proxy. Configuration comes from the environment (see
// README.md); MODE selects the shape, and the gateway (explicit proxy) is the default.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/egress-guard/egress-guard/sidecar/daemon"
)

func main() {
	cfg, err := daemon.FromEnv(os.Getenv)
	if err != nil {
		fmt.Fprintln(os.Stderr, "egress-guard:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := daemon.Run(ctx, cfg, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "egress-guard:", err)
		os.Exit(1)
	}
}
