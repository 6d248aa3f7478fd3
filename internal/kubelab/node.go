package kubelab

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/egress-guard/egress-guard/internal/netlab"
)

// A real single-node cluster: etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
// kube-proxy and a kubelet on Debian's containerd and runc, all inside a network namespace
// and a mount namespace of the node's own. Nothing listens on the host's addresses but one
// loopback forwarder to the apiserver (for the test's clients, helm and kubectl); every
// address is in 198.18.0.0/15:
const (
	NodeName    = "eg-node"
	NodeIP      = "198.18.127.1"    // on the node namespace's lo: this kernel has no dummy links
	NodeDNSIP   = "198.18.127.53"   // the cluster DNS (dnsmasq; records from SetDNS)
	PodCIDR     = "198.18.112.0/24" // the CNI bridge egbr0, gateway .1
	PodGateway  = "198.18.112.1"
	NodeSvcCIDR = "198.18.120.0/24" // ClusterIPs, made real by kube-proxy in the node namespace
	apiPort     = 6443
)

// NodeOptions configures StartNode.
type NodeOptions struct {
	// BinDir holds the binaries of scripts/k8s-bins.sh; empty means $KUBE_BIN_DIR.
	BinDir string
	// Images are docker-archive tarballs imported into containerd before the kubelet
	// starts (pods use them with imagePullPolicy Never or IfNotPresent: nothing is pulled).
	Images []string
	// SandboxImage is the pause image's name (it must be among Images).
	SandboxImage string
	// Output, when set, also receives the processes' logs.
	Output io.Writer
}

// Node is a running single-node cluster. Its Cluster's URL and Kubeconfig reach the
// apiserver from the host (through a loopback forwarder).
type Node struct {
	*Cluster
	NS *netlab.NS

	containerd *proc
	cgroupName string
	madeDirs   []string // host directories created as mount points, removed at Stop
	fwd        net.Listener
	dnsHosts   string
	dnsmasq    *exec.Cmd
	dnsMu      sync.Mutex
	dns        map[string][]string
	nodeStop   sync.Once
}

// NodeCommands are the host commands StartNode runs.
var NodeCommands = []string{"containerd", "containerd-shim-runc-v2", "runc", "ctr", "nsenter", "unshare", "ip", "iptables", "dnsmasq", "mount"}

// cniPlugins are the CNI plugins the node's network uses (Debian's containernetworking-plugins).
var cniPlugins = []string{"bridge", "host-local", "loopback", "portmap"}

const cniBinDir = "/usr/lib/cni"

// RequireNode reports what is missing to run a node here: root, the commands, the CNI
// plugins, cgroup v1 hierarchies, and the kubelet binaries in binDir.
func RequireNode(binDir string) error {
	if os.Geteuid() != 0 {
		return errors.New("a node needs root (network and mount namespaces, cgroups, containerd)")
	}
	var missing []string
	for _, c := range NodeCommands {
		if _, err := exec.LookPath(c); err != nil {
			missing = append(missing, c)
		}
	}
	for _, p := range cniPlugins {
		if _, err := os.Stat(filepath.Join(cniBinDir, p)); err != nil {
			missing = append(missing, cniBinDir+"/"+p)
		}
	}
	for _, b := range []string{"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy"} {
		if !isExecutable(filepath.Join(binDir, b)) {
			missing = append(missing, filepath.Join(binDir, b)+" (scripts/k8s-bins.sh)")
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("missing: %s (scripts/deps.sh installs the packages)", strings.Join(missing, ", "))
	}
	return nil
}

// StartNode starts the node and waits until it is Ready, its "default" ServiceAccount
// exists and kube-proxy has programmed the kubernetes Service. On error nothing is left.
func StartNode(ctx context.Context, opts NodeOptions) (_ *Node, err error) {
	binDir := opts.BinDir
	if binDir == "" {
		binDir = os.Getenv("KUBE_BIN_DIR")
	}
	if err := RequireNode(binDir); err != nil {
		return nil, fmt.Errorf("kubelab: %w", err)
	}
	if opts.SandboxImage == "" {
		return nil, errors.New("kubelab: NodeOptions.SandboxImage is empty: the node pulls nothing, so the pause image must be one of Images")
	}
	cleanStaleNodes()
	// One node per test process: its work dir, namespace and cgroups are named after the
	// process, so a later run can tell a killed run's leftovers (cleanStaleNodes). Short:
	// unix socket paths under the dir must stay below 108 bytes.
	name := "egnode-" + strconv.Itoa(os.Getpid())
	dir := filepath.Join("/tmp", name)
	if err := os.Mkdir(dir, 0o700); err != nil {
		return nil, fmt.Errorf("kubelab: %w (one node per process)", err)
	}
	n := &Node{
		Cluster:    &Cluster{opts: Options{BinDir: binDir, Output: opts.Output}, binDir: binDir, dir: dir},
		cgroupName: name,
		dns:        map[string][]string{},
	}
	defer func() {
		if err != nil {
			n.Stop()
		}
	}()
	if n.NS, err = netlab.NewNS(ctx, name); err != nil {
		return nil, err
	}
	for _, a := range []string{NodeIP, NodeDNSIP} {
		if _, err := n.NS.Run(ctx, "ip", "addr", "add", a+"/32", "dev", "lo"); err != nil {
			return nil, err
		}
	}
	// Forwarding between the pod bridge and the node's addresses (ClusterIPs DNATed to pods),
	// and bridged pod-to-pod replies through conntrack, as kube-proxy expects.
	for _, s := range []string{"net.ipv4.ip_forward=1", "net.bridge.bridge-nf-call-iptables=1"} {
		if _, err := n.NS.Run(ctx, "sysctl", "-qw", s); err != nil {
			return nil, err
		}
	}
	if err := n.writeNodeFiles(opts); err != nil {
		return nil, fmt.Errorf("kubelab: node files: %w", err)
	}
	if err := n.makeCgroups(); err != nil {
		return nil, fmt.Errorf("kubelab: cgroups: %w", err)
	}
	if err := n.startContainerd(ctx); err != nil {
		return nil, err
	}
	for _, img := range opts.Images {
		if out, err := exec.CommandContext(ctx, "ctr", "--address", n.sock(), "-n", "k8s.io", "images", "import", img).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("kubelab: importing %s: %v: %s", img, err, out)
		}
	}
	if err := n.startDNS(); err != nil {
		return nil, err
	}
	n.wrap = []string{"nsenter", "-t", strconv.Itoa(n.containerd.cmd.Process.Pid), "-m", "-n", "--"}
	if err := n.startControlPlane(ctx); err != nil {
		return nil, err
	}
	return n, nil
}

func (n *Node) sock() string { return filepath.Join(n.dir, "containerd", "containerd.sock") }

// writeNodeFiles writes the PKI, the kubeconfigs, containerd's and the kubelet's
// configuration, the CNI network and the fake kernel tunables.
func (n *Node) writeNodeFiles(opts NodeOptions) error {
	var err error
	if n.ca, err = newCA(); err != nil {
		return err
	}
	d := n.dir
	hosts := []string{"127.0.0.1", NodeIP, "198.18.120.1", "localhost", "kubernetes", "kubernetes.default",
		"kubernetes.default.svc", "kubernetes.default.svc.cluster.local"}
	srvCert, srvKey, err := n.ca.issue("kube-apiserver", nil, hosts, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth})
	if err != nil {
		return err
	}
	client := []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	if n.adminCertPEM, n.adminKeyPEM, err = n.ca.issue("admin", []string{"system:masters"}, nil, client); err != nil {
		return err
	}
	kubeletCert, kubeletKey, err := n.ca.issue("system:node:"+NodeName, []string{"system:nodes"}, nil, client)
	if err != nil {
		return err
	}
	proxyCert, proxyKey, err := n.ca.issue("system:kube-proxy", []string{"system:node-proxier"}, nil, client)
	if err != nil {
		return err
	}
	apiKubeletCert, apiKubeletKey, err := n.ca.issue("kube-apiserver-kubelet-client", []string{"system:masters"}, nil, client)
	if err != nil {
		return err
	}
	saKey, saPub, err := newSAKeyPair()
	if err != nil {
		return err
	}
	inside := fmt.Sprintf("https://127.0.0.1:%d", apiPort)
	pki := filepath.Join(d, "pki")
	n.saKeyPath = filepath.Join(pki, "sa.key")
	for _, sub := range []string{"pki", "containerd", "cni/net.d", "cni/ipam", "kubelet", "pod-logs", "fakesys"} {
		if err := os.MkdirAll(filepath.Join(d, sub), 0o755); err != nil {
			return err
		}
	}
	if err := writeFiles(pki, map[string][]byte{
		"ca.crt": n.ca.certPEM, "apiserver.crt": srvCert, "apiserver.key": srvKey,
		"apiserver-kubelet-client.crt": apiKubeletCert, "apiserver-kubelet-client.key": apiKubeletKey,
		"sa.key": saKey, "sa.pub": saPub,
	}); err != nil {
		return err
	}
	files := map[string]string{
		"admin-inside.kubeconfig": kubeconfigYAML(inside, n.ca.certPEM, n.adminCertPEM, n.adminKeyPEM),
		"kubelet.kubeconfig":      kubeconfigYAML(inside, n.ca.certPEM, kubeletCert, kubeletKey),
		"kube-proxy.kubeconfig":   kubeconfigYAML(inside, n.ca.certPEM, proxyCert, proxyKey),
		"containerd/config.toml":  n.containerdConfig(opts.SandboxImage),
		"kubelet/config.yaml":     n.kubeletConfig(),
		"resolv.conf":             "nameserver " + NodeDNSIP + "\n",
		"cni/net.d/10-egnode.conflist": fmt.Sprintf(`{"cniVersion":"1.0.0","name":"egnode","plugins":[
 {"type":"bridge","bridge":"egbr0","isGateway":true,"ipMasq":false,"hairpinMode":true,
  "ipam":{"type":"host-local","ranges":[[{"subnet":%q,"gateway":%q}]],"routes":[{"dst":"0.0.0.0/0"}],"dataDir":%q}},
 {"type":"portmap","capabilities":{"portMappings":true}}]}
`, PodCIDR, PodGateway, filepath.Join(d, "cni", "ipam")),
		// The kubelet insists on these kernel tunables and would write them host-wide;
		// files with the values it wants are bind-mounted over them in the node's mount
		// namespace only (startContainerd).
		"fakesys/vm_overcommit_memory": "1\n",
		"fakesys/vm_panic_on_oom":      "0\n",
		"fakesys/kernel_panic":         "10\n",
		"fakesys/kernel_panic_on_oops": "1\n",
		"dnsmasq.hosts":                "",
		"kube-proxy.yaml":              kubeProxyConfig(filepath.Join(d, "kube-proxy.kubeconfig")),
	}
	for name, body := range files {
		if err := os.WriteFile(filepath.Join(d, name), []byte(body), 0o600); err != nil {
			return err
		}
	}
	n.dnsHosts = filepath.Join(d, "dnsmasq.hosts")
	return nil
}

func (n *Node) containerdConfig(sandbox string) string {
	d := filepath.Join(n.dir, "containerd")
	return fmt.Sprintf(`version = 2
root = %[1]q
state = %[2]q
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = %[3]q
[ttrpc]
  address = "%[3]s.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = %[4]q
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %[5]q
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  disable_apparmor = true
  # Without CAP_SYS_RESOURCE (this sandbox) runc cannot lower oom_score_adj, and CRI gives
  # the pause container -998: every sandbox would fail to start.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %[6]q
    conf_dir = %[7]q
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
`, filepath.Join(d, "root"), filepath.Join(d, "state"), n.sock(), filepath.Join(d, "opt"), sandbox,
		cniBinDir, filepath.Join(n.dir, "cni", "net.d"))
}

func (n *Node) kubeletConfig() string {
	return fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: %[1]q}
authorization: {mode: Webhook}
containerRuntimeEndpoint: unix://%[2]s
cgroupDriver: cgroupfs
cgroupRoot: /%[3]s
failCgroupV1: false
failSwapOn: false
podLogsDir: %[4]q
resolvConf: %[5]q
clusterDNS: [%[6]q]
clusterDomain: cluster.local
healthzBindAddress: 127.0.0.1
healthzPort: 10248
port: 10250
readOnlyPort: 0
maxPods: 30
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%%", imagefs.available: "1%%", nodefs.inodesFree: "1%%"}
mergeDefaultEvictionSettings: false
protectKernelDefaults: false
rotateCertificates: false
serverTLSBootstrap: false
syncFrequency: 5s
fileCheckFrequency: 10s
nodeStatusUpdateFrequency: 5s
shutdownGracePeriod: 0s
`, filepath.Join(n.dir, "pki", "ca.crt"), n.sock(), n.cgroupName, filepath.Join(n.dir, "pod-logs"),
		filepath.Join(n.dir, "resolv.conf"), NodeDNSIP)
}

func kubeProxyConfig(kubeconfig string) string {
	return fmt.Sprintf(`apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: %q}
hostnameOverride: %s
mode: iptables
clusterCIDR: %s
bindAddress: %s
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# 0: leave the host-wide conntrack table size and timeouts alone.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
`, kubeconfig, NodeName, PodCIDR, NodeIP)
}

// makeCgroups creates the kubelet's cgroup root in every v1 hierarchy (the machine has
// hybrid cgroups: v1 controllers, an empty v2). cpuset needs its cpus and mems before a
// child can hold a task.
func (n *Node) makeCgroups() error {
	hs, err := os.ReadDir("/sys/fs/cgroup")
	if err != nil {
		return err
	}
	for _, h := range hs {
		if !h.IsDir() || h.Name() == "unified" {
			continue
		}
		p := filepath.Join("/sys/fs/cgroup", h.Name(), n.cgroupName)
		if err := os.Mkdir(p, 0o755); err != nil && !os.IsExist(err) {
			return err
		}
		if h.Name() == "cpuset" {
			for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
				b, err := os.ReadFile(filepath.Join("/sys/fs/cgroup/cpuset", f))
				if err != nil {
					return err
				}
				if err := os.WriteFile(filepath.Join(p, f), b, 0o644); err != nil {
					return fmt.Errorf("%s: %w", filepath.Join(p, f), err)
				}
			}
		}
	}
	return nil
}

// startContainerd starts containerd in the node's network namespace and a new mount
// namespace (slave: the host's mounts come in, the node's never go out). Directories that
// containerd 1.6 and the kubelet use whatever their configuration says get a tmpfs of
// their own there, so nothing of the node is left on the host.
func (n *Node) startContainerd(ctx context.Context) error {
	var mounts []string
	for _, p := range []string{"/run/containerd", "/var/lib/cni", "/var/lib/kubelet", "/var/log/containers", "/var/log/pods"} {
		if _, err := os.Stat(p); os.IsNotExist(err) {
			if err := os.MkdirAll(p, 0o755); err != nil {
				return err
			}
			n.madeDirs = append(n.madeDirs, p)
		}
		mounts = append(mounts, "mount -t tmpfs tmpfs "+p)
	}
	for _, f := range []string{"vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops"} {
		mounts = append(mounts, fmt.Sprintf("mount --bind %s /proc/sys/%s", filepath.Join(n.dir, "fakesys", strings.ReplaceAll(f, "/", "_")), f))
	}
	script := "set -e; " + strings.Join(mounts, "; ") + "; exec containerd --config " + filepath.Join(n.dir, "containerd", "config.toml")
	p, err := n.startCommand("containerd", "nsenter", "--net=/run/netns/"+n.NS.Name, "--",
		"unshare", "--mount", "--propagation", "slave", "--", "sh", "-c", script)
	if err != nil {
		return err
	}
	n.containerd = p
	deadline := time.Now().Add(30 * time.Second)
	for {
		if err := exec.CommandContext(ctx, "ctr", "--address", n.sock(), "version").Run(); err == nil {
			return nil
		}
		if p.exited() {
			return p.exitError()
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("kubelab: containerd not answering on %s; log tail:\n%s", n.sock(), p.tail(3000))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// startDNS runs the cluster DNS: dnsmasq on NodeDNSIP answering the names SetDNS gives it
// and NXDOMAIN for every other name (it has no upstream: nothing leaves the node).
func (n *Node) startDNS() error {
	cmd := exec.Command("ip", "netns", "exec", n.NS.Name, "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
		"--no-poll", "--bind-interfaces", "--listen-address="+NodeDNSIP, "--port=53", "--conf-file=/dev/null",
		"--user=root", "--group=root", "--pid-file="+filepath.Join(n.dir, "dnsmasq.pid"), "--log-facility=-",
		"--addn-hosts="+n.dnsHosts, "--local=/#/")
	f, err := os.Create(filepath.Join(n.dir, "dnsmasq.log"))
	if err != nil {
		return err
	}
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = sysProcAttr()
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("kubelab: starting dnsmasq: %w", err)
	}
	n.dnsmasq = cmd
	go func() { cmd.Wait(); f.Close() }()
	return nil
}

// SetDNS makes the cluster DNS answer name (as written: "svc.ns.svc" and its
// ".cluster.local" form are two names) with ips, replacing earlier records of name.
func (n *Node) SetDNS(name string, ips ...string) error {
	n.dnsMu.Lock()
	defer n.dnsMu.Unlock()
	n.dns[name] = ips
	var b strings.Builder
	for name, ips := range n.dns {
		for _, ip := range ips {
			fmt.Fprintf(&b, "%s %s\n", ip, name)
		}
	}
	if err := os.WriteFile(n.dnsHosts, []byte(b.String()), 0o644); err != nil {
		return err
	}
	// SIGHUP re-reads --addn-hosts and clears dnsmasq's cache. The pid file names the
	// daemon (ip netns exec execs it, so it is also cmd's process).
	if err := n.dnsmasq.Process.Signal(syscall.SIGHUP); err != nil {
		return fmt.Errorf("kubelab: reloading dnsmasq: %w", err)
	}
	// Answered once dnsmasq has read the file.
	r := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		return n.NS.Dial(network, NodeDNSIP+":53", time.Second)
	}}
	deadline := time.Now().Add(5 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		got, err := r.LookupHost(ctx, name+".")
		cancel()
		if err == nil && len(got) == len(ips) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("kubelab: cluster DNS does not answer %s with %v (got %v, %v)", name, ips, got, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// SetServiceDNS points "<svc>.<ns>.svc" and "<svc>.<ns>.svc.cluster.local" at the
// Service's ClusterIP, as a cluster DNS would.
func (n *Node) SetServiceDNS(ctx context.Context, ns, name string) error {
	svc, err := n.Client().CoreV1().Services(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return err
	}
	if err := n.SetDNS(name+"."+ns+".svc", svc.Spec.ClusterIP); err != nil {
		return err
	}
	return n.SetDNS(name+"."+ns+".svc.cluster.local", svc.Spec.ClusterIP)
}

func (n *Node) startControlPlane(ctx context.Context) error {
	d := n.dir
	pki := filepath.Join(d, "pki")
	etcdURL := "http://127.0.0.1:2379"
	inside := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return n.NS.Dial(network, addr, 5*time.Second)
		}}}
	etcd, err := n.startProc("etcd", "--name=default", "--data-dir="+filepath.Join(d, "etcd-data"),
		"--listen-client-urls="+etcdURL, "--advertise-client-urls="+etcdURL,
		"--listen-peer-urls=http://127.0.0.1:2380", "--initial-advertise-peer-urls=http://127.0.0.1:2380",
		"--initial-cluster=default=http://127.0.0.1:2380", "--unsafe-no-fsync", "--log-level=warn")
	if err != nil {
		return err
	}
	if err := waitHTTP(ctx, etcd, inside, etcdURL+"/health", func(b []byte) bool {
		return bytes.Contains(b, []byte(`"health":"true"`))
	}); err != nil {
		return err
	}
	n.issuer = "https://kubernetes.default.svc"
	api, err := n.startProc("kube-apiserver",
		"--etcd-servers="+etcdURL, "--bind-address=0.0.0.0", "--advertise-address="+NodeIP,
		fmt.Sprintf("--secure-port=%d", apiPort),
		"--tls-cert-file="+filepath.Join(pki, "apiserver.crt"), "--tls-private-key-file="+filepath.Join(pki, "apiserver.key"),
		"--client-ca-file="+filepath.Join(pki, "ca.crt"),
		"--kubelet-client-certificate="+filepath.Join(pki, "apiserver-kubelet-client.crt"),
		"--kubelet-client-key="+filepath.Join(pki, "apiserver-kubelet-client.key"),
		// The apiserver would resolve the node's name through DNS for logs and exec.
		"--kubelet-preferred-address-types=InternalIP",
		"--service-account-issuer="+n.issuer, "--service-account-key-file="+filepath.Join(pki, "sa.pub"),
		"--service-account-signing-key-file="+n.saKeyPath, "--api-audiences="+n.issuer,
		"--service-cluster-ip-range="+NodeSvcCIDR, "--authorization-mode=Node,RBAC",
		"--enable-admission-plugins=NodeRestriction", "--allow-privileged=true",
		// Webhooks served by pods are dialed at their endpoints (pod IPs) rather than
		// the ClusterIP, as a cluster whose apiserver is off the service network does.
		"--enable-aggregator-routing=true",
		"--cert-dir="+filepath.Join(d, "apiserver-certs"), "--profiling=false")
	if err != nil {
		return err
	}

	// The test's clients reach the apiserver through a forwarder on the host's loopback.
	if n.fwd, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
		return err
	}
	go n.forward()
	n.url = "https://" + n.fwd.Addr().String()
	n.kubeconfig = filepath.Join(d, "admin.kubeconfig")
	if err := os.WriteFile(n.kubeconfig, []byte(kubeconfigYAML(n.url, n.ca.certPEM, n.adminCertPEM, n.adminKeyPEM)), 0o600); err != nil {
		return err
	}
	hc, err := n.adminHTTPClient()
	if err != nil {
		return err
	}
	if err := waitHTTP(ctx, api, hc, n.url+"/readyz", func(b []byte) bool { return string(bytes.TrimSpace(b)) == "ok" }); err != nil {
		return err
	}

	admin := filepath.Join(d, "admin-inside.kubeconfig")
	if _, err := n.startProc("kube-controller-manager", "--kubeconfig="+admin, "--leader-elect=false",
		"--bind-address=127.0.0.1", "--root-ca-file="+filepath.Join(pki, "ca.crt"),
		"--service-account-private-key-file="+n.saKeyPath, "--use-service-account-credentials=false",
		"--concurrent-namespace-syncs=2"); err != nil {
		return err
	}
	if _, err := n.startProc("kube-scheduler", "--kubeconfig="+admin, "--leader-elect=false", "--bind-address=127.0.0.1"); err != nil {
		return err
	}
	kubelet, err := n.startProc("kubelet", "--config="+filepath.Join(d, "kubelet", "config.yaml"),
		"--kubeconfig="+filepath.Join(d, "kubelet.kubeconfig"), "--root-dir="+filepath.Join(d, "kubelet"),
		"--cert-dir="+filepath.Join(d, "kubelet", "pki"), "--hostname-override="+NodeName, "--node-ip="+NodeIP)
	if err != nil {
		return err
	}
	if _, err := n.startProc("kube-proxy", "--config="+filepath.Join(d, "kube-proxy.yaml")); err != nil {
		return err
	}
	return n.waitNodeReady(ctx, kubelet)
}

// waitNodeReady waits for the node's Ready condition, the default ServiceAccount (the
// controller manager is up) and kube-proxy's rules for the kubernetes Service.
func (n *Node) waitNodeReady(ctx context.Context, kubelet *proc) error {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	c := n.Client()
	var last string
	for {
		ok := true
		node, err := c.CoreV1().Nodes().Get(ctx, NodeName, metav1.GetOptions{})
		if err != nil {
			ok, last = false, "node: "+err.Error()
		} else if !nodeReady(node) {
			ok, last = false, "node not Ready yet"
		}
		if ok {
			if _, err := c.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{}); err != nil {
				ok, last = false, "default ServiceAccount: "+err.Error()
			}
		}
		if ok {
			out, err := n.NS.Run(ctx, "iptables", "-t", "nat", "-S", "KUBE-SERVICES")
			if err != nil || !strings.Contains(out, "default/kubernetes:https") {
				ok, last = false, "kube-proxy has not programmed default/kubernetes yet"
			}
		}
		if ok {
			return nil
		}
		select {
		case <-kubelet.done:
			return kubelet.exitError()
		case <-ctx.Done():
			return fmt.Errorf("kubelab: node not ready: %s\nkubelet log tail:\n%s", last, kubelet.tail(4000))
		case <-time.After(250 * time.Millisecond):
		}
	}
}

func nodeReady(node *corev1.Node) bool {
	for _, c := range node.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// forward relays the host-side listener to the apiserver inside the node's namespace.
func (n *Node) forward() {
	for {
		c, err := n.fwd.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			up, err := n.NS.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", apiPort), 5*time.Second)
			if err != nil {
				return
			}
			defer up.Close()
			go func() { io.Copy(up, c); up.(*net.TCPConn).CloseWrite() }()
			io.Copy(c, up)
		}()
	}
}

// Kubectl runs kubectl against the node and returns its combined output.
func (n *Node) Kubectl(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, filepath.Join(n.opts.BinDir, "kubectl"), append([]string{"--kubeconfig", n.kubeconfig}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// Stop deletes the pods (so their containers stop through the kubelet), then stops every
// process, containerd's shims and anything left in the node's cgroups, and removes the
// namespace, the cgroups, the mount points it made and its work dir. Safe to call twice.
func (n *Node) Stop() {
	n.nodeStop.Do(func() {
		if n.url != "" && n.containerd != nil && !n.containerd.exited() {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			n.Kubectl(ctx, "delete", "pods", "--all", "--all-namespaces", "--grace-period=2", "--timeout=50s", "--wait=true")
			cancel()
		}
		if n.fwd != nil {
			n.fwd.Close()
		}
		n.procsMu.Lock()
		procs := n.procs
		n.procsMu.Unlock()
		// Everything but containerd, newest first; containerd after its containers.
		for i := len(procs) - 1; i >= 0; i-- {
			if procs[i] != n.containerd {
				procs[i].kill()
			}
		}
		if n.containerd != nil {
			n.containerd.kill()
		}
		if n.dnsmasq != nil {
			n.dnsmasq.Process.Kill()
		}
		removeNode(n.cgroupName)
		for i := len(n.madeDirs) - 1; i >= 0; i-- {
			os.Remove(n.madeDirs[i])
		}
	})
}

// removeNode removes what a node called name leaves when its processes are gone or
// killed: containerd's shims (found by the socket path on their command line) and the
// containers they ran (the processes in the node's cgroups), the network namespace, the
// cgroups and the work dir. The node's mounts were all in its own mount namespace, which
// went with its last process.
func removeNode(name string) {
	dir := filepath.Join("/tmp", name)
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && bytes.Contains(cmdline, []byte("containerd-shim")) && bytes.Contains(cmdline, []byte(dir+"/")) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	filepath.WalkDir(filepath.Join("/sys/fs/cgroup/pids", name), func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || d.Name() != "cgroup.procs" {
			return nil
		}
		b, _ := os.ReadFile(p)
		for _, f := range strings.Fields(string(b)) {
			if pid, err := strconv.Atoi(f); err == nil {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		return nil
	})
	exec.Command("ip", "netns", "del", name).Run()
	// Deepest first, retrying briefly while the killed tasks leave.
	hs, _ := os.ReadDir("/sys/fs/cgroup")
	for attempt := 0; attempt < 20; attempt++ {
		left := false
		for _, h := range hs {
			var dirs []string
			filepath.WalkDir(filepath.Join("/sys/fs/cgroup", h.Name(), name), func(p string, d os.DirEntry, err error) error {
				if err == nil && d.IsDir() {
					dirs = append(dirs, p)
				}
				return nil
			})
			for i := len(dirs) - 1; i >= 0; i-- {
				if err := syscall.Rmdir(dirs[i]); err != nil && !errors.Is(err, syscall.ENOENT) {
					left = true
				}
			}
		}
		if !left {
			break
		}
		time.Sleep(250 * time.Millisecond)
	}
	os.RemoveAll(dir)
}

// cleanStaleNodes removes the leftovers of nodes whose test process is gone (a run killed
// by go test's timeout never reaches Stop).
func cleanStaleNodes() {
	seen := map[string]bool{}
	dirs, _ := filepath.Glob("/tmp/egnode-*")
	nss, _ := filepath.Glob("/run/netns/egnode-*")
	for _, p := range append(dirs, nss...) {
		name := filepath.Base(p)
		pid, err := strconv.Atoi(strings.TrimPrefix(name, "egnode-"))
		if err != nil || seen[name] || pid == os.Getpid() {
			continue
		}
		seen[name] = true
		if syscall.Kill(pid, 0) == syscall.ESRCH {
			removeNode(name)
		}
	}
}
