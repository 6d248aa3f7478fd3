#!/usr/bin/env bash
# Runs ../shared/egressbench against direct loopback, Squid, tinyproxy and egress-guard in one
# run (interleaved rounds) and prints the table of medians plus egress-guard's ratios to the
# peers. egressbench's upstreams listen on 127.0.0.1, which egress-guard treats as internal, so
# the bench policy's identity names 127.0.0.0/8 explicitly.
#
# Knobs: RUNS (default 1), BENCH_ARGS (default a shortened run, see below), EG_PORT (14750),
# LOGS (file|off, passed to run-peers.sh; egress-guard logs to a file under OUT either way,
# or to /dev/null with LOGS=off), BASELINE_BIN (another egress-guard binary, e.g. built from an
# earlier commit, benched in the same run as "eg-baseline" for before/after numbers).
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

EG_LOG="$OUT/egress-guard.log"
[ "${LOGS:-file}" = off ] && EG_LOG=/dev/null
PROXY_PORT=$EG_PORT METRICS_PORT=$EG_METRICS LISTEN_ADDR=127.0.0.1 CONFIGMAP_PATH="$OUT/bench-policy.yaml" \
  MAX_TUNNELS=30000 LOG_LEVEL=INFO "$ROOT/bin/egress-guard" >"$EG_LOG" 2>&1 &
EG_PID=$!
trap 'kill -TERM $EG_PID 2>/dev/null || true; wait $EG_PID 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$EG_METRICS/ready" >/dev/null 2>&1 && break
  kill -0 $EG_PID 2>/dev/null || { echo "bench-peers: egress-guard exited; log:" >&2; cat "$EG_LOG" >&2; exit 1; }
  sleep 0.1
done

EXTRA="egress-guard=127.0.0.1:$EG_PORT@$EG_PID"
if [ -n "${BASELINE_BIN:-}" ]; then
  BASE_PORT=$((EG_PORT + 1)); BASE_METRICS=$((EG_METRICS + 1))
  PROXY_PORT=$BASE_PORT METRICS_PORT=$BASE_METRICS LISTEN_ADDR=127.0.0.1 CONFIGMAP_PATH="$OUT/bench-policy.yaml" \
    MAX_TUNNELS=30000 LOG_LEVEL=INFO "$BASELINE_BIN" >"$OUT/eg-baseline.log" 2>&1 &
  BASE_PID=$!
  trap 'kill -TERM $EG_PID $BASE_PID 2>/dev/null || true; wait $EG_PID $BASE_PID 2>/dev/null || true' EXIT
  for _ in $(seq 1 100); do
    curl -fsS "http://127.0.0.1:$BASE_METRICS/ready" >/dev/null 2>&1 && break
    sleep 0.1
  done
  EXTRA="$EXTRA eg-baseline=127.0.0.1:$BASE_PORT@$BASE_PID"
fi
EXTRA="$EXTRA" "$BENCHDIR/run-peers.sh"

# Ratios of egress-guard to each peer, from the medians.
"$OUT/egressbench" report "$OUT/results.jsonl" > "$OUT/report.txt" 2>&1 || true
go run "$ROOT/scripts/benchratio" "$OUT/results.jsonl" egress-guard | tee "$OUT/ratios.txt"
echo "bench-peers: results in $OUT" >&2
