#!/usr/bin/env bash
# Runs ../shared/egressbench against direct loopback, Squid, tinyproxy and egress-guard in one
# run (interleaved rounds) and prints the table of medians plus egress-guard's ratios to the
# peers. egressbench's upstreams listen on 127.0.0.1, which egress-guard treats as internal, so
# the bench policy's identity names 127.0.0.0/8 explicitly.
#
# Knobs: RUNS (default 1), BENCH_ARGS (default a shortened run, see below), EG_PORT (14750),
# LOGS (file|off, passed to run-peers.sh; each egress-guard logs to a file under OUT, or to
# /dev/null with LOGS=off), BASELINE_BIN (another egress-guard binary, e.g. built from an
# earlier commit, benched in the same run as "eg-baseline" for before/after numbers), SIDECAR
# (default 1: also bench the same binary as "eg-sidecar", with the runtime settings the injector
# gives a sidecar: GOMAXPROCS=1; 0 to skip), FLOORS (default 1: also bench scripts/benchfloor's two
# engines, "go-floor" and "epoll-floor", the least a CONNECT proxy can cost with goroutines over
# Go's netpoller and with one epoll loop; 0 to skip).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED:-$ROOT/../shared}
BENCHDIR="$SHARED/egressbench"
[ -x "$BENCHDIR/run-peers.sh" ] || { echo "bench-peers: $BENCHDIR/run-peers.sh not found (shared/ must sit beside the checkout)" >&2; exit 1; }

export RUNS=${RUNS:-1}
export BENCH_ARGS="${BENCH_ARGS:---mib 512 --latency-n 1000 --rate-time 5s --idle-tunnels 2000} --proxy-auth bench:x"
export QUIET_WAIT=${QUIET_WAIT:-20s}
export OUT=${OUT:-$(mktemp -d /tmp/egress-guard-bench.XXXXXX)}
EG_PORT=${EG_PORT:-14750}
EG_METRICS=${EG_METRICS:-14790}

mkdir -p "$OUT"
chmod 755 "$OUT" # Squid runs as its own user (proxy) and must reach its files under OUT
cat > "$OUT/bench-policy.yaml" <<'YAML'
identities:
  bench:
    api_keys: ["bench"]
    allowed_destinations:
      - "127.0.0.0/8"
YAML

NOFILE=$(ulimit -Hn)
if [ "$NOFILE" = unlimited ] || [ "$NOFILE" -gt 65536 ]; then NOFILE=65536; fi
ulimit -n "$NOFILE"

# start_eg BIN PORT METRICS_PORT LOG [ENV...]: runs one egress-guard on the bench policy, with
# ENV (NAME=value) in its environment, and waits until it is ready; its pid is left in
# STARTED_PID.
start_eg() {
  env "${@:5}" PROXY_PORT=$2 METRICS_PORT=$3 LISTEN_ADDR=127.0.0.1 CONFIGMAP_PATH="$OUT/bench-policy.yaml" \
    MAX_TUNNELS=30000 LOG_LEVEL=INFO "$1" >"$4" 2>&1 &
  STARTED_PID=$!
  PIDS_TO_STOP="${PIDS_TO_STOP:-} $STARTED_PID"
  for _ in $(seq 1 100); do
    curl -fsS "http://127.0.0.1:$3/ready" >/dev/null 2>&1 && return 0
    kill -0 "$STARTED_PID" 2>/dev/null || { echo "bench-peers: $1 exited; log:" >&2; cat "$4" >&2; exit 1; }
    sleep 0.1
  done
}
trap 'kill -TERM $PIDS_TO_STOP 2>/dev/null || true; wait $PIDS_TO_STOP 2>/dev/null || true' EXIT

# log_of NAME: where the egress-guard benched as NAME logs; every one of them alike, so that
# LOGS=off compares them all without per-connection lines.
log_of() { if [ "${LOGS:-file}" = off ]; then echo /dev/null; else echo "$OUT/$1.log"; fi; }

start_eg "$ROOT/bin/egress-guard" "$EG_PORT" "$EG_METRICS" "$(log_of egress-guard)"
EXTRA="egress-guard=127.0.0.1:$EG_PORT@$STARTED_PID"
if [ "${SIDECAR:-1}" != 0 ]; then
  start_eg "$ROOT/bin/egress-guard" $((EG_PORT + 2)) $((EG_METRICS + 2)) "$(log_of eg-sidecar)" GOMAXPROCS=1
  EXTRA="$EXTRA eg-sidecar=127.0.0.1:$((EG_PORT + 2))@$STARTED_PID"
fi
if [ -n "${BASELINE_BIN:-}" ]; then
  start_eg "$BASELINE_BIN" $((EG_PORT + 1)) $((EG_METRICS + 1)) "$(log_of eg-baseline)"
  EXTRA="$EXTRA eg-baseline=127.0.0.1:$((EG_PORT + 1))@$STARTED_PID"
fi
if [ "${FLOORS:-1}" != 0 ]; then
  (cd "$ROOT" && go build -o "$OUT/benchfloor" ./scripts/benchfloor)
  port=$((EG_PORT + 3))
  for engine in go epoll; do
    "$OUT/benchfloor" -engine "${engine/#go/goroutine}" -listen "127.0.0.1:$port" >"$(log_of $engine-floor)" 2>&1 &
    PIDS_TO_STOP="${PIDS_TO_STOP:-} $!"
    EXTRA="$EXTRA $engine-floor=127.0.0.1:$port@$!"
    for _ in $(seq 1 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
    port=$((port + 1))
  done
fi
EXTRA="$EXTRA" "$BENCHDIR/run-peers.sh"

# Ratios of egress-guard to each peer, from the medians.
"$OUT/egressbench" report "$OUT/results.jsonl" > "$OUT/report.txt" 2>&1 || true
go run "$ROOT/scripts/benchratio" "$OUT/results.jsonl" egress-guard | tee "$OUT/ratios.txt"
if [ "${SIDECAR:-1}" != 0 ]; then
  go run "$ROOT/scripts/benchratio" "$OUT/results.jsonl" eg-sidecar | tee -a "$OUT/ratios.txt"
fi
echo "bench-peers: results in $OUT" >&2
