package inject

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"reflect"

	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Path is where the API server sends AdmissionReviews.
const Path = "/inject"

// Namespaces returns a namespace's labels (the webhook reads them: opt-in, Pod Security).
type Namespaces func(ctx context.Context, name string) (map[string]string, error)

// Webhook is the AdmissionReview shell around Mutate.
type Webhook struct {
	Config     Config
	Namespaces Namespaces
	Log        *slog.Logger
}

// ServeHTTP answers one AdmissionReview (admission.k8s.io/v1).
func (h *Webhook) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		http.Error(w, "POST an AdmissionReview", http.StatusMethodNotAllowed)
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, 8<<20))
	if err != nil {
		http.Error(w, "reading the request", http.StatusBadRequest)
		return
	}
	var review admissionv1.AdmissionReview
	if err := json.Unmarshal(body, &review); err != nil || review.Request == nil {
		http.Error(w, "not an AdmissionReview", http.StatusBadRequest)
		return
	}
	resp := h.review(r.Context(), review.Request)
	resp.UID = review.Request.UID
	out := admissionv1.AdmissionReview{TypeMeta: review.TypeMeta, Response: resp}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(out)
}

func (h *Webhook) review(ctx context.Context, req *admissionv1.AdmissionRequest) *admissionv1.AdmissionResponse {
	deny := func(code int32, msg string) *admissionv1.AdmissionResponse {
		return &admissionv1.AdmissionResponse{Allowed: false, Result: &metav1.Status{Code: code, Message: msg, Reason: metav1.StatusReasonForbidden}}
	}
	ephemeral := req.Operation == admissionv1.Update && req.SubResource == "ephemeralcontainers"
	if req.Kind.Kind != "Pod" || !ephemeral && (req.Operation != admissionv1.Create || req.SubResource != "") {
		return &admissionv1.AdmissionResponse{Allowed: true}
	}
	var pod corev1.Pod
	if err := json.Unmarshal(req.Object.Raw, &pod); err != nil {
		return deny(http.StatusBadRequest, "egress-guard: the pod does not decode: "+err.Error())
	}
	if pod.Namespace == "" {
		pod.Namespace = req.Namespace
	}
	labels, err := h.Namespaces(ctx, req.Namespace)
	if err != nil {
		// failurePolicy Fail: without the namespace's labels the decision cannot be made.
		return deny(http.StatusInternalServerError, fmt.Sprintf("egress-guard: reading namespace %q: %v", req.Namespace, err))
	}
	if ephemeral {
		return h.reviewEphemeral(req, &pod, labels, deny)
	}
	out, err := Mutate(&pod, labels, h.Config)
	if err != nil {
		if h.Log != nil {
			h.Log.Info("pod refused", "namespace", req.Namespace, "pod", podName(&pod), "reason", err.Error())
		}
		return deny(http.StatusForbidden, err.Error())
	}
	if out == &pod {
		return &admissionv1.AdmissionResponse{Allowed: true}
	}
	patch, err := Diff(&pod, out)
	if err != nil {
		return deny(http.StatusInternalServerError, "egress-guard: building the patch: "+err.Error())
	}
	if h.Log != nil {
		h.Log.Info("pod injected", "namespace", req.Namespace, "pod", podName(&pod), "status", out.Annotations[AnnotationStatus])
	}
	pt := admissionv1.PatchTypeJSONPatch
	return &admissionv1.AdmissionResponse{Allowed: true, Patch: patch, PatchType: &pt}
}

// reviewEphemeral answers an UPDATE of a pod's ephemeral containers (kubectl debug): in a pod
// that wants capture, or has it, they must not bypass it. Nothing is injected into them.
func (h *Webhook) reviewEphemeral(req *admissionv1.AdmissionRequest, pod *corev1.Pod, labels map[string]string, deny func(int32, string) *admissionv1.AdmissionResponse) *admissionv1.AdmissionResponse {
	// The annotations can be edited on a running pod, so the status record counts too: a pod
	// that was injected keeps its capture whatever its opt-in says now.
	if _, injected := pod.Annotations[AnnotationStatus]; !injected && !Wanted(pod, labels) {
		return &admissionv1.AdmissionResponse{Allowed: true}
	}
	if err := CheckEphemeral(pod, h.Config); err != nil {
		if h.Log != nil {
			h.Log.Info("ephemeral container refused", "namespace", req.Namespace, "pod", podName(pod), "reason", err.Error())
		}
		return deny(http.StatusForbidden, err.Error())
	}
	return &admissionv1.AdmissionResponse{Allowed: true}
}

func podName(p *corev1.Pod) string {
	if p.Name != "" {
		return p.Name
	}
	return p.GenerateName + "*"
}

// Diff computes the JSON patch (RFC 6902) from one pod to another over the fields the
// injector changes, each replaced or added whole when it differs: the patch is derived from
// the two objects, never written by hand.
func Diff(from, to *corev1.Pod) ([]byte, error) {
	type op struct {
		Op    string `json:"op"`
		Path  string `json:"path"`
		Value any    `json:"value"`
	}
	var ops []op
	field := func(path string, a, b any, empty bool) {
		if reflect.DeepEqual(a, b) {
			return
		}
		kind := "replace"
		if empty {
			kind = "add"
		}
		ops = append(ops, op{Op: kind, Path: path, Value: b})
	}
	field("/metadata/annotations", from.Annotations, to.Annotations, from.Annotations == nil)
	field("/spec/initContainers", from.Spec.InitContainers, to.Spec.InitContainers, from.Spec.InitContainers == nil)
	field("/spec/containers", from.Spec.Containers, to.Spec.Containers, from.Spec.Containers == nil)
	field("/spec/volumes", from.Spec.Volumes, to.Spec.Volumes, from.Spec.Volumes == nil)
	return json.Marshal(ops)
}
