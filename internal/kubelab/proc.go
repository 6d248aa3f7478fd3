package kubelab

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// proc is one control-plane process; its stdout and stderr go to
// <dir>/<name>.log (and Options.Output).
type proc struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	done    chan struct{} // closed when the process has exited
	waitErr error
}

func (c *Cluster) startProc(name string, args ...string) (*proc, error) {
	argv := append([]string{filepath.Join(c.binDir, name)}, args...)
	if len(c.wrap) > 0 {
		// nsenter execs the binary (no --fork), so Pdeathsig and Kill reach it.
		argv = append(append([]string{}, c.wrap...), argv...)
	}
	return c.startCommand(name, argv...)
}

// startCommand runs argv as the process called name.
func (c *Cluster) startCommand(name string, argv ...string) (*proc, error) {
	logPath := filepath.Join(c.dir, name+".log")
	f, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	var out io.Writer = f
	if c.opts.Output != nil {
		out = io.MultiWriter(f, c.opts.Output)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Dir = c.dir
	cmd.Stdout = out
	cmd.Stderr = out
	cmd.SysProcAttr = sysProcAttr()
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("kubelab: starting %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, logPath: logPath, done: make(chan struct{})}
	go func() {
		p.waitErr = cmd.Wait()
		f.Close()
		close(p.done)
	}()
	c.procsMu.Lock()
	c.procs = append(c.procs, p)
	c.procsMu.Unlock()
	return p, nil
}

// kill ends the process (SIGKILL: nothing here needs a graceful shutdown)
// and waits for it.
func (p *proc) kill() {
	select {
	case <-p.done:
		return
	default:
	}
	p.cmd.Process.Kill()
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
	}
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// exitError describes an exited process, with the tail of its log. It wraps
// errPortInUse when the log says a port was taken, so Start can retry.
func (p *proc) exitError() error {
	tail := p.tail(4000)
	err := fmt.Errorf("kubelab: %s exited early (%v); log tail:\n%s", p.name, p.waitErr, tail)
	if strings.Contains(tail, "address already in use") {
		return errors.Join(err, errPortInUse)
	}
	return err
}

func (p *proc) tail(n int) string {
	b, err := os.ReadFile(p.logPath)
	if err != nil {
		return ""
	}
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}
