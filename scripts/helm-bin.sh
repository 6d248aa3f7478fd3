#!/usr/bin/env bash
# Builds the Helm client used by internal/charttest (helm lint / template / install against a
# kubelab API server), once, into a cache outside the clone:
#
#   ${EGRESS_GUARD_CACHE:-$HOME/.cache/egress-guard}/helm-v4.3.1/helm
#
# Prints the binary's path on stdout (progress goes to stderr). When the binary is already
# there it exits at once, without invoking go. A cold build takes about 100 s on 2 cores and
# needs only the Go module proxy (helm.sh/helm/v4 is fetched as a module, not from GitHub).
#
# Usage: HELM=$(scripts/helm-bin.sh)
set -euo pipefail

HELM_VERSION=v4.3.1

. "$(dirname "${BASH_SOURCE[0]}")/lib/cachedir.sh"
dir="$cache_root/helm-$HELM_VERSION"
bin="$dir/helm"

if [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi

cache_lock "helm-$HELM_VERSION"
if [ -x "$bin" ]; then # someone else finished while we waited
  echo "$bin"
  exit 0
fi

cache_tmp "helm-$HELM_VERSION"
tmp=$cache_tmpdir

echo "helm-bin: building helm $HELM_VERSION into $dir (cold: about 100 s)..." >&2
start=$(date +%s)
# Outside any module (cd to the temp dir, GOWORK off): go install pkg@version resolves
# helm's own go.mod, not this repository's. GOBIN puts the binary in the temp dir.
(
  cd "$tmp"
  GOWORK=off GOBIN="$tmp" GOFLAGS="-trimpath -buildvcs=false" \
    go install -ldflags "-s -w" "helm.sh/helm/v4/cmd/helm@$HELM_VERSION"
) >&2
[ -x "$tmp/helm" ] || { echo "helm-bin: helm missing after build" >&2; exit 1; }
echo "$HELM_VERSION" >"$tmp/VERSION"
cache_install "helm-$HELM_VERSION" "$dir"
echo "helm-bin: built in $(($(date +%s) - start)) s" >&2
echo "$bin"
