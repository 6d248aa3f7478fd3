package netlab

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Build compiles a command of this module (for example "./cmd/egress-guard") into dir.
func Build(ctx context.Context, repoRoot, pkg, dir string) (string, error) {
	out := filepath.Join(dir, filepath.Base(pkg))
	cmd := exec.CommandContext(ctx, "go", "build", "-o", out, pkg)
	cmd.Dir = repoRoot
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build %s: %v: %s", pkg, err, b)
	}
	return out, nil
}

// Process is a program running in a namespace whose JSON log lines are kept.
type Process struct {
	cmd  *exec.Cmd
	done chan struct{}
	err  error

	mu    sync.Mutex
	lines []string
}

// Start runs bin in ns with env, as uid/gid when uid > 0. ip netns exec needs root, so the
// switch of user happens inside it, with setpriv (each step execs the next: the process
// keeps one PID, and signals reach the program).
func Start(ns *NS, bin string, env []string, uid, gid uint32) (*Process, error) {
	args := []string{"netns", "exec", ns.Name}
	if uid > 0 {
		args = append(args, "setpriv", "--reuid", fmt.Sprint(uid), "--regid", fmt.Sprint(gid), "--clear-groups", "--")
	}
	return start(exec.Command("ip", append(args, bin)...), env)
}

// StartHost runs bin in this (the host's) network namespace, as root, capturing its output
// like Start: for services the tests run beside a real API server on the host's loopback.
func StartHost(bin string, env []string, args ...string) (*Process, error) {
	return start(exec.Command(bin, args...), env)
}

func start(cmd *exec.Cmd, env []string) (*Process, error) {
	bin := cmd.Path
	cmd.Env = append(os.Environ(), env...)
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	p := &Process{cmd: cmd, done: make(chan struct{})}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	go func() {
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			p.mu.Lock()
			p.lines = append(p.lines, sc.Text())
			p.mu.Unlock()
		}
	}()
	go func() {
		p.err = cmd.Wait()
		pw.Close()
		close(p.done)
	}()
	return p, nil
}

// Lines returns the output lines so far.
func (p *Process) Lines() []string { return p.LinesAfter(0) }

// Mark returns the number of output lines so far: a position in the log. The reads that take
// a mark see only the lines after it, so an assertion made with a mark taken before the
// action under test cannot pass on a line written before that. (A line the program wrote just
// before Mark may still be on its way through the pipe and count as after: assertions should
// still name the fields of the one connection they expect.)
func (p *Process) Mark() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.lines)
}

// LinesAfter returns the output lines after mark.
func (p *Process) LinesAfter(mark int) []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	if mark < 0 || mark > len(p.lines) {
		mark = len(p.lines)
	}
	return append([]string(nil), p.lines[mark:]...)
}

// RecordsAfter returns the JSON log lines after mark whose "msg" is msg, decoded.
func (p *Process) RecordsAfter(mark int, msg string) []map[string]any {
	var out []map[string]any
	for _, l := range p.LinesAfter(mark) {
		var m map[string]any
		if json.Unmarshal([]byte(l), &m) == nil && m["msg"] == msg {
			out = append(out, m)
		}
	}
	return out
}

// WaitRecordAfter waits until a JSON line after mark with msg satisfies match, and returns
// the first such line.
func (p *Process) WaitRecordAfter(mark int, msg string, timeout time.Duration, match func(map[string]any) bool) (map[string]any, error) {
	deadline := time.Now().Add(timeout)
	for {
		recs := p.RecordsAfter(mark, msg)
		for _, r := range recs {
			if match(r) {
				return r, nil
			}
		}
		if time.Now().After(deadline) {
			var seen []string
			for _, l := range p.LinesAfter(mark) {
				var m map[string]any
				if json.Unmarshal([]byte(l), &m) == nil && m["msg"] == msg {
					seen = append(seen, l)
				}
			}
			if len(seen) > 15 {
				seen = seen[len(seen)-15:]
			}
			return nil, fmt.Errorf("no %q line after mark %d matched within %v; the %d %q lines after the mark (last 15):\n%s\nlast lines:\n%s",
				msg, mark, timeout, len(recs), msg, strings.Join(seen, "\n"), p.Tail(15))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Tail returns the last n output lines.
func (p *Process) Tail(n int) string {
	l := p.Lines()
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return strings.Join(l, "\n")
}

// Signal sends sig to the program (through ip netns exec, which execs it).
func (p *Process) Signal(sig os.Signal) error { return p.cmd.Process.Signal(sig) }

// PID is the process's id (for reading its /proc entries, such as its RSS).
func (p *Process) PID() int { return p.cmd.Process.Pid }

// Wait waits up to timeout for the program to exit and returns its exit error.
func (p *Process) Wait(timeout time.Duration) (exited bool, err error) {
	select {
	case <-p.done:
		return true, p.err
	case <-time.After(timeout):
		return false, nil
	}
}

// Stop sends SIGTERM, then SIGKILL after timeout.
func (p *Process) Stop(timeout time.Duration) {
	p.Signal(syscall.SIGTERM)
	if exited, _ := p.Wait(timeout); !exited {
		p.cmd.Process.Kill()
		<-p.done
	}
}

// Exited reports whether the program has exited.
func (p *Process) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// HTTPGet fetches url from inside ns with curl and returns the status code and body.
func HTTPGet(ctx context.Context, ns *NS, url string) (int, string, error) {
	out, err := ns.Run(ctx, "curl", "-sS", "--max-time", "5", "-o", "-", "-w", "\n%{http_code}", url)
	if err != nil && !strings.Contains(out, "\n") {
		return 0, out, err
	}
	i := strings.LastIndex(out, "\n")
	var code int
	fmt.Sscanf(out[i+1:], "%d", &code)
	return code, out[:i], nil
}

// WaitReady polls url from inside ns until it answers 200.
func WaitReady(ctx context.Context, ns *NS, url string, p *Process, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		if code, _, _ := HTTPGet(ctx, ns, url); code == 200 {
			return nil
		}
		if p != nil && p.Exited() {
			return fmt.Errorf("process exited before ready:\n%s", p.Tail(20))
		}
		if time.Now().After(deadline) {
			tail := ""
			if p != nil {
				tail = p.Tail(20)
			}
			return fmt.Errorf("%s not ready within %v:\n%s", url, timeout, tail)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
