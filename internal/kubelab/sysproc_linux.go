package kubelab

import "syscall"

// sysProcAttr makes the kernel kill the control-plane processes if the test
// binary dies without calling Stop.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
