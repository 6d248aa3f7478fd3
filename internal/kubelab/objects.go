package kubelab

import (
	"context"
	"fmt"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// opTimeout bounds each helper call below.
const opTimeout = 30 * time.Second

func opCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), opTimeout)
}

// CreateNamespace creates a namespace. Without the controller manager a
// deleted namespace never goes away, so use a fresh name per test.
func (c *Cluster) CreateNamespace(name string) (*corev1.Namespace, error) {
	ctx, cancel := opCtx()
	defer cancel()
	return c.Client().CoreV1().Namespaces().Create(ctx,
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
}

// CreateServiceAccount creates a ServiceAccount (without the controller
// manager not even "default" exists, and Pods that name a missing one are
// rejected by admission).
func (c *Cluster) CreateServiceAccount(ns, name string) (*corev1.ServiceAccount, error) {
	ctx, cancel := opCtx()
	defer cancel()
	return c.Client().CoreV1().ServiceAccounts(ns).Create(ctx,
		&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
}

// CreatePod creates a minimal Pod running as ServiceAccount sa ("" means
// "default", which must exist). No kubelet exists, so it stays Pending.
func (c *Cluster) CreatePod(ns, name, sa string) (*corev1.Pod, error) {
	ctx, cancel := opCtx()
	defer cancel()
	return c.Client().CoreV1().Pods(ns).Create(ctx, MinimalPod(ns, name, sa), metav1.CreateOptions{})
}

// MinimalPod returns the Pod CreatePod creates, for tests that want to change
// it first (labels, annotations, containers).
func MinimalPod(ns, name, sa string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{"app": name}},
		Spec: corev1.PodSpec{
			ServiceAccountName: sa,
			Containers: []corev1.Container{{
				Name:  "app",
				Image: "registry.invalid/kubelab/app:latest", // never pulled: there is no kubelet
			}},
		},
	}
}

// DeletePod deletes a Pod at once and waits until the apiserver no longer
// returns it. (An unscheduled Pod has no grace period.)
func (c *Cluster) DeletePod(ns, name string) error {
	ctx, cancel := opCtx()
	defer cancel()
	pods := c.Client().CoreV1().Pods(ns)
	zero := int64(0)
	if err := pods.Delete(ctx, name, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
		if apierrors.IsNotFound(err) {
			return nil
		}
		return err
	}
	for {
		_, err := pods.Get(ctx, name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("kubelab: pod %s/%s still exists: %w", ns, name, ctx.Err())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Token returns a ServiceAccount token from the TokenRequest API, like the
// kubelet's projected token volume. audience "" means the API audiences
// (the issuer); expiry 0 means one hour (the API's minimum is 10 minutes);
// boundPod, when set, binds the token to that Pod in ns: it carries the
// Pod's name and UID and stops authenticating once the Pod is deleted.
func (c *Cluster) Token(ns, sa, audience string, expiry time.Duration, boundPod string) (string, error) {
	ctx, cancel := opCtx()
	defer cancel()
	if expiry == 0 {
		expiry = time.Hour
	}
	secs := int64(expiry / time.Second)
	tr := &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: &secs}}
	if audience != "" {
		tr.Spec.Audiences = []string{audience}
	}
	if boundPod != "" {
		pod, err := c.Client().CoreV1().Pods(ns).Get(ctx, boundPod, metav1.GetOptions{})
		if err != nil {
			return "", err
		}
		tr.Spec.BoundObjectRef = &authenticationv1.BoundObjectReference{
			Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID,
		}
	}
	out, err := c.Client().CoreV1().ServiceAccounts(ns).CreateToken(ctx, sa, tr, metav1.CreateOptions{})
	if err != nil {
		return "", err
	}
	return out.Status.Token, nil
}

// ReviewToken asks the apiserver's TokenReview API about token, for the given
// audiences (none means the API audiences).
func (c *Cluster) ReviewToken(token string, audiences ...string) (*authenticationv1.TokenReviewStatus, error) {
	ctx, cancel := opCtx()
	defer cancel()
	out, err := c.Client().AuthenticationV1().TokenReviews().Create(ctx, &authenticationv1.TokenReview{
		Spec: authenticationv1.TokenReviewSpec{Token: token, Audiences: audiences},
	}, metav1.CreateOptions{})
	if err != nil {
		return nil, err
	}
	return &out.Status, nil
}
