#!/usr/bin/env bash
# Runs every fuzz target of the tree for FUZZTIME each (default 30s). Targets are discovered
# with `go test -list`, so a new one is never left out. New failing inputs land in the
# package's testdata/fuzz, where the normal test suite replays them.
set -euo pipefail
cd "$(dirname "$0")/.."
FUZZTIME=${FUZZTIME:-30s}
for pkg in $(go list ./... | grep -v -E '/e2e(/|$)'); do
  for target in $(go test -list '^Fuzz' "$pkg" | grep '^Fuzz' || true); do
    echo "== $pkg $target ($FUZZTIME)"
    go test -run '^$' -fuzz "^${target}\$" -fuzztime "$FUZZTIME" "$pkg"
  done
done
