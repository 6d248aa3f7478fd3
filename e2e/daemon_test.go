package e2e

import (
	"context"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// An app that dials with Multipath TCP (Go's Dialer.SetMultipathTCP, curl --mptcp, mptcpize)
// in a captured pod: its SYN is redirected to the transparent listener, which must answer
// with plain TCP (the client falls back) so that the original destination can be read. An
// MPTCP listener would accept the connection and then fail SO_ORIGINAL_DST and reset it.
func TestSidecarMultipathTCPClient(t *testing.T) {
	p := startPod(t)
	// net.mptcp.enabled is per network namespace: ask the pod's.
	out, err := p.lab.Pod.Run(context.Background(), "cat", "/proc/sys/net/mptcp/enabled")
	if err != nil || strings.TrimSpace(out) != "1" {
		t.Skipf("MPTCP is disabled or absent in this kernel (net.mptcp.enabled: %q, %v): nothing to test", strings.TrimSpace(out), err)
	}

	for _, tc := range []struct{ target, rule string }{
		{"198.18.1.10:7", "198.18.1.10:7"},
		{"[fd00:18:1::10]:7", "fd00:18:1::/48"},
	} {
		t.Run(tc.target, func(t *testing.T) {
			lg := from(p.side)
			// Root in the pod: captured like any app (only the proxy's UID is exempt).
			var c net.Conn
			err := p.lab.Pod.Do(func() (err error) {
				d := net.Dialer{Timeout: 3 * time.Second}
				d.SetMultipathTCP(true)
				c, err = d.Dial("tcp", tc.target)
				return err
			})
			if err != nil {
				t.Fatalf("MPTCP dial %s: %v", tc.target, err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(5 * time.Second))
			if _, err := fmt.Fprint(c, "ping"); err != nil {
				t.Fatal(err)
			}
			b := make([]byte, 4)
			if _, err := io.ReadFull(c, b); err != nil || string(b) != "ping" {
				t.Fatalf("echo through the sidecar for an MPTCP client: %q %v", b, err)
			}
			c.Close()
			d := lg.decision(t, cat(tr("tcp", "target", tc.target, "destination", tc.rule), allowed)...)
			lg.closeOf(t, d, "upstream", tc.target)
			// Go's dialer retries with plain TCP when an MPTCP connect fails: a reset MPTCP
			// attempt before the working connection is the bug too.
			for _, r := range p.side.RecordsAfter(lg.mark, "decision") {
				if r["action"] != "allowed" {
					t.Fatalf("a connection of the MPTCP client was refused: %v", r)
				}
			}
		})
	}
}
