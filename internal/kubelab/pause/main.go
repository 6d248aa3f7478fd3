// Command pause is the pod sandbox ("infra") container of the real-cluster e2e: it holds the
// pod's namespaces, sleeps until SIGTERM or SIGINT, and, as PID 1 of a shared PID namespace,
// reaps the orphaned children re-parented to it. Built static (CGO_ENABLED=0) by
// scripts/images.sh into the image localhost/egress-guard-e2e/pause:1, it stands in for
// registry.k8s.io/pause, which cannot be pulled offline.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "-v" {
		fmt.Println("egress-guard-e2e pause")
		return
	}
	if os.Getpid() != 1 {
		fmt.Fprintln(os.Stderr, "pause: warning: not running as PID 1")
	}
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for sig := range sigs {
		switch sig {
		case syscall.SIGCHLD:
			reap()
		default:
			fmt.Fprintf(os.Stderr, "pause: shutting down, got signal %v\n", sig)
			os.Exit(0)
		}
	}
}

// reap collects every child that has exited, without blocking.
func reap() {
	for {
		var ws syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
		if err == syscall.EINTR {
			continue
		}
		if pid <= 0 || err != nil {
			return
		}
	}
}
