// Package inject is the pod mutation of the admission webhook, as a pure function: a pod and
// its namespace's labels in, the injected pod (or a refusal that says what to change) out.
// The webhook shell (webhook.go) turns the difference into a JSON patch.
//
// What is injected: the capture init container (root, NET_ADMIN and NET_RAW only), the sidecar
// as a native sidecar (an init container with restartPolicy Always and a startup probe, so
// apps start after the proxy listens and Jobs complete) or, for API servers before 1.29, a
// classic container, and a projected ServiceAccount token (audience egress-guard) mounted into
// the sidecar only. Every setting comes from platform configuration (Config), never from the
// workload's annotations: a workload cannot exclude itself from capture.
package inject

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/netip"
	"reflect"
	"slices"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/egress-guard/egress-guard/pkg/contract"
)

// Opt-in and record keeping.
const (
	// AnnotationInject on a pod (template): "true" opts in, "false" opts out of a namespace
	// labelled "enabled".
	AnnotationInject = "egress-guard.io/inject"
	// LabelInject on a namespace: "enabled" injects every pod that does not opt out;
	// "enforced" injects every pod, whatever its annotation says (the namespace's label is
	// the platform's, the pod's annotation the workload's).
	LabelInject = "egress-guard.io/inject"
	// AnnotationStatus records what was injected (version and a hash of it).
	AnnotationStatus = "egress-guard.io/status"
	// LabelPodSecurity is the Pod Security admission label that would reject the init
	// container.
	LabelPodSecurity = "pod-security.kubernetes.io/enforce"
	tokenVolume      = "egress-guard-token"
)

// Config is the platform's configuration of what is injected (chart values).
type Config struct {
	Version         string
	SidecarImage    string
	InitImage       string
	ControlPlaneURL string
	ControlPlaneCA  string // PEM of the CA the control plane's certificate chains to
	ProxyUID        int64
	ProxyGID        int64
	RedirectPort    uint16
	ExcludeCIDRs    []netip.Prefix
	ExcludePorts    []uint16
	UDPPolicy       string // drop, reject or allow
	NativeSidecar   bool   // API server 1.29 or later
	TokenSeconds    int64  // projected token lifetime (default 3600)
	Resources       corev1.ResourceRequirements
	// GoMaxProcs is the sidecar's GOMAXPROCS; 0 leaves the Go runtime's default, which is
	// every CPU of the node when the container has no CPU limit (and never less than 2).
	GoMaxProcs int
	// RequireFixedUser refuses app containers that could become the proxy's UID, whose
	// traffic the capture exempts: each must run as an explicit UID other than root (the
	// image's USER could be the proxy's, and root may setuid to it) with
	// allowPrivilegeEscalation false (a setuid program could make it the proxy's). Off by
	// default: most images run as root or set their user in the image.
	RequireFixedUser bool
}

// Refusal is a pod the injector will not admit, with what to change.
type Refusal struct{ Reasons []string }

// add is a reason, formatted.
func (r *Refusal) add(format string, args ...any) {
	r.Reasons = append(r.Reasons, fmt.Sprintf(format, args...))
}

// orNil is r as an error when it has a reason, else nil.
func (r *Refusal) orNil() error {
	if len(r.Reasons) == 0 {
		return nil
	}
	return r
}

func (r *Refusal) Error() string {
	return "egress-guard refuses this pod: " + strings.Join(r.Reasons, "; ")
}

// Wanted reports whether a pod is to be injected: always in an "enforced" namespace, else its
// annotation decides, else its namespace's label.
func Wanted(pod *corev1.Pod, namespaceLabels map[string]string) bool {
	if namespaceLabels[LabelInject] == "enforced" {
		return true
	}
	switch pod.Annotations[AnnotationInject] {
	case "true":
		return true
	case "false":
		return false
	}
	return namespaceLabels[LabelInject] == "enabled"
}

// Mutate returns the pod with egress-guard injected. It never changes its argument. A pod that
// does not want injection, or that already carries exactly this injection, is returned as is.
//
// A pod may arrive with the status record already on it: a re-invocation after later webhooks
// changed it, a copy of an injected pod (kubectl debug --copy-to), or a forgery, a record and
// an init container named like ours that is not ours, written by a workload to skip capture.
// The pod cannot tell them apart, so it is never trusted: whatever carries our names is
// replaced by what this configuration injects, and every other container is checked like any
// pod's, including those a later webhook added.
func Mutate(pod *corev1.Pod, namespaceLabels map[string]string, cfg Config) (*corev1.Pod, error) {
	if !Wanted(pod, namespaceLabels) {
		return pod, nil
	}
	base := pod
	if _, ok := pod.Annotations[AnnotationStatus]; ok {
		base = withoutInjection(pod)
	}
	if err := check(base, namespaceLabels, cfg); err != nil {
		return nil, err
	}
	out := inject(base, cfg)
	if reflect.DeepEqual(out, pod) {
		return pod, nil
	}
	return out, nil
}

// withoutInjection is a copy of the pod without what egress-guard injects: its containers, its
// token volume and its status record.
func withoutInjection(pod *corev1.Pod) *corev1.Pod {
	out := pod.DeepCopy()
	ours := func(c corev1.Container) bool {
		return c.Name == contract.InitContainer || c.Name == contract.SidecarContainer
	}
	out.Spec.InitContainers = slices.DeleteFunc(out.Spec.InitContainers, ours)
	out.Spec.Containers = slices.DeleteFunc(out.Spec.Containers, ours)
	out.Spec.Volumes = slices.DeleteFunc(out.Spec.Volumes, func(v corev1.Volume) bool { return v.Name == tokenVolume })
	delete(out.Annotations, AnnotationStatus)
	return out
}

// inject adds egress-guard to a copy of a pod that has passed check.
func inject(pod *corev1.Pod, cfg Config) *corev1.Pod {
	out := pod.DeepCopy()
	initC, sidecar := cfg.initContainer(), cfg.sidecar()
	if cfg.NativeSidecar {
		always := corev1.ContainerRestartPolicyAlways
		sidecar.RestartPolicy = &always
		// Capture first, then the proxy; the app's own init containers run after both, so
		// their egress is captured and served too.
		out.Spec.InitContainers = append([]corev1.Container{initC, sidecar}, out.Spec.InitContainers...)
	} else {
		out.Spec.InitContainers = append([]corev1.Container{initC}, out.Spec.InitContainers...)
		out.Spec.Containers = append([]corev1.Container{sidecar}, out.Spec.Containers...)
	}
	seconds := cfg.TokenSeconds
	if seconds == 0 {
		seconds = 3600
	}
	out.Spec.Volumes = append(out.Spec.Volumes, corev1.Volume{
		Name: tokenVolume,
		VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{
			Sources: []corev1.VolumeProjection{{ServiceAccountToken: &corev1.ServiceAccountTokenProjection{
				Audience: contract.TokenAudience, ExpirationSeconds: &seconds, Path: contract.TokenFile,
			}}},
		}},
	})
	if out.Annotations == nil {
		out.Annotations = map[string]string{}
	}
	out.Annotations[AnnotationStatus] = cfg.status(initC, sidecar)
	return out
}

// check refuses the pods that would bypass capture, each reason saying what to change.
func check(pod *corev1.Pod, nsLabels map[string]string, cfg Config) error {
	r := &Refusal{}
	add := r.add
	if level := nsLabels[LabelPodSecurity]; level == "baseline" || level == "restricted" {
		add("namespace %q enforces Pod Security %q (label %s), which rejects the capture init container's NET_ADMIN and NET_RAW: "+
			"label the namespace %s=privileged, or opt this pod out with the annotation %s: \"false\" and send its egress through the gateway",
			pod.Namespace, level, LabelPodSecurity, LabelPodSecurity, AnnotationInject)
	}
	if dc := pod.Spec.DNSConfig; dc != nil && len(dc.Nameservers) > 0 {
		// The capture lets DNS through to the pod's resolvers, read from its resolv.conf:
		// resolvers the pod names itself would be a way out on port 53 to any host it likes.
		add("dnsConfig.nameservers (%s) would be exempt from capture as the pod's DNS servers: remove them and use the cluster DNS",
			strings.Join(dc.Nameservers, ", "))
	}
	if pod.Spec.HostNetwork {
		add("hostNetwork: true shares the node's network namespace, where capture rules would apply to the node: run the pod without hostNetwork, or opt it out")
	}
	if sc := pod.Spec.SecurityContext; sc != nil {
		if sc.RunAsUser != nil && *sc.RunAsUser == cfg.ProxyUID {
			add("the pod's securityContext.runAsUser is %d, the proxy's UID, whose traffic is not captured: choose another UID", cfg.ProxyUID)
		}
		if sc.RunAsGroup != nil && *sc.RunAsGroup == cfg.ProxyGID {
			add("the pod's securityContext.runAsGroup is %d, the proxy's GID: choose another group", cfg.ProxyGID)
		}
		if sc.FSGroup != nil && *sc.FSGroup == cfg.ProxyGID {
			add("the pod's securityContext.fsGroup is %d, the proxy's GID: choose another group", cfg.ProxyGID)
		}
		if slices.Contains(sc.SupplementalGroups, cfg.ProxyGID) {
			add("the pod's securityContext.supplementalGroups lists %d, the proxy's GID: remove it", cfg.ProxyGID)
		}
	}
	all := append(append([]corev1.Container{}, pod.Spec.InitContainers...), pod.Spec.Containers...)
	for _, c := range all {
		if c.Name == contract.SidecarContainer || c.Name == contract.InitContainer {
			add("container name %q is egress-guard's: rename the container", c.Name)
		}
		checkContainer(fmt.Sprintf("container %q", c.Name), pod.Spec.SecurityContext, c.SecurityContext, c.VolumeMounts, cfg, add)
	}
	return r.orNil()
}

// CheckEphemeral refuses ephemeral containers (kubectl debug) that would bypass the capture of
// a pod that has it, as check refuses app containers. The webhook sees them as an UPDATE of
// the pod's ephemeralcontainers subresource, never as a pod CREATE.
func CheckEphemeral(pod *corev1.Pod, cfg Config) error {
	r := &Refusal{}
	add := r.add
	for _, c := range pod.Spec.EphemeralContainers {
		checkContainer(fmt.Sprintf("ephemeral container %q", c.Name), pod.Spec.SecurityContext, c.SecurityContext, c.VolumeMounts, cfg, add)
	}
	return r.orNil()
}

// requireFixedUser adds the reasons a container could become the proxy's UID at run time (see
// Config.RequireFixedUser); the proxy's UID itself is checkContainer's.
func requireFixedUser(what string, pod *corev1.PodSecurityContext, sc *corev1.SecurityContext, add func(string, ...any)) {
	var uid *int64
	if pod != nil {
		uid = pod.RunAsUser
	}
	if sc != nil && sc.RunAsUser != nil {
		uid = sc.RunAsUser
	}
	switch {
	case uid == nil:
		add("%s has no runAsUser (nor has the pod): the image's user is unknown here and could be the proxy's, whose traffic is not captured: set runAsUser to a UID other than 0", what)
	case *uid == 0:
		add("%s runs as root, which can switch to the proxy's UID, whose traffic is not captured: set runAsUser to a UID other than 0", what)
	}
	if sc == nil || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		add("%s allows privilege escalation, with which a setuid program could make it the proxy's UID: set allowPrivilegeEscalation: false", what)
	}
}

// checkContainer adds the reasons a container would bypass capture or take the sidecar's
// token; what names the container in them, pod is the pod's security context.
func checkContainer(what string, pod *corev1.PodSecurityContext, sc *corev1.SecurityContext, mounts []corev1.VolumeMount, cfg Config, add func(string, ...any)) {
	for _, m := range mounts {
		if m.Name == tokenVolume {
			add("%s mounts the volume %q, the sidecar's token, which is injected for the sidecar alone: remove the mount", what, tokenVolume)
		}
	}
	if cfg.RequireFixedUser {
		requireFixedUser(what, pod, sc, add)
	}
	if sc == nil {
		return
	}
	if sc.RunAsUser != nil && *sc.RunAsUser == cfg.ProxyUID {
		add("%s runs as UID %d, the proxy's, whose traffic is not captured: choose another UID", what, cfg.ProxyUID)
	}
	if sc.RunAsGroup != nil && *sc.RunAsGroup == cfg.ProxyGID {
		add("%s runs with GID %d, the proxy's: choose another group", what, cfg.ProxyGID)
	}
	if sc.Privileged != nil && *sc.Privileged {
		add("%s is privileged and could remove the capture rules: drop privileged", what)
	}
	if sc.Capabilities != nil {
		for _, cap := range sc.Capabilities.Add {
			switch strings.TrimPrefix(strings.ToUpper(string(cap)), "CAP_") {
			case "NET_ADMIN", "NET_RAW", "ALL":
				add("%s adds capability %s, with which it could remove the capture rules or send raw packets: drop it", what, cap)
			}
		}
	}
}

func (cfg Config) initContainer() corev1.Container {
	args := []string{
		"--proxy-uid", strconv.FormatInt(cfg.ProxyUID, 10),
		"--redirect-port", strconv.Itoa(int(cfg.RedirectPort)),
		"--udp-policy", cfg.UDPPolicy,
	}
	if len(cfg.ExcludeCIDRs) > 0 {
		cidrs := make([]string, len(cfg.ExcludeCIDRs))
		for i, p := range cfg.ExcludeCIDRs {
			cidrs[i] = p.String()
		}
		args = append(args, "--exclude-cidrs", strings.Join(cidrs, ","))
	}
	if len(cfg.ExcludePorts) > 0 {
		ports := make([]string, len(cfg.ExcludePorts))
		for i, p := range cfg.ExcludePorts {
			ports[i] = strconv.Itoa(int(p))
		}
		args = append(args, "--exclude-ports", strings.Join(ports, ","))
	}
	root, no := int64(0), false
	return corev1.Container{
		Name:  contract.InitContainer,
		Image: cfg.InitImage,
		Args:  args,
		SecurityContext: &corev1.SecurityContext{
			RunAsUser:                &root,
			RunAsNonRoot:             &no,
			AllowPrivilegeEscalation: &no,
			Capabilities: &corev1.Capabilities{
				Add:  []corev1.Capability{"NET_ADMIN", "NET_RAW"},
				Drop: []corev1.Capability{"ALL"},
			},
		},
		Resources: corev1.ResourceRequirements{
			Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("10m"), corev1.ResourceMemory: resource.MustParse("16Mi")},
			Limits:   corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("64Mi")},
		},
	}
}

func (cfg Config) sidecar() corev1.Container {
	yes, no := true, false
	uid, gid := cfg.ProxyUID, cfg.ProxyGID
	ready := &corev1.Probe{
		ProbeHandler:     corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/ready", Port: intstr.FromInt32(contract.AdminPort)}},
		PeriodSeconds:    1,
		FailureThreshold: 60,
	}
	return corev1.Container{
		Name:  contract.SidecarContainer,
		Image: cfg.SidecarImage,
		Env: append([]corev1.EnvVar{
			{Name: contract.EnvMode, Value: contract.ModeSidecar},
			{Name: contract.EnvControlPlane, Value: cfg.ControlPlaneURL},
			{Name: contract.EnvControlCAPEM, Value: cfg.ControlPlaneCA},
			{Name: contract.EnvTokenPath, Value: contract.DefaultTokenPath},
		}, cfg.runtimeEnv()...),
		Ports:          []corev1.ContainerPort{{Name: "eg-metrics", ContainerPort: contract.AdminPort}},
		StartupProbe:   ready,
		ReadinessProbe: &corev1.Probe{ProbeHandler: ready.ProbeHandler, PeriodSeconds: 5},
		VolumeMounts:   []corev1.VolumeMount{{Name: tokenVolume, MountPath: contract.TokenDir, ReadOnly: true}},
		Resources:      cfg.Resources,
		SecurityContext: &corev1.SecurityContext{
			RunAsUser:                &uid,
			RunAsGroup:               &gid,
			RunAsNonRoot:             &yes,
			ReadOnlyRootFilesystem:   &yes,
			AllowPrivilegeEscalation: &no,
			Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
		},
	}
}

// runtimeEnv is the Go runtime's settings for the sidecar, from the platform's configuration:
//
//   - GOMAXPROCS: a sidecar serves one pod, and without a CPU limit the runtime would run a
//     scheduler slot per node CPU (and up to a quarter of them as GC workers). Every
//     connection is a few scheduler wake-ups; with one slot they need no hand-off between
//     threads: on the sequential CONNECT benchmark GOMAXPROCS=1 cost a quarter less CPU per
//     connection than 2, with the same bulk throughput.
//   - GOMEMLIMIT: 80 % of the memory limit, so that the GC works harder before the kernel's OOM
//     killer does (the chart sets the same for its own Deployments).
func (cfg Config) runtimeEnv() []corev1.EnvVar {
	var env []corev1.EnvVar
	if cfg.GoMaxProcs > 0 {
		env = append(env, corev1.EnvVar{Name: "GOMAXPROCS", Value: strconv.Itoa(cfg.GoMaxProcs)})
	}
	if mem, ok := cfg.Resources.Limits[corev1.ResourceMemory]; ok && mem.Value() > 0 {
		env = append(env, corev1.EnvVar{Name: "GOMEMLIMIT", Value: strconv.FormatInt(mem.Value()/10*8, 10)})
	}
	return env
}

// status is the status annotation: the version and a hash of what was injected, so that an
// operator can tell pods injected by different configurations apart.
func (cfg Config) status(cs ...corev1.Container) string {
	b, _ := json.Marshal(cs)
	sum := sha256.Sum256(b)
	s, _ := json.Marshal(map[string]string{"version": cfg.Version, "hash": hex.EncodeToString(sum[:8])})
	return string(s)
}
