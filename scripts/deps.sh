#!/usr/bin/env bash
# Installs the Debian packages the e2e tests, the demo and the benchmarks use, when missing.
# Usage: scripts/deps.sh [extra packages...]
set -euo pipefail
pkgs=(iptables dnsmasq-base curl iproute2 ca-certificates "$@")
# A real single-node Kubernetes (kubelet on containerd) and the image builds (buildah, debootstrap).
pkgs+=(containerd runc containernetworking-plugins busybox-static buildah debootstrap)
# A JDK runs a real Java client in the e2e tests (source-file mode needs javac's modules).
command -v javac >/dev/null 2>&1 || pkgs+=(default-jdk-headless)
missing=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "deps: need root to install: ${missing[*]} (run as root, or apt-get install them)" >&2
  exit 1
fi
echo "deps: apt-get install ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
