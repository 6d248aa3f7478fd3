// Command benchfloor is a reference for the peers bench, not a product: the least a CONNECT
// proxy can do (read the head, dial the IP literal it names, answer 200, relay bytes until both
// sides have closed) with no identity, policy, classification, log line or metric. It has two
// engines, so that `make bench-peers` shows two floors beside egress-guard:
//
//   - goroutine: one goroutine per connection over the net package, io.Copy both ways (splice).
//     This is the floor of egress-guard's own design; what egress-guard costs above it is ours.
//   - epoll: one thread, one epoll set, non-blocking sockets and no goroutines per connection,
//     the design of Squid and nginx. What the goroutine floor costs above it is Go's runtime
//     (netpoller hand-offs, the scheduler, its monitor thread) rather than proxy work.
//
// Usage: benchfloor -listen 127.0.0.1:15001 -engine goroutine|epoll
package main

import (
	"flag"
	"fmt"
	"log"
	"net"
	"os"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:15001", "address to serve CONNECT on")
	engine := flag.String("engine", "goroutine", "goroutine or epoll")
	flag.Parse()
	var err error
	switch *engine {
	case "goroutine":
		var ln net.Listener
		if ln, err = net.Listen("tcp", *listen); err == nil {
			err = serveGoroutines(ln)
		}
	case "epoll":
		var lp *epollProxy
		if lp, err = listenEpoll(*listen); err == nil {
			err = lp.serve()
		}
	default:
		err = fmt.Errorf("unknown engine %q (goroutine or epoll)", *engine)
	}
	log.SetFlags(0)
	log.SetOutput(os.Stderr)
	log.Fatalf("benchfloor: %v", err)
}
