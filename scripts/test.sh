#!/usr/bin/env bash
# The whole test suite: formatting, vet, unit tests (fuzz seed corpora included), and the
# end-to-end tests in e2e/ (network namespaces, iptables, dnsmasq, curl; they need root and
# fail rather than skip when CI=true).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh

echo "== gofmt"
unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go' -not -path './.cache/*'))
if [ -n "$unformatted" ]; then echo "gofmt needed:"; echo "$unformatted"; exit 1; fi
echo "== go vet"
go vet ./...
echo "== go mod tidy"
if ! go mod tidy -diff; then echo "go.mod/go.sum are not tidy: run go mod tidy"; exit 1; fi
echo "== Kubernetes binaries and helm (built once into a cache outside the clone)"
start=$(date +%s)
KUBE_BIN_DIR=$(scripts/k8s-bins.sh)
HELM_BIN=$(scripts/helm-bin.sh)
export KUBE_BIN_DIR HELM_BIN
echo "$KUBE_BIN_DIR, $HELM_BIN ($(( $(date +%s) - start ))s)"
echo "== container images (buildah, no Docker; cached outside the clone, rebuilt when the sources change)"
if [ "$(id -u)" = 0 ] || [ "${CI:-}" = true ]; then
  start=$(date +%s)
  EGRESS_GUARD_IMAGES=$(scripts/images.sh)
  export EGRESS_GUARD_IMAGES
  echo "$EGRESS_GUARD_IMAGES ($(( $(date +%s) - start ))s)"
else
  echo "skipped: buildah needs root (the image tests skip too)"
fi
echo "== unit tests (every package but e2e/)"
mapfile -t unit < <(go list ./... | grep -v -E '/e2e(/|$)')
go test -count=1 -race "${unit[@]}"
echo "== e2e tests (e2e/...)"
log=$(mktemp /tmp/egress-guard-e2e.XXXXXX.log)
if ! go test -count=1 -timeout 25m -v ./e2e/... >"$log" 2>&1; then
  grep -vE '^=== (RUN|PAUSE|CONT)' "$log" | tail -150
  echo "e2e failed; full log: $log"
  exit 1
fi
# One line per test (with skips and their reasons), then go test's own summary.
grep -E '^\s*--- (PASS|SKIP|FAIL)|^(ok|FAIL)\s' "$log"
grep -A2 -E '^\s*--- SKIP' "$log" | grep -E '_test.go' || true
