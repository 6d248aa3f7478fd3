// Package kubelab starts a real Kubernetes control plane (etcd and
// kube-apiserver, optionally kube-controller-manager) on loopback for tests.
//
// The binaries come from scripts/k8s-bins.sh, which builds them once from the
// nested module tools/k8s into a cache outside the clone and prints the
// directory:
//
//	export KUBE_BIN_DIR=$(scripts/k8s-bins.sh)
//
// Everything listens on 127.0.0.1 with ports picked at run time, and the
// service CIDR is loopback (127.100.0.0/24), so a Service's ClusterIP that the
// apiserver dials (service-form webhooks) is a local address too. There is no
// kubelet and no scheduler: Pods stay Pending, which is all admission and
// token tests need. Without the controller manager there is no "default"
// ServiceAccount and deleted namespaces stay Terminating: create the
// ServiceAccounts a test needs (CreateServiceAccount) and use one fresh
// namespace per test, or call StartControllerManager.
//
// StartNode (node.go) is the other shape: a whole single-node cluster with a
// scheduler, kube-proxy and a kubelet on containerd, in network and mount
// namespaces of its own, for tests that run real pods.
//
// A typical test:
//
//	func TestX(t *testing.T) {
//		c := kubelab.StartForTest(t, kubelab.Options{})
//		c.CreateNamespace("t1")
//		...
//	}
package kubelab

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// KubernetesVersion is the version of the binaries scripts/k8s-bins.sh builds.
const KubernetesVersion = "v1.37.2"

// DefaultServiceCIDR is the service cluster IP range the apiserver is started
// with: loopback, so a ClusterIP is never a routable 10.x address.
const DefaultServiceCIDR = "127.100.0.0/24"

// Options configures Start. The zero value is usable when KUBE_BIN_DIR is set.
type Options struct {
	// BinDir holds etcd and kube-apiserver (and kube-controller-manager for
	// StartControllerManager). Empty means $KUBE_BIN_DIR.
	BinDir string
	// ServiceCIDR is --service-cluster-ip-range; empty means DefaultServiceCIDR.
	// Keep it inside 127.0.0.0/8.
	ServiceCIDR string
	// APIAudiences are added to --api-audiences after the issuer URL (the
	// default audience, which the apiserver itself accepts).
	APIAudiences []string
	// ExtraAPIServerArgs are appended to kube-apiserver's command line
	// ("--flag=value"); a later flag overrides an earlier one.
	ExtraAPIServerArgs []string
	// StartTimeout bounds the whole start (etcd healthy and apiserver /readyz
	// "ok"); 0 means 2 minutes. ctx can cut it shorter.
	StartTimeout time.Duration
	// Output, when set, also receives the processes' logs (they always go to
	// files in the cluster's work dir; see LogTail).
	Output io.Writer
}

// Cluster is a running control plane. Stop it when done (StartForTest does
// that in t.Cleanup).
type Cluster struct {
	opts         Options
	binDir       string
	dir          string // temp work dir: pki/, etcd data, logs, kubeconfig
	ca           *ca
	url          string
	issuer       string
	etcdURL      string
	adminCertPEM []byte
	adminKeyPEM  []byte
	saKeyPath    string
	kubeconfig   string

	clientOnce sync.Once
	client     kubernetes.Interface
	clientErr  error

	// wrap prefixes every process's command line: nsenter into a node's
	// namespaces (see StartNode); empty runs them here.
	wrap []string

	procsMu  sync.Mutex
	procs    []*proc // in start order; stopped in reverse
	stopOnce sync.Once
}

// URL returns the apiserver's base URL, https://127.0.0.1:PORT.
func (c *Cluster) URL() string { return c.url }

// Issuer returns the service-account token issuer (the apiserver URL); it
// is also the default API audience.
func (c *Cluster) Issuer() string { return c.issuer }

// CAPEM returns the cluster CA certificate (PEM). It verifies the apiserver's
// serving cert and certs from IssueServingCert.
func (c *Cluster) CAPEM() []byte { return bytes.Clone(c.ca.certPEM) }

// Kubeconfig returns the path of a kubeconfig file for the admin user
// (system:masters), usable by kubectl --kubeconfig or client-go.
func (c *Cluster) Kubeconfig() string { return c.kubeconfig }

// BinDir returns the directory the binaries were run from.
func (c *Cluster) BinDir() string { return c.binDir }

// EtcdURL returns etcd's client URL (http://127.0.0.1:PORT).
func (c *Cluster) EtcdURL() string { return c.etcdURL }

// RESTConfig returns a new admin (system:masters) client config.
func (c *Cluster) RESTConfig() *rest.Config {
	return &rest.Config{
		Host: c.url,
		TLSClientConfig: rest.TLSClientConfig{
			CAData:   bytes.Clone(c.ca.certPEM),
			CertData: bytes.Clone(c.adminCertPEM),
			KeyData:  bytes.Clone(c.adminKeyPEM),
		},
		QPS:     200,
		Burst:   400,
		Timeout: 30 * time.Second,
	}
}

// Client returns an admin clientset (shared; safe for concurrent use).
func (c *Cluster) Client() kubernetes.Interface {
	c.clientOnce.Do(func() {
		c.client, c.clientErr = kubernetes.NewForConfig(c.RESTConfig())
	})
	if c.clientErr != nil {
		// NewForConfig only fails on an invalid config, which we built.
		panic(fmt.Sprintf("kubelab: building client: %v", c.clientErr))
	}
	return c.client
}

// IssueServingCert returns a TLS serving certificate and key (PEM) signed by
// the cluster CA, for hosts (IPs or DNS names; for a service-form webhook,
// include "<svc>.<ns>.svc"). Use CAPEM as the caBundle.
func (c *Cluster) IssueServingCert(hosts ...string) (certPEM, keyPEM []byte, err error) {
	if len(hosts) == 0 {
		return nil, nil, errors.New("kubelab: IssueServingCert needs at least one host")
	}
	return c.ca.issue(hosts[0], nil, hosts, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth})
}

// Start generates a PKI, starts etcd and kube-apiserver on free loopback
// ports, and waits until the apiserver's /readyz says ok. On error nothing is
// left running. ctx only bounds the start; the cluster runs until Stop.
func Start(ctx context.Context, opts Options) (*Cluster, error) {
	binDir := opts.BinDir
	if binDir == "" {
		binDir = os.Getenv("KUBE_BIN_DIR")
	}
	if binDir == "" {
		return nil, errors.New("kubelab: no BinDir and KUBE_BIN_DIR is not set (export KUBE_BIN_DIR=$(scripts/k8s-bins.sh))")
	}
	for _, b := range []string{"etcd", "kube-apiserver"} {
		if _, err := os.Stat(filepath.Join(binDir, b)); err != nil {
			return nil, fmt.Errorf("kubelab: %s not found in %s (run scripts/k8s-bins.sh): %w", b, binDir, err)
		}
	}
	if opts.ServiceCIDR == "" {
		opts.ServiceCIDR = DefaultServiceCIDR
	}
	timeout := opts.StartTimeout
	if timeout == 0 {
		timeout = 2 * time.Minute
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	// Free ports are picked by listening on :0 and closing, so another process
	// can grab one before etcd or the apiserver binds it; retry on that.
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		c, err := start(ctx, binDir, opts)
		if err == nil {
			return c, nil
		}
		lastErr = err
		if !errors.Is(err, errPortInUse) || ctx.Err() != nil {
			break
		}
	}
	return nil, lastErr
}

var errPortInUse = errors.New("address already in use")

func start(ctx context.Context, binDir string, opts Options) (_ *Cluster, err error) {
	dir, err := os.MkdirTemp("", "kubelab-")
	if err != nil {
		return nil, err
	}
	c := &Cluster{opts: opts, binDir: binDir, dir: dir}
	defer func() {
		if err != nil {
			c.Stop()
		}
	}()

	ports, err := freePorts(3)
	if err != nil {
		return nil, err
	}
	etcdClient, etcdPeer, apiPort := ports[0], ports[1], ports[2]
	c.url = fmt.Sprintf("https://127.0.0.1:%d", apiPort)
	c.issuer = c.url
	c.etcdURL = fmt.Sprintf("http://127.0.0.1:%d", etcdClient)

	if err := c.writePKI(opts.ServiceCIDR); err != nil {
		return nil, fmt.Errorf("kubelab: PKI: %w", err)
	}

	// etcd
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", etcdPeer)
	etcd, err := c.startProc("etcd",
		"--name=default",
		"--data-dir="+filepath.Join(dir, "etcd-data"),
		"--listen-client-urls="+c.etcdURL,
		"--advertise-client-urls="+c.etcdURL,
		"--listen-peer-urls="+peerURL,
		"--initial-advertise-peer-urls="+peerURL,
		"--initial-cluster=default="+peerURL,
		"--unsafe-no-fsync",
		"--log-level=warn",
	)
	if err != nil {
		return nil, err
	}
	if err := waitHTTP(ctx, etcd, http.DefaultClient, c.etcdURL+"/health", func(b []byte) bool {
		return bytes.Contains(b, []byte(`"health":"true"`))
	}); err != nil {
		return nil, err
	}

	// kube-apiserver
	pki := filepath.Join(dir, "pki")
	audiences := append([]string{c.issuer}, opts.APIAudiences...)
	args := []string{
		"--etcd-servers=" + c.etcdURL,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		fmt.Sprintf("--secure-port=%d", apiPort),
		"--tls-cert-file=" + filepath.Join(pki, "apiserver.crt"),
		"--tls-private-key-file=" + filepath.Join(pki, "apiserver.key"),
		"--client-ca-file=" + filepath.Join(pki, "ca.crt"),
		"--service-account-issuer=" + c.issuer,
		"--service-account-key-file=" + filepath.Join(pki, "sa.pub"),
		"--service-account-signing-key-file=" + c.saKeyPath,
		"--api-audiences=" + strings.Join(audiences, ","),
		"--service-cluster-ip-range=" + opts.ServiceCIDR,
		"--authorization-mode=RBAC",
		"--allow-privileged=true",
		"--endpoint-reconciler-type=none",
		"--cert-dir=" + filepath.Join(dir, "apiserver-certs"),
		"--profiling=false",
	}
	args = append(args, opts.ExtraAPIServerArgs...)
	api, err := c.startProc("kube-apiserver", args...)
	if err != nil {
		return nil, err
	}
	hc, err := c.adminHTTPClient()
	if err != nil {
		return nil, err
	}
	if err := waitHTTP(ctx, api, hc, c.url+"/readyz", func(b []byte) bool {
		return string(bytes.TrimSpace(b)) == "ok"
	}); err != nil {
		return nil, err
	}
	return c, nil
}

func (c *Cluster) writePKI(serviceCIDR string) error {
	var err error
	if c.ca, err = newCA(); err != nil {
		return err
	}
	hosts := []string{"127.0.0.1", "localhost", "kubernetes", "kubernetes.default",
		"kubernetes.default.svc", "kubernetes.default.svc.cluster.local"}
	// The first address of the service CIDR is the "kubernetes" Service's ClusterIP.
	if _, n, err := net.ParseCIDR(serviceCIDR); err == nil && n.IP.To4() != nil {
		ip := n.IP.To4()
		hosts = append(hosts, net.IPv4(ip[0], ip[1], ip[2], ip[3]+1).String())
	}
	srvCert, srvKey, err := c.ca.issue("kube-apiserver", nil, hosts, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth})
	if err != nil {
		return err
	}
	if c.adminCertPEM, c.adminKeyPEM, err = c.ca.issue("admin", []string{"system:masters"}, nil,
		[]x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}); err != nil {
		return err
	}
	saKey, saPub, err := newSAKeyPair()
	if err != nil {
		return err
	}
	pki := filepath.Join(c.dir, "pki")
	if err := os.MkdirAll(pki, 0o700); err != nil {
		return err
	}
	c.saKeyPath = filepath.Join(pki, "sa.key")
	if err := writeFiles(pki, map[string][]byte{
		"ca.crt":        c.ca.certPEM,
		"apiserver.crt": srvCert,
		"apiserver.key": srvKey,
		"admin.crt":     c.adminCertPEM,
		"admin.key":     c.adminKeyPEM,
		"sa.key":        saKey,
		"sa.pub":        saPub,
	}); err != nil {
		return err
	}
	c.kubeconfig = filepath.Join(c.dir, "admin.kubeconfig")
	return os.WriteFile(c.kubeconfig, []byte(kubeconfigYAML(c.url, c.ca.certPEM, c.adminCertPEM, c.adminKeyPEM)), 0o600)
}

// kubeconfigYAML is a kubeconfig for one user of the cluster at server.
func kubeconfigYAML(server string, caPEM, certPEM, keyPEM []byte) string {
	b64 := base64.StdEncoding.EncodeToString
	return fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: kubelab
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: admin
  user:
    client-certificate-data: %s
    client-key-data: %s
contexts:
- name: kubelab
  context:
    cluster: kubelab
    user: admin
    namespace: default
current-context: kubelab
`, server, b64(caPEM), b64(certPEM), b64(keyPEM))
}

func (c *Cluster) adminHTTPClient() (*http.Client, error) {
	cert, err := tls.X509KeyPair(c.adminCertPEM, c.adminKeyPEM)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	pool.AddCert(c.ca.cert)
	return &http.Client{
		Timeout: 5 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{
			RootCAs:      pool,
			Certificates: []tls.Certificate{cert},
		}},
	}, nil
}

// Stop kills every process of the cluster and removes its work dir. It is
// safe to call more than once.
func (c *Cluster) Stop() {
	c.stopOnce.Do(func() {
		c.procsMu.Lock()
		procs := c.procs
		c.procsMu.Unlock()
		for i := len(procs) - 1; i >= 0; i-- {
			procs[i].kill()
		}
		if c.dir != "" {
			os.RemoveAll(c.dir)
		}
	})
}

// LogTail returns the last n bytes of a component's log ("etcd",
// "kube-apiserver", "kube-controller-manager"; on a Node also "kubelet",
// "kube-scheduler", "kube-proxy", "containerd"), or "" once Stop removed it.
func (c *Cluster) LogTail(component string, n int) string {
	b, err := os.ReadFile(filepath.Join(c.dir, component+".log"))
	if err != nil {
		return ""
	}
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

func freePorts(n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	var ports []int
	for i := 0; i < n; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// waitHTTP polls url until ok(body) with status 200, the process exits, or
// ctx ends.
func waitHTTP(ctx context.Context, p *proc, hc *http.Client, url string, ok func([]byte) bool) error {
	var last string
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		resp, err := hc.Do(req)
		if err == nil {
			b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK && ok(b) {
				return nil
			}
			last = fmt.Sprintf("HTTP %d: %.300s", resp.StatusCode, b)
		} else {
			last = err.Error()
		}
		select {
		case <-p.done:
			return p.exitError()
		case <-ctx.Done():
			return fmt.Errorf("kubelab: %s not ready at %s: %w (last: %s)\n%s log tail:\n%s",
				p.name, url, ctx.Err(), last, p.name, p.tail(4000))
		case <-time.After(100 * time.Millisecond):
		}
	}
}
