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
	"github.com/egress-guard/egress-guard/pkg/fdreserve"
	"github.com/egress-guard/egress-guard/pkg/metrics"
	"github.com/egress-guard/egress-guard/pkg/resolver"
	"github.com/egress-guard/egress-guard/sidecar/proxy"
	"github.com/egress-guard/egress-guard/sidecar/tunnel"
	"golang.org/x/net/netutil"
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

	source, identity, err := policySource(cfg, log, m)
	if err != nil {
		return err
	}
	tokens, err := tokenReviews(cfg, log)
	if err != nil {
		return err
	}

	self, err := ownAddrs()
	if err != nil {
		return fmt.Errorf("list own addresses: %w", err)
	}
	classifier := addrclass.New(cfg.InternalCIDRs, self)
	maxPerClient := cfg.MaxPendingPerClient
	if cfg.Mode == ModeSidecar {
		maxPerClient = 0 // one pod: every connection comes from it
	}
	tracker := tunnel.NewTracker(tunnel.Config{
		MaxConns:            cfg.MaxTunnels,
		MaxPending:          cfg.MaxPending,
		MaxPendingPerClient: maxPerClient,
		MaxPerIdentity:      cfg.MaxTunnelsPerIdentity,
		IdleTimeout:         cfg.IdleTimeout,
		DrainIdleTimeout:    cfg.DrainIdle,
	})
	tlsPorts := make(map[uint16]bool, len(cfg.TLSPorts))
	for _, p := range cfg.TLSPorts {
		tlsPorts[p] = true
	}
	res := resolver.New(resolver.Config{Server: cfg.Resolver}) // one cache for both listeners
	m.DNSCache(res.Stats)
	srv, err := proxy.New(proxy.Config{
		Policy:             source.Current,
		Classifier:         classifier,
		Resolver:           res,
		Dialer:             &net.Dialer{KeepAlive: 30 * time.Second},
		Tracker:            tracker,
		AccessLog:          accesslog.New(log),
		Metrics:            m,
		Log:                log,
		TLSPorts:           tlsPorts,
		Identity:           identity,
		Tokens:             tokens,
		ServerFirstTimeout: cfg.ServerFirstTimeout,
		HeaderTimeout:      cfg.HeaderTimeout,
		MaxHeaderBytes:     cfg.MaxHeaderBytes,
		PeekTimeout:        cfg.PeekTimeout,
		DialTimeout:        cfg.DialTimeout,
		KeepAliveTimeout:   cfg.KeepAliveTimeout,
		DenyECH:            cfg.DenyECH,
	})
	if err != nil {
		return err
	}

	lc := listenConfig()
	proxyLns, err := listenExplicit(lc, log, cfg)
	if err != nil {
		return err
	}
	closeAll := func(lns []net.Listener) {
		for _, ln := range lns {
			ln.Close()
		}
	}
	adminLn, err := listenAdmin(cfg)
	if err != nil {
		closeAll(proxyLns)
		return err
	}
	var transparentLns []net.Listener
	if cfg.Mode == ModeSidecar {
		transparentLns, err = listenTransparent(lc, log, cfg.TransparentPort)
		if err != nil {
			closeAll(proxyLns)
			adminLn.Close()
			return err
		}
	}

	var draining atomic.Bool
	// Ready: a policy is loaded and not draining. A control-plane outage after the first
	// policy does not make the pod unready (its last good policy is enforced); it shows in
	// the body of /ready.
	ready := func() bool { return source.Current() != nil && !draining.Load() }
	admin := adminServer(cfg, metrics.AdminMux(m.Registry, ready, source.Status))
	bg, stopBG := context.WithCancel(context.Background())
	defer stopBG()
	go source.Run(bg)
	go tracker.Run(bg)
	go func() {
		if err := admin.Serve(adminLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics server stopped", "err", err)
		}
	}()
	serveErr := make(chan error, len(proxyLns)+len(transparentLns))
	for _, ln := range proxyLns {
		go func() { serveErr <- srv.Serve(ln) }()
	}
	for _, ln := range transparentLns {
		go func() { serveErr <- srv.ServeTransparent(ln) }()
	}
	go srv.RunKnownAddrs(bg, cfg.KnownAddrsInterval)
	go refreshOwnAddrs(bg, classifier, log, 5*time.Second)
	log.Info("egress-guard started", "mode", cfg.Mode, "identity", cfg.Identity, "proxy", listenerAddrs(proxyLns),
		"transparent", listenerAddrs(transparentLns), "metrics", adminLn.Addr().String(),
		"policy", source.Describe(), "policy_loaded", source.Current() != nil, "token_auth", tokens != nil)

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

// refreshOwnAddrs keeps the proxy's own addresses current: a pod or node gains and loses
// addresses while the proxy runs, and an address it gained must never become reachable
// through a name.
func refreshOwnAddrs(ctx context.Context, c *addrclass.Classifier, log *slog.Logger, every time.Duration) {
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		self, err := ownAddrs()
		if err != nil {
			log.Warn("listing own addresses failed; keeping the last list", "err", err.Error())
			continue
		}
		c.SetSelf(self)
	}
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

// listenConfig is the ListenConfig of the proxy's listeners (explicit and transparent): plain
// TCP, not Multipath TCP, which Go's listeners accept by default since Go 1.24. The original
// destination of a redirected MPTCP connection cannot be read (MPTCP sockets do not implement
// SO_ORIGINAL_DST), so every MPTCP client would be reset; and the proxy's resets and
// half-closes are TCP's. An MPTCP client falls back to TCP. Keep-alive probes are off: idle
// connections are the tracker's business.
func listenConfig() net.ListenConfig {
	lc := net.ListenConfig{KeepAlive: -1}
	lc.SetMultipathTCP(false)
	return lc
}

// listenExplicit listens for explicit proxy clients. The gateway binds LISTEN_ADDR (all
// addresses when unset). The sidecar's explicit listener needs no credentials, since it uses
// the pod's identity, so it serves this pod's apps only: it binds loopback, 127.0.0.1 and ::1
// if the pod has it, whatever LISTEN_ADDR says (FromEnv refuses LISTEN_ADDR in sidecar mode).
func listenExplicit(lc net.ListenConfig, log *slog.Logger, cfg Config) ([]net.Listener, error) {
	if cfg.Mode == ModeSidecar {
		return listenLoopback(lc, log, "proxy listener", cfg.ProxyPort)
	}
	ln, err := lc.Listen(context.Background(), "tcp", net.JoinHostPort(cfg.ListenAddr, strconv.Itoa(int(cfg.ProxyPort))))
	if err != nil {
		return nil, fmt.Errorf("proxy listener: %w", err)
	}
	return []net.Listener{ln}, nil
}

// listenTransparent listens where the capture rules' REDIRECT sends locally generated
// traffic: 127.0.0.1 for IPv4 and ::1 for IPv6. A pod without IPv6 has no ::1; the capture
// installer refuses pods whose IPv6 it cannot capture, so only IPv4 is required here.
func listenTransparent(lc net.ListenConfig, log *slog.Logger, port uint16) ([]net.Listener, error) {
	return listenLoopback(lc, log, "transparent listener", port)
}

// listenLoopback listens on 127.0.0.1 (required) and ::1 (when the namespace has it).
func listenLoopback(lc net.ListenConfig, log *slog.Logger, what string, port uint16) ([]net.Listener, error) {
	p := strconv.Itoa(int(port))
	v4, err := lc.Listen(context.Background(), "tcp4", net.JoinHostPort("127.0.0.1", p))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	lns := []net.Listener{v4}
	if v6, err := lc.Listen(context.Background(), "tcp6", net.JoinHostPort("::1", p)); err == nil {
		lns = append(lns, v6)
	} else {
		log.Warn("no IPv6 "+what, "err", err.Error())
	}
	return lns, nil
}

// listenAdmin listens for /health, /ready and /metrics on adminHost:METRICS_PORT, accepting
// at most Admin.MaxConns connections at a time: the others wait in the kernel's accept queue
// (bounded by its backlog) and hold no descriptor of the process. It keeps a few descriptors
// in reserve, so that the probes are still answered while the process is out of them (see
// pkg/fdreserve).
func listenAdmin(cfg Config) (net.Listener, error) {
	lim := cfg.Admin.withDefaults()
	ln, err := net.Listen("tcp", net.JoinHostPort(adminHost(cfg), strconv.Itoa(int(cfg.MetricsPort))))
	if err != nil {
		return nil, fmt.Errorf("metrics listener: %w", err)
	}
	return netutil.LimitListener(fdreserve.Listen(ln, fdreserve.AdminReserve), lim.MaxConns), nil
}

// adminServer serves h with every timeout set: a silent, slow or idle admin connection is
// closed instead of holding a descriptor (and a slot of the listener's cap) forever.
func adminServer(cfg Config, h http.Handler) *http.Server {
	lim := cfg.Admin.withDefaults()
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: lim.ReadHeaderTimeout,
		ReadTimeout:       lim.ReadTimeout,
		WriteTimeout:      lim.WriteTimeout,
		IdleTimeout:       lim.IdleTimeout,
		MaxHeaderBytes:    lim.MaxHeaderBytes,
	}
}

func listenerAddrs(lns []net.Listener) []string {
	var out []string
	for _, ln := range lns {
		out = append(out, ln.Addr().String())
	}
	return out
}
