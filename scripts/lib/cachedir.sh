# Sourced by the scripts that build a tool once into the cache outside the clone
# (k8s-bins.sh, helm-bin.sh): a directory per tool and version under
#   ${EGRESS_GUARD_CACHE:-$HOME/.cache/egress-guard}
# filled in a temp dir and renamed into place whole, so a reader never sees a partial one.

cache_root="${EGRESS_GUARD_CACHE:-${HOME:?HOME is not set}/.cache/egress-guard}"

# cache_lock NAME: serializes concurrent builders of NAME (parallel test packages, two
# shells...) until the script exits. Check again after it: another may have finished.
cache_lock() {
  mkdir -p "$cache_root"
  exec 9>"$cache_root/.$1.lock"
  if command -v flock >/dev/null 2>&1; then
    flock 9
  fi
}

# cache_tmp NAME: prints a new temp dir beside the cache entries (same file system, so the
# final rename is atomic), removed when the script exits unless cache_install took it.
cache_tmp() {
  cache_tmpdir="$(mktemp -d "$cache_root/.$1.tmp.XXXXXX")"
  trap 'rm -rf "$cache_tmpdir"' EXIT
}

# cache_install NAME DIR: moves the finished temp dir to DIR with one rename(2); a stale,
# partial DIR (e.g. built by an older version of the script) is moved aside first.
cache_install() {
  chmod 755 "$cache_tmpdir"
  if [ -e "$2" ]; then
    local old
    old="$(mktemp -d "$cache_root/.$1.old.XXXXXX")"
    mv "$2" "$old/"
    rm -rf "$old"
  fi
  mv "$cache_tmpdir" "$2"
  trap - EXIT
}
