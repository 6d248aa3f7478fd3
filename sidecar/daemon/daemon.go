package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/egress-guard/egress-guard/pkg/accesslog"
	"github.com/egress-guard/egress-guard/pkg/addrclass"
	"github.com/egress-guard/egress-guard/pkg/dialer"
	"github.com/egress-guard/egress-guard/pkg/metrics"
	"github.com/egress-guard/egress-guard/pkg/policy"
	"github.com/egress-guard/egress-guard/sidecar/proxy"
	"github.com/egress-guard/egress-guard/sidecar/tunnel"
)

// Run serves until ctx is cancelled (the caller cancels it on SIGTERM or SIGINT), then drains:
// it stops accepting, reports not ready, lets tunnels finish or go idle within DrainTimeout,
// closes the rest, and returns once every connection's close line is written. Logs are JSON
// lines on out.
func Run(ctx context.Context, cfg Config, out io.Writer) error {
	// Lines are batched (flushed every 100ms and at exit) so that logging a connection does
	// not add write(2) calls to its path.
	logOut := accesslog.NewBufferedWriter(out, 64<<10, 100*time.Millisecond)
	defer logOut.Close()
	log := slog.New(slog.NewJSONHandler(logOut, &slog.HandlerOptions{Level: cfg.LogLevel}))
	m := metrics.New()

	watcher := policy.NewWatcher(cfg.PolicyPath, cfg.WatchInterval,
		policy.Options{InternalDomains: cfg.InternalDomains},
		func(p *policy.Policy, err error) { reportPolicy(log, m, p, err) })
	// A bad or missing policy at start is not fatal: the proxy stays not ready and denies
	// everything, and picks the file up as soon as it is fixed, without a restart backoff.
	_ = watcher.Load()

	self, err := ownAddrs()
	if err != nil {
		return fmt.Errorf("list own addresses: %w", err)
	}
	tracker := tunnel.NewTracker(tunnel.Config{
		MaxConns:         cfg.MaxTunnels,
		IdleTimeout:      cfg.IdleTimeout,
		DrainIdleTimeout: cfg.DrainIdle,
	})
	tlsPorts := make(map[uint16]bool, len(cfg.TLSPorts))
	for _, p := range cfg.TLSPorts {
		tlsPorts[p] = true
	}
	srv, err := proxy.New(proxy.Config{
		Policy:             watcher.Current,
		Classifier:         addrclass.New(cfg.InternalCIDRs, self),
		Resolver:           dialer.NewResolver(cfg.Resolver),
		Dialer:             &net.Dialer{KeepAlive: 30 * time.Second},
		Tracker:            tracker,
		AccessLog:          accesslog.New(log),
		Metrics:            m,
		Log:                log,
		TLSPorts:           tlsPorts,
		Identity:           identityFor(cfg),
		ServerFirstTimeout: cfg.ServerFirstTimeout,
		HeaderTimeout:      cfg.HeaderTimeout,
		MaxHeaderBytes:     cfg.MaxHeaderBytes,
		PeekTimeout:        cfg.PeekTimeout,
		DialTimeout:        cfg.DialTimeout,
	})
	if err != nil {
		return err
	}

	proxyAddr := cfg.ListenAddr
	if cfg.Mode == ModeSidecar && proxyAddr == "" {
		proxyAddr = "127.0.0.1" // the explicit port serves this pod's own apps only
	}
	lc := net.ListenConfig{KeepAlive: -1}
	proxyLn, err := lc.Listen(context.Background(), "tcp", net.JoinHostPort(proxyAddr, strconv.Itoa(int(cfg.ProxyPort))))
	if err != nil {
		return fmt.Errorf("proxy listener: %w", err)
	}
	adminLn, err := net.Listen("tcp", net.JoinHostPort(cfg.ListenAddr, strconv.Itoa(int(cfg.MetricsPort))))
	if err != nil {
		proxyLn.Close()
		return fmt.Errorf("metrics listener: %w", err)
	}
	var transparentLns []net.Listener
	if cfg.Mode == ModeSidecar {
		transparentLns, err = listenTransparent(lc, log, cfg.TransparentPort)
		if err != nil {
			proxyLn.Close()
			adminLn.Close()
			return err
		}
	}

	var draining atomic.Bool
	admin := &http.Server{
		Handler:           adminMux(m, func() bool { return watcher.Current() != nil && !draining.Load() }),
		ReadHeaderTimeout: 5 * time.Second,
	}
	bg, stopBG := context.WithCancel(context.Background())
	defer stopBG()
	go watcher.Run(bg)
	go tracker.Run(bg)
	go func() {
		if err := admin.Serve(adminLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics server stopped", "err", err)
		}
	}()
	serveErr := make(chan error, 1+len(transparentLns))
	go func() { serveErr <- srv.Serve(proxyLn) }()
	for _, ln := range transparentLns {
		go func() { serveErr <- srv.ServeTransparent(ln) }()
	}
	go srv.RunKnownAddrs(bg, cfg.KnownAddrsInterval)
	log.Info("egress-guard started", "mode", cfg.Mode, "identity", cfg.Identity, "proxy", proxyLn.Addr().String(),
		"transparent", listenerAddrs(transparentLns), "metrics", adminLn.Addr().String(),
		"policy", cfg.PolicyPath, "policy_loaded", watcher.Current() != nil)

	select {
	case <-ctx.Done():
	case err := <-serveErr:
		srv.Close()
		admin.Close()
		return err
	}

	draining.Store(true)
	srv.Close()
	log.Info("draining", "tunnels", tracker.Len(), "budget", cfg.DrainTimeout.String())
	dctx, cancel := context.WithTimeout(context.Background(), cfg.DrainTimeout)
	defer cancel()
	tracker.Drain(dctx)
	log.Info("drained; exiting")
	shutdownCtx, cancel2 := context.WithTimeout(context.Background(), time.Second)
	defer cancel2()
	return admin.Shutdown(shutdownCtx)
}

func reportPolicy(log *slog.Logger, m *metrics.Metrics, p *policy.Policy, err error) {
	if err != nil {
		m.PolicyLoadFailed()
		log.Error("policy rejected; keeping the last good policy", "err", err.Error())
		return
	}
	counts := make(map[string]int)
	for _, id := range p.Identities() {
		counts[id.Name] = len(id.Rules)
	}
	m.PolicyLoaded(p.Hash, counts)
	log.Info("policy loaded", "path", p.Source, "hash", p.Hash, "identities", len(counts))
}

// adminMux serves /health (the process is up), /ready (a policy is loaded and the proxy is not
// draining) and /metrics.
func adminMux(m *metrics.Metrics, ready func() bool) *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, _ *http.Request) {
		io.WriteString(w, "ok\n")
	})
	mux.HandleFunc("GET /ready", func(w http.ResponseWriter, _ *http.Request) {
		if !ready() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		io.WriteString(w, "ready\n")
	})
	mux.Handle("GET /metrics", m.Handler())
	return mux
}

// ownAddrs lists the addresses of this network namespace's interfaces: a client must not be
// able to make the proxy connect to itself (or to a sidecar's neighbours on its own address).
func ownAddrs() ([]netip.Addr, error) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil, err
	}
	var out []netip.Addr
	for _, a := range addrs {
		if pn, ok := a.(*net.IPNet); ok {
			if ip, ok := netip.AddrFromSlice(pn.IP); ok {
				out = append(out, ip.Unmap())
			}
		}
	}
	return out, nil
}

func identityFor(cfg Config) string {
	if cfg.Mode == ModeSidecar {
		return cfg.Identity
	}
	return ""
}

// listenTransparent listens where the capture rules' REDIRECT sends locally generated
// traffic: 127.0.0.1 for IPv4 and ::1 for IPv6. A pod without IPv6 has no ::1; the capture
// installer refuses pods whose IPv6 it cannot capture, so only IPv4 is required here.
func listenTransparent(lc net.ListenConfig, log *slog.Logger, port uint16) ([]net.Listener, error) {
	p := strconv.Itoa(int(port))
	v4, err := lc.Listen(context.Background(), "tcp4", net.JoinHostPort("127.0.0.1", p))
	if err != nil {
		return nil, fmt.Errorf("transparent listener: %w", err)
	}
	lns := []net.Listener{v4}
	if v6, err := lc.Listen(context.Background(), "tcp6", net.JoinHostPort("::1", p)); err == nil {
		lns = append(lns, v6)
	} else {
		log.Warn("no IPv6 transparent listener", "err", err.Error())
	}
	return lns, nil
}

func listenerAddrs(lns []net.Listener) []string {
	var out []string
	for _, ln := range lns {
		out = append(out, ln.Addr().String())
	}
	return out
}
