#!/usr/bin/env bash
# Builds the Kubernetes binaries used by internal/kubelab tests (etcd,
# kube-apiserver, kubectl, kube-controller-manager, kube-scheduler, kubelet,
# kube-proxy) from the nested
# module tools/k8s, once, into a cache outside the clone:
#
#   ${EGRESS_GUARD_CACHE:-$HOME/.cache/egress-guard}/k8s-v1.37.2/
#
# Prints that directory on stdout (progress goes to stderr). When all the
# binaries are already there it exits at once, without invoking go.
# A cold build takes about 12-15 minutes on a quiet 2-core machine and needs about 6 GB of
# GOCACHE + GOMODCACHE; only the ~330 MB of binaries are kept in the cache.
#
# Usage: export KUBE_BIN_DIR=$(scripts/k8s-bins.sh)
set -euo pipefail

K8S_VERSION=v1.37.2
K8S_MINOR=37
BINS=(etcd kube-apiserver kubectl kube-controller-manager kube-scheduler kubelet kube-proxy)

. "$(dirname "${BASH_SOURCE[0]}")/lib/cachedir.sh"
dir="$cache_root/k8s-$K8S_VERSION"

have_all() {
  local b
  for b in "${BINS[@]}"; do
    [ -x "$dir/$b" ] || return 1
  done
}

if have_all; then
  echo "$dir"
  exit 0
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tools="$here/../tools/k8s"
[ -f "$tools/go.mod" ] || { echo "k8s-bins: $tools/go.mod not found" >&2; exit 1; }

cache_lock "k8s-$K8S_VERSION"
if have_all; then # someone else finished while we waited
  echo "$dir"
  exit 0
fi

cache_tmp "k8s-$K8S_VERSION"
tmp=$cache_tmpdir

ldf="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldf="$ldf -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$K8S_MINOR"
  ldf="$ldf -X $pkg.gitTreeState=clean"
done

echo "k8s-bins: building ${BINS[*]} $K8S_VERSION into $dir (cold: about 12-15 min)..." >&2
start=$(date +%s)
(
  cd "$tools"
  GOWORK=off GOFLAGS="-mod=readonly -buildvcs=false" go build -trimpath -ldflags "$ldf" -o "$tmp/" \
    go.etcd.io/etcd/server/v3 \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kubectl \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kubelet \
    k8s.io/kubernetes/cmd/kube-proxy
) >&2
mv "$tmp/server" "$tmp/etcd" # go names etcd's binary after its package path (.../server/v3)
for b in "${BINS[@]}"; do
  [ -x "$tmp/$b" ] || { echo "k8s-bins: $b missing after build" >&2; exit 1; }
done
echo "$K8S_VERSION" >"$tmp/VERSION"
cache_install "k8s-$K8S_VERSION" "$dir"
echo "k8s-bins: built in $(($(date +%s) - start)) s" >&2
echo "$dir"
