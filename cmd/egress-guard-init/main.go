// Command egress-guard-init installs the pod's capture rules (the init container). See
// init-container/cli for the flags, or run it with --help.
package main

import (
	"os"

	"github.com/egress-guard/egress-guard/init-container/cli"
)

func main() { os.Exit(cli.Main(os.Args[1:], os.Stdout, os.Stderr)) }
