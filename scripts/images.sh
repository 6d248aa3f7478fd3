#!/usr/bin/env bash
# Builds the container images of the real-cluster e2e, without Docker and without
# pulling anything, as docker-archive tarballs (for `ctr -n k8s.io images import`)
# into a cache outside the clone:
#
#   ${EGRESS_GUARD_CACHE:-$HOME/.cache/egress-guard}/images/
#     egress-guard.tar             localhost/egress-guard:dev             (Dockerfile.sidecar, unchanged)
#     egress-guard-controller.tar  localhost/egress-guard-controller:dev  (Dockerfile.controller, unchanged)
#     egress-guard-init.tar        localhost/egress-guard-init:dev        (Dockerfile.init, unchanged)
#     pause.tar                    localhost/egress-guard-e2e/pause:1     (internal/kubelab/pause)
#     curl.tar                     localhost/egress-guard-e2e/curl:1      (Debian + curl: the test app)
#
# Prints that directory on stdout (progress goes to stderr). Needs root, buildah and,
# the first time only, debootstrap and the Debian mirror apt uses.
#
# How: the Dockerfiles are built by `buildah bud --isolation chroot --pull=never` (chroot
# isolation: RUN steps use the host network, no CNI bridge is ever created) on locally made
# stand-ins for their FROM images, tagged with the exact names the Dockerfiles use:
#   docker.io/library/debian:bookworm-slim     debootstrap --variant=minbase rootfs (tarred
#                                              once into $CACHE/rootfs-bookworm.tar)
#   docker.io/library/golang:1.26-bookworm     that debian + the host's GOROOT, GOPROXY=off:
#                                              the host module and build caches are mounted in
#   gcr.io/distroless/static-debian12:nonroot  scratch + passwd/group (nonroot 65532), CA bundle
# Buildah's storage is private to the cache ($CACHE/buildah), never /var/lib/containers.
# Every image is keyed by a hash of its inputs (for the project images: the contents of
# `git ls-files -co --exclude-standard` but the tests, which is also exactly the build
# context, plus the Go version and the base images' keys), written beside its tarball as
# NAME.tar.key; an
# image whose key did not change is not rebuilt, and when nothing changed the script exits
# without invoking buildah. The project images are removed from the buildah storage once
# exported: the tarballs are the cache, the storage only keeps the base images.
#
# Measured on the 2-core project machine while other builds ran (load average 5-7):
#   cold, empty cache and a Go build cache cold for these flags: 8 min 14 s
#     (debootstrap 114 s, base images 27 s, Dockerfile.sidecar 296 s, of which most is the
#     first compile of egress-guard-controller, Dockerfile.init 40 s incl. apt-get, pause 2 s,
#     curl image 32 s incl. apt-get; measured when Dockerfile.sidecar still built both
#     binaries, which Dockerfile.sidecar and Dockerfile.controller now share between them)
#   empty cache but rootfs-bookworm.tar kept, Go build cache warm: 74 s
#   warm, nothing changed: 1.7-2.9 s (hashing the sources; buildah is not run)
#   warm, a source file changed (the three project images rebuilt, Go caches warm): 33-47 s
#     at load average 2 (50-82 s for the two images of then, at load 5-7)
#
# Usage: export EGRESS_GUARD_IMAGES=$(scripts/images.sh)
set -euo pipefail

KEY_VERSION=1 # bump to rebuild everything after changing how images are made

root="${EGRESS_GUARD_CACHE:-${HOME:?HOME is not set}/.cache/egress-guard}"
dir="$root/images"
store="$root/buildah"
rootfs_tar="$root/rootfs-bookworm.tar"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"

log() { echo "images: $*" >&2; }
die() {
  log "$*"
  exit 1
}

[ "$(id -u)" = 0 ] || die "needs root (buildah with overlay storage and chroot isolation)"
for c in buildah git go sha256sum tar flock; do
  command -v "$c" >/dev/null 2>&1 || die "needs $c on PATH (scripts/deps.sh installs the packages)"
done

{
  read -r goversion
  read -r goroot
  read -r gomodcache
  read -r gocache
} < <(go env GOVERSION GOROOT GOMODCACHE GOCACHE)

# The Debian mirror apt uses for bookworm (the same one the Dockerfile's apt-get reaches).
mirror="$(apt-get indextargets --format '$(RELEASE) $(REPO_URI)' 2>/dev/null |
  awk '$1 == "bookworm" { print $2; exit }')"
mirror="${mirror:-http://deb.debian.org/debian/}"

# --- keys ---------------------------------------------------------------------------
hash() { sha256sum | cut -c1-64; }

# The project's files that go build reads (tracked as in the working tree, or untracked but
# not ignored): Go sources but the tests, go.mod, go.sum, and the Dockerfiles. Editing a
# test, the README or the chart does not rebuild the images. Nothing is embedded with
# go:embed; if that changes, add the embedded files here.
source_files() {
  git -C "$repo" ls-files -z -co --exclude-standard | sort -zu |
    while IFS= read -r -d '' f; do
      case "$f" in
      *_test.go | testdata/* | */testdata/*) continue ;;
      *.go | go.mod | go.sum | Dockerfile.*) ;;
      *) continue ;;
      esac
      [ -f "$repo/$f" ] && printf '%s\0' "$f"
    done
}
src_key="$(cd "$repo" && source_files | xargs -0 -r sha256sum | hash)"

k_debian="$(echo "debian $KEY_VERSION bookworm minbase $mirror" | hash)"
k_golang="$(echo "golang $KEY_VERSION $k_debian $goversion $goroot" | hash)"
k_distroless="$({
  echo "distroless $KEY_VERSION"
  cat /etc/ssl/certs/ca-certificates.crt
} | hash)"
k_sidecar="$(echo "sidecar $KEY_VERSION $src_key $k_golang $k_distroless" | hash)"
k_controller="$(echo "controller $KEY_VERSION $src_key $k_golang $k_distroless" | hash)"
k_init="$(echo "init $KEY_VERSION $src_key $k_golang $k_debian" | hash)"
k_pause="$({
  echo "pause $KEY_VERSION $goversion"
  cat "$repo/internal/kubelab/pause/main.go"
} | hash)"
k_curl="$(echo "curl $KEY_VERSION $k_debian" | hash)"

IMAGES=(egress-guard egress-guard-controller egress-guard-init pause curl)
declare -A TAG=(
  [egress-guard]=localhost/egress-guard:dev
  [egress-guard-controller]=localhost/egress-guard-controller:dev
  [egress-guard-init]=localhost/egress-guard-init:dev
  [pause]=localhost/egress-guard-e2e/pause:1
  [curl]=localhost/egress-guard-e2e/curl:1
)
declare -A KEY=(
  [egress-guard]=$k_sidecar
  [egress-guard-controller]=$k_controller
  [egress-guard-init]=$k_init
  [pause]=$k_pause
  [curl]=$k_curl
)

fresh() { # fresh NAME: the tarball exists and was built from the current inputs
  [ -s "$dir/$1.tar" ] && [ "$(cat "$dir/$1.tar.key" 2>/dev/null)" = "${KEY[$1]}" ]
}
all_fresh() {
  local i
  for i in "${IMAGES[@]}"; do fresh "$i" || return 1; done
}

if all_fresh; then
  echo "$dir"
  exit 0
fi

if [ -z "${_EGRESS_GUARD_IMAGES_IN_NS:-}" ]; then
  mkdir -p "$root" "$dir" "$store/keys" "$store/logs"
  # Serialize concurrent builders (parallel test packages, two shells...).
  exec 9>"$root/.images.lock"
  flock 9
  if all_fresh; then # someone else finished while we waited
    echo "$dir"
    exit 0
  fi
  # Build in a private mount namespace (below), holding the lock (fd 9 is inherited).
  command -v unshare >/dev/null 2>&1 || die "needs unshare (util-linux)"
  exec env _EGRESS_GUARD_IMAGES_IN_NS="$(readlink /proc/self/ns/mnt)" unshare --mount --propagation private -- bash "${BASH_SOURCE[0]}" "$@"
fi

[ "$(readlink /proc/self/ns/mnt)" != "$_EGRESS_GUARD_IMAGES_IN_NS" ] ||
  die "internal: not in a private mount namespace"
rm -rf "$root"/.images.tmp.* # left over by a killed run (we hold the lock)
tmp="$(mktemp -d "$root/.images.tmp.XXXXXX")"
B=(buildah --storage-driver overlay --root "$store/storage" --runroot "$store/runroot")
cleanup() {
  "${B[@]}" rm --all >/dev/null 2>&1 || true # working containers of this run (we hold the lock)
  umount /etc /var/lib /var/cache 2>/dev/null || true # our overlays (this namespace only)
  rm -rf "$tmp"
}
trap cleanup EXIT

# Buildah (containers/image, its CNI setup) writes state at fixed host paths whatever its
# --root: /var/lib/containers/cache (blob info cache), /var/cache/containers (short-name
# aliases), /etc/cni/net.d (a lock, even with chroot isolation). In this private mount
# namespace those trees get a throwaway overlay, so nothing of the build lands on the host.
for d in /etc /var/lib /var/cache; do
  o="$tmp/host$(echo "$d" | tr / _)"
  mkdir -p "$o/upper" "$o/work"
  mount -t overlay egress-guard-images -o "lowerdir=$d,upperdir=$o/upper,workdir=$o/work" "$d" ||
    die "cannot mount an overlay over $d in the build's mount namespace"
done
# containers/image puts big temporary files in TMPDIR (default /var/tmp).
export TMPDIR="$tmp"
"${B[@]}" rm --all >/dev/null 2>&1 || true # left over by an interrupted run

total_start=$(date +%s)
step_start=0
step() {
  step_start=$(date +%s)
  log "$*..."
}
step_done() { log "  done in $(($(date +%s) - step_start)) s"; }

# run_logged NAME CMD...: runs CMD with its output in $store/logs/NAME.log, shown on failure.
run_logged() {
  local name=$1
  shift
  if ! "$@" >"$store/logs/$name.log" 2>&1; then
    tail -40 "$store/logs/$name.log" >&2
    die "$name failed (full log: $store/logs/$name.log)"
  fi
}

# --- base images --------------------------------------------------------------------
# base_ok NAME KEY: the image is in the storage and was made from the current inputs.
base_ok() {
  "${B[@]}" inspect --type image "$1" >/dev/null 2>&1 &&
    [ "$(cat "$store/keys/$(echo "$1" | tr '/:' '__')" 2>/dev/null)" = "$2" ]
}
base_done() { echo "$2" >"$store/keys/$(echo "$1" | tr '/:' '__')"; }

PATH_ENV=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

ensure_debian() {
  local name=docker.io/library/debian:bookworm-slim c m
  base_ok "$name" "$k_debian" && return 0
  if [ ! -s "$rootfs_tar" ] || [ "$(cat "$rootfs_tar.key" 2>/dev/null)" != "$k_debian" ]; then
    command -v debootstrap >/dev/null 2>&1 || die "needs debootstrap (scripts/deps.sh installs it)"
    step "debootstrap --variant=minbase bookworm from $mirror (once; about 4 min)"
    local rfs="$tmp/rootfs"
    run_logged debootstrap debootstrap --variant=minbase bookworm "$rfs" "$mirror"
    rm -rf "$rfs"/var/cache/apt/archives/*.deb "$rfs"/var/lib/apt/lists/* "$rfs"/dev/* \
      "$rfs"/var/log/bootstrap.log "$rfs"/debootstrap
    tar -C "$rfs" --numeric-owner -cpf "$rootfs_tar.tmp" .
    mv "$rootfs_tar.tmp" "$rootfs_tar"
    echo "$k_debian" >"$rootfs_tar.key"
    rm -rf "$rfs"
    step_done
  fi
  step "base image $name (from $rootfs_tar)"
  c=$("${B[@]}" from scratch)
  m=$("${B[@]}" mount "$c")
  tar -C "$m" --numeric-owner -xpf "$rootfs_tar"
  "${B[@]}" umount "$c" >/dev/null
  "${B[@]}" config --env "$PATH_ENV" --cmd bash "$c"
  "${B[@]}" commit -q "$c" "$name" >/dev/null
  "${B[@]}" rm "$c" >/dev/null
  base_done "$name" "$k_debian"
  step_done
}

ensure_golang() {
  local name=docker.io/library/golang:1.26-bookworm c m
  ensure_debian
  base_ok "$name" "$k_golang" && return 0
  step "base image $name (debian + host $goversion from $goroot)"
  c=$("${B[@]}" from --pull=never docker.io/library/debian:bookworm-slim)
  m=$("${B[@]}" mount "$c")
  mkdir -p "$m/usr/local" "$m/go/pkg/mod" "$m/go/bin" "$m/root/.cache/go-build"
  cp -a "$goroot" "$m/usr/local/go"
  "${B[@]}" umount "$c" >/dev/null
  "${B[@]}" config \
    --env PATH=/go/bin:/usr/local/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env GOPATH=/go --env GOTOOLCHAIN=local --env GOPROXY=off --env GOFLAGS=-mod=mod \
    --env GOCACHE=/root/.cache/go-build --workingdir /go "$c"
  "${B[@]}" commit -q "$c" "$name" >/dev/null
  "${B[@]}" rm "$c" >/dev/null
  base_done "$name" "$k_golang"
  step_done
}

ensure_distroless() {
  local name=gcr.io/distroless/static-debian12:nonroot c m
  base_ok "$name" "$k_distroless" && return 0
  step "base image $name (scratch + passwd/group, CA bundle, /tmp)"
  c=$("${B[@]}" from scratch)
  m=$("${B[@]}" mount "$c")
  mkdir -p "$m/etc/ssl/certs" "$m/tmp" "$m/home/nonroot" "$m/root"
  chmod 1777 "$m/tmp"
  chmod 0700 "$m/root"
  chown 65532:65532 "$m/home/nonroot"
  cp /etc/ssl/certs/ca-certificates.crt "$m/etc/ssl/certs/ca-certificates.crt"
  cat >"$m/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
  cat >"$m/etc/group" <<'EOF'
root:x:0:
tty:x:5:
staff:x:50:
nobody:x:65534:
nonroot:x:65532:
EOF
  printf 'PRETTY_NAME="Distroless-like (egress-guard local stand-in)"\nID=debian\nVERSION_ID="12"\n' >"$m/etc/os-release"
  "${B[@]}" umount "$c" >/dev/null
  "${B[@]}" config --user 65532 --workingdir /home/nonroot --env "$PATH_ENV" \
    --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt "$c"
  "${B[@]}" commit -q "$c" "$name" >/dev/null
  "${B[@]}" rm "$c" >/dev/null
  base_done "$name" "$k_distroless"
  step_done
}

# --- project images -----------------------------------------------------------------
# export_image NAME: pushes TAG[NAME] to NAME.tar (atomically), records its key and drops
# the image from the storage.
export_image() {
  local name=$1 out="$dir/$1.tar"
  rm -f "$out.tmp"
  "${B[@]}" push -q "${TAG[$name]}" "docker-archive:$out.tmp:${TAG[$name]}" >/dev/null
  mv "$out.tmp" "$out"
  echo "${KEY[$name]}" >"$out.key"
  "${B[@]}" rmi "${TAG[$name]}" >/dev/null 2>&1 || true
  log "  $out: $(du -h "$out" | cut -f1)"
}

context=""
make_context() { # the build context: exactly the files the key was computed from
  [ -n "$context" ] && return 0
  context="$tmp/context"
  mkdir -p "$context"
  (cd "$repo" && source_files | tar --null -T - -cf -) | tar -C "$context" -xf -
  # The Go stage runs with GOPROXY=off on the mounted host module cache: fill it here.
  (cd "$context" && GOFLAGS=-mod=mod go mod download) >&2
}

bud() { # bud NAME DOCKERFILE
  local name=$1 dockerfile=$2
  make_context
  step "buildah bud -f $dockerfile -t ${TAG[$name]}"
  run_logged "$name" "${B[@]}" bud --isolation chroot --pull=never --layers=false \
    -v "$gomodcache:/go/pkg/mod" -v "$gocache:/root/.cache/go-build" \
    -f "$context/$dockerfile" -t "${TAG[$name]}" "$context"
  export_image "$name"
  step_done
}

if ! fresh egress-guard; then
  ensure_golang
  ensure_distroless
  bud egress-guard Dockerfile.sidecar
fi

if ! fresh egress-guard-controller; then
  ensure_golang
  ensure_distroless
  bud egress-guard-controller Dockerfile.controller
fi

if ! fresh egress-guard-init; then
  ensure_golang
  bud egress-guard-init Dockerfile.init
fi

if ! fresh pause; then
  step "image ${TAG[pause]} (static internal/kubelab/pause)"
  (cd "$repo" && CGO_ENABLED=0 GOFLAGS=-buildvcs=false go build -trimpath -ldflags="-s -w" \
    -o "$tmp/pause" ./internal/kubelab/pause) >&2
  c=$("${B[@]}" from scratch)
  "${B[@]}" copy --chmod 0755 "$c" "$tmp/pause" /pause >/dev/null
  "${B[@]}" config --entrypoint '["/pause"]' --user 65535:65535 "$c"
  "${B[@]}" commit -q "$c" "${TAG[pause]}" >/dev/null
  "${B[@]}" rm "$c" >/dev/null
  export_image pause
  step_done
fi

if ! fresh curl; then
  # The app of the real-pod test: Debian's curl, a client nobody here wrote (Debian's static
  # busybox wget segfaults on this machine). RUN's apt-get uses the host network (chroot
  # isolation), as Dockerfile.init's does.
  ensure_debian
  step "image ${TAG[curl]} (debian + apt-get install curl)"
  c=$("${B[@]}" from --pull=never docker.io/library/debian:bookworm-slim)
  run_logged curl "${B[@]}" run --isolation chroot "$c" -- sh -c \
    'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends curl ca-certificates && rm -rf /var/lib/apt/lists/*'
  "${B[@]}" config --cmd '["sleep","infinity"]' "$c"
  "${B[@]}" commit -q "$c" "${TAG[curl]}" >/dev/null
  "${B[@]}" rm "$c" >/dev/null
  export_image curl
  step_done
fi

# Untagged leftovers (base images replaced after a key change).
"${B[@]}" rmi --prune >/dev/null 2>&1 || true

all_fresh || die "some image is still missing or stale after the build"
log "images ready in $(($(date +%s) - total_start)) s"
echo "$dir"
