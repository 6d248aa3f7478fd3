#!/usr/bin/env bash
# The main job: builds egress-guard, egress-guard-init and the demo (cmd/egress-guard-demo,
# which plays it with internal/demo on the lab of internal/netlab), then plays a pod whose
# egress is captured and decided (transparent flow) next to the gateway (explicit proxy), on
# examples/demo-policy.yaml, and prints what happened. Needs root (network namespaces,
# iptables); installs the Debian packages it uses. Everything it creates is removed at the
# end, also on Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
mkdir -p bin
go build -o bin/egress-guard ./cmd/egress-guard
go build -o bin/egress-guard-init ./cmd/egress-guard-init
go build -o bin/egress-guard-demo ./cmd/egress-guard-demo
# The sidecar runs as an unprivileged user and must read its binary and policy.
policy_dir=$(mktemp -d /tmp/egress-guard-demo.XXXXXX)
trap 'rm -rf "$policy_dir"' EXIT
chmod 755 "$policy_dir" bin
cp examples/demo-policy.yaml "$policy_dir/policy.yaml"
chmod 644 "$policy_dir/policy.yaml"
bin/egress-guard-demo --egress-guard "$PWD/bin/egress-guard" --init "$PWD/bin/egress-guard-init" --policy "$policy_dir/policy.yaml"
