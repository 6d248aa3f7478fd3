//go:build !linux

package kubelab

import "syscall"

func sysProcAttr() *syscall.SysProcAttr { return nil }
