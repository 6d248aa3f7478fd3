// Package controller is egress-guard's Kubernetes control plane, the third deployable beside
// the proxy (sidecar/) and the capture installer (init-container/): one program that loads
// and watches the policy file exactly as the gateway does and serves each sidecar its own
// identity's policy (policyserver), authenticating sidecars by their projected
// ServiceAccount tokens with cached TokenReviews. The admission webhook joins it next.
//
// Kubernetes client libraries live here and only here: the proxy and init binaries never
// link them (internal/buildcheck).
package controller

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/egress-guard/egress-guard/controller/certreload"
	"github.com/egress-guard/egress-guard/controller/inject"
	"github.com/egress-guard/egress-guard/controller/policyserver"
	"github.com/egress-guard/egress-guard/pkg/accesslog"
	"github.com/egress-guard/egress-guard/pkg/contract"
	"github.com/egress-guard/egress-guard/pkg/fdreserve"
	"github.com/egress-guard/egress-guard/pkg/metrics"
	"github.com/egress-guard/egress-guard/pkg/policy"
	"github.com/egress-guard/egress-guard/pkg/settings"
	"github.com/egress-guard/egress-guard/pkg/tokenreview"
)

// Config is the control plane's configuration.
type Config struct {
	ListenAddr      string        // LISTEN_ADDR: IP for both listeners ("" = all)
	Port            uint16        // PORT (8443): HTTPS, the sidecars' policy endpoint
	MetricsPort     uint16        // METRICS_PORT (9090): /health, /ready, /metrics
	CertFile        string        // TLS_CERT_FILE
	KeyFile         string        // TLS_KEY_FILE
	PolicyPath      string        // CONFIGMAP_PATH
	WatchInterval   time.Duration // WATCH_INTERVAL
	InternalDomains []string      // INTERNAL_DOMAINS
	Audience        string        // TOKEN_AUDIENCE (egress-guard)
	Kubeconfig      string        // KUBECONFIG ("" = in-cluster)
	MaxWait         time.Duration // MAX_WAIT (60s): longest policy long-poll
	LogLevel        slog.Level    // LOG_LEVEL

	// The admission webhook (WEBHOOK_PORT; 0 turns it off) and what it injects.
	WebhookPort  uint16
	Inject       inject.Config
	InjectCAFile string // INJECT_CA_FILE: the CA sidecars trust for the control plane
	NativeMode   string // INJECT_NATIVE_SIDECAR: auto (from the server version), true, false
}

// Settings declares the control plane's settings (environment variables, also flags).
func Settings(c *Config) *settings.Set {
	var s settings.Set
	s.Addr(&c.ListenAddr, "LISTEN_ADDR", "listen-addr", "", "IP address to bind both listeners to")
	s.Port(&c.Port, "PORT", "port", "8443", "HTTPS port of the sidecars' policy endpoint")
	s.Port(&c.MetricsPort, "METRICS_PORT", "metrics-port", "9090", "/health, /ready and /metrics port")
	s.String(&c.CertFile, "TLS_CERT_FILE", "tls-cert-file", "/etc/egress-guard/tls/tls.crt", "serving certificate (reloaded when it changes)")
	s.String(&c.KeyFile, "TLS_KEY_FILE", "tls-key-file", "/etc/egress-guard/tls/tls.key", "serving key")
	s.String(&c.PolicyPath, "CONFIGMAP_PATH", "policy", "/etc/config/egress-policy.yaml", "policy file")
	s.SecondsOrDuration(&c.WatchInterval, "WATCH_INTERVAL", "watch-interval", "1", "policy poll interval: seconds, or a duration such as 500ms (an edit reaches the sidecars this soon, plus 250 ms)")
	s.ListOrNone(&c.InternalDomains, "INTERNAL_DOMAINS", "internal-domains", strings.Join(policy.DefaultInternalDomains, ","), "private-use DNS suffixes whose exact names may reach private addresses; none for no suffix")
	s.String(&c.Audience, "TOKEN_AUDIENCE", "token-audience", tokenreview.DefaultAudience, "audience the sidecars' projected tokens must carry")
	s.String(&c.Kubeconfig, "KUBECONFIG", "kubeconfig", "", "kubeconfig file; empty: the in-cluster ServiceAccount")
	s.Duration(&c.MaxWait, "MAX_WAIT", "max-wait", "60s", "longest a sidecar's policy request is held open")
	s.LogLevel(&c.LogLevel, "LOG_LEVEL", "log-level", "INFO")
	s.Func("WEBHOOK_PORT", "webhook-port", "0", "HTTPS port of the admission webhook (path /inject); 0: no webhook", func(v string) error {
		if v == "0" {
			c.WebhookPort = 0
			return nil
		}
		p, err := settings.ParsePort(v)
		c.WebhookPort = p
		return err
	})
	s.String(&c.Inject.SidecarImage, "INJECT_SIDECAR_IMAGE", "", "egress-guard:latest", "the sidecar's image")
	s.String(&c.Inject.InitImage, "INJECT_INIT_IMAGE", "", "egress-guard-init:latest", "the capture init container's image")
	s.String(&c.Inject.ControlPlaneURL, "INJECT_CONTROL_PLANE_URL", "", "https://egress-guard.egress-guard.svc:443", "the control plane's URL as sidecars reach it")
	s.String(&c.InjectCAFile, "INJECT_CA_FILE", "", "/etc/egress-guard/tls/ca.crt", "the CA certificate sidecars trust for the control plane")
	s.Func("INJECT_PROXY_UID", "", strconv.Itoa(contract.ProxyUID), "the sidecar's UID (and GID)", func(v string) error {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n <= 0 {
			return errors.New("want a UID above 0")
		}
		c.Inject.ProxyUID, c.Inject.ProxyGID = n, n
		return nil
	})
	s.Port(&c.Inject.RedirectPort, "INJECT_REDIRECT_PORT", "", strconv.Itoa(contract.TransparentPort), "the sidecar's transparent port")
	s.Prefixes(&c.Inject.ExcludeCIDRs, "INJECT_EXCLUDE_CIDRS", "", "", "destinations the capture leaves alone (platform configuration only)")
	s.Ports(&c.Inject.ExcludePorts, "INJECT_EXCLUDE_PORTS", "", "", "destination TCP ports the capture leaves alone")
	s.OneOf(&c.Inject.UDPPolicy, []string{"drop", "reject", "allow"}, "INJECT_UDP_POLICY", "", "drop", "non-DNS UDP from captured pods")
	s.OneOf(&c.NativeMode, []string{"auto", "true", "false"}, "INJECT_NATIVE_SIDECAR", "", "auto", "inject a native sidecar (auto: API server 1.29 or later)")
	s.Func("INJECT_SIDECAR_GOMAXPROCS", "", "1", "the sidecar's GOMAXPROCS; 0: the Go runtime's default (every CPU of the node without a CPU limit)", func(v string) error {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			return errors.New("want 0 or a positive number")
		}
		c.Inject.GoMaxProcs = n
		return nil
	})
	s.Bool(&c.Inject.RequireFixedUser, "INJECT_REQUIRE_FIXED_USER", "", "false", "refuse app containers that could become the proxy's UID (no explicit non-root runAsUser, or privilege escalation allowed)")
	s.Func("INJECT_SIDECAR_RESOURCES", "", "cpu=20m,memory=32Mi;memory=128Mi", "the sidecar's requests;limits", func(v string) error {
		req, lim, _ := strings.Cut(v, ";")
		var err error
		if c.Inject.Resources.Requests, err = resourceList(req); err == nil {
			c.Inject.Resources.Limits, err = resourceList(lim)
		}
		return err
	})
	return &s
}

// resourceList parses "cpu=20m,memory=32Mi".
func resourceList(v string) (corev1.ResourceList, error) {
	out := corev1.ResourceList{}
	for _, f := range settings.SplitList(v) {
		name, q, ok := strings.Cut(f, "=")
		qty, err := resource.ParseQuantity(q)
		if !ok || err != nil {
			return nil, fmt.Errorf("%q: want name=quantity such as memory=32Mi", f)
		}
		out[corev1.ResourceName(name)] = qty
	}
	return out, nil
}

// kubeReviewer asks the API server with client-go. RBAC: tokenreviews create.
type kubeReviewer struct{ client kubernetes.Interface }

func (k kubeReviewer) Review(ctx context.Context, token string, audiences []string) (bool, string, error) {
	tr, err := k.client.AuthenticationV1().TokenReviews().Create(ctx, &authnv1.TokenReview{
		Spec: authnv1.TokenReviewSpec{Token: token, Audiences: audiences},
	}, metav1.CreateOptions{})
	if err != nil {
		return false, "", fmt.Errorf("token review: %w", err)
	}
	if !tr.Status.Authenticated || !tokenreview.AudiencesGranted(tr.Status.Audiences, audiences) {
		return false, "", nil
	}
	return true, tr.Status.User.Username, nil
}

// restConfig is the API server access: a kubeconfig file, or the pod's own ServiceAccount.
func restConfig(kubeconfig string) (*rest.Config, error) {
	if kubeconfig != "" {
		return clientcmd.BuildConfigFromFlags("", kubeconfig)
	}
	c, err := rest.InClusterConfig()
	if err != nil {
		return nil, fmt.Errorf("no KUBECONFIG and not in a cluster: %w", err)
	}
	return c, nil
}

// Run serves until ctx ends.
func Run(ctx context.Context, cfg Config, out io.Writer) error {
	logOut := accesslog.NewBufferedWriter(out, 16<<10, 100*time.Millisecond)
	defer logOut.Close()
	log := slog.New(slog.NewJSONHandler(logOut, &slog.HandlerOptions{Level: cfg.LogLevel}))

	rc, err := restConfig(cfg.Kubeconfig)
	if err != nil {
		return err
	}
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return fmt.Errorf("kubernetes client: %w", err)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	pm := metrics.NewPolicy(reg)
	cache := &tokenreview.Cache{Reviewer: kubeReviewer{client}, Audiences: []string{cfg.Audience}}
	ps := &policyserver.Server{Auth: cache, MaxWait: cfg.MaxWait, Metrics: policyserver.NewMetrics(reg, cache), Log: log}

	watcher := policy.NewWatcher(cfg.PolicyPath, cfg.WatchInterval, policy.Options{InternalDomains: cfg.InternalDomains},
		func(p *policy.Policy, err error) {
			pm.Observe(log, p, err)
			if err == nil {
				ps.SetPolicy(p)
			}
		})
	// A missing or bad policy at start is not fatal: sidecars are answered 503 (they keep
	// their last good policy) until the file is fixed.
	_ = watcher.Load()

	certs, err := certreload.New(cfg.CertFile, cfg.KeyFile)
	if err != nil {
		return err
	}
	certs.OnError = func(err error) {
		log.Warn("serving certificate not reloaded; keeping the last good one", "err", err.Error())
	}

	apiAddr := net.JoinHostPort(cfg.ListenAddr, strconv.Itoa(int(cfg.Port)))
	tlsConfig := &tls.Config{GetCertificate: certs.GetCertificate, MinVersion: tls.VersionTLS12,
		NextProtos: []string{"http/1.1"}}
	admin := &http.Server{
		Addr: net.JoinHostPort(cfg.ListenAddr, strconv.Itoa(int(cfg.MetricsPort))),
		Handler: metrics.AdminMux(reg, ps.Ready, func() string {
			if !ps.Ready() {
				return "no policy loaded"
			}
			return ""
		}),
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       time.Minute,
	}
	apiLn, err := net.Listen("tcp", apiAddr)
	if err != nil {
		return fmt.Errorf("policy listener: %w", err)
	}
	adminLn, err := net.Listen("tcp", admin.Addr)
	if err != nil {
		apiLn.Close()
		return fmt.Errorf("metrics listener: %w", err)
	}
	webhook, err := newWebhook(cfg, client, log, tlsConfig)
	if err != nil {
		apiLn.Close()
		adminLn.Close()
		return err
	}
	bg, stop := context.WithCancel(context.Background())
	defer stop()
	go watcher.Run(bg)
	errc := make(chan error, 2)
	go func() { errc <- ps.Serve(tls.NewListener(apiLn, tlsConfig)) }()
	// Every sidecar holds a connection to the policy listener: the admin endpoints keep a few
	// descriptors in reserve so that the liveness probe is still answered if they run out.
	go func() { errc <- admin.Serve(fdreserve.Listen(adminLn, fdreserve.AdminReserve)) }()
	if webhook != nil {
		go func() { errc <- webhook.srv.ServeTLS(webhook.ln, "", "") }()
	}
	log.Info("egress-guard controller started", "policy_endpoint", apiLn.Addr().String(), "metrics", adminLn.Addr().String(),
		"policy", cfg.PolicyPath, "policy_loaded", watcher.Current() != nil, "audience", cfg.Audience)

	select {
	case <-ctx.Done():
	case err := <-errc:
		apiLn.Close()
		admin.Close()
		return fmt.Errorf("server stopped: %w", err)
	}
	log.Info("shutting down")
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	// Waiting sidecars are answered at once and reconnect to another replica.
	apiLn.Close()
	ps.Stop()
	if webhook != nil {
		webhook.srv.Shutdown(sctx)
	}
	admin.Shutdown(sctx)
	return nil
}

type webhookServer struct {
	srv *http.Server
	ln  net.Listener
}

// newWebhook starts listening for AdmissionReviews, or returns nil when WEBHOOK_PORT is 0.
func newWebhook(cfg Config, client kubernetes.Interface, log *slog.Logger, tlsConfig *tls.Config) (*webhookServer, error) {
	if cfg.WebhookPort == 0 {
		return nil, nil
	}
	ic := cfg.Inject
	ca, err := os.ReadFile(cfg.InjectCAFile)
	if err != nil {
		return nil, fmt.Errorf("INJECT_CA_FILE: %w", err)
	}
	ic.ControlPlaneCA = string(ca)
	ic.Version = version
	switch cfg.NativeMode {
	case "true":
		ic.NativeSidecar = true
	case "auto":
		// Native sidecars (restartPolicy Always on init containers) are on by default from
		// Kubernetes 1.29.
		v, err := client.Discovery().ServerVersion()
		if err != nil {
			return nil, fmt.Errorf("API server version (for INJECT_NATIVE_SIDECAR=auto): %w", err)
		}
		major, _ := strconv.Atoi(strings.TrimSuffix(v.Major, "+"))
		minor, _ := strconv.Atoi(strings.TrimSuffix(v.Minor, "+"))
		ic.NativeSidecar = major > 1 || major == 1 && minor >= 29
	}
	mux := http.NewServeMux()
	mux.Handle(inject.Path, &inject.Webhook{Config: ic, Log: log, Namespaces: func(ctx context.Context, name string) (map[string]string, error) {
		ns, err := client.CoreV1().Namespaces().Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return nil, err
		}
		return ns.Labels, nil
	}})
	addr := net.JoinHostPort(cfg.ListenAddr, strconv.Itoa(int(cfg.WebhookPort)))
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("webhook listener: %w", err)
	}
	log.Info("admission webhook listening", "addr", ln.Addr().String(), "native_sidecar", ic.NativeSidecar)
	return &webhookServer{ln: ln, srv: &http.Server{
		Handler: mux,
		// A copy: ServeTLS adds "h2" to the config's NextProtos (net/http's HTTP/2 setup),
		// which must not reach the caller's config (the policy listener's).
		TLSConfig:         tlsConfig.Clone(),
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}}, nil
}

// version is recorded in the pods the webhook injects; set at build time with
// -ldflags "-X github.com/egress-guard/egress-guard/controller.version=...".
var version = "dev"
