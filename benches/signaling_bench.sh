#!/usr/bin/env bash
# Signaling benchmark: switchboard (its own protocol on /v1/ws, and the PeerJS protocol of
# [peerjs] on a second process) vs the PeerJS server (npm `peer`, run with node), side by side
# in one run through the same load tool (benches/sigload.rs). Not part of the test suite.
#
#   benches/signaling_bench.sh                       # 19,000 idle connections, 5k and 20k msgs/s
#   N=2000 RATES=5000 SECS=5 benches/signaling_bench.sh   # quicker run
#   MODE=cluster benches/signaling_bench.sh          # cross-node vs single node, 5k msgs/s
#
# Both servers listen on loopback. The tool holds N WebSockets in rooms (pairs) of two, reads
# each server's RSS from /proc/<pid>/status, then, with the N still connected, relays paced
# ~200-byte signals between PAIRS pairs at each rate in RATES for SECS seconds and reports
# latency percentiles, loss, reordering, alteration and the server's CPU (utime+stime from
# /proc/<pid>/stat) per 1,000 relayed messages. Each process may open 20,000 files.
#
# MODE=cluster starts a redis-server (Debian's) and two switchboard nodes sharing it, next to
# a single-node switchboard without Redis, and relays the same paced signals with both peers
# on the single node, both on one cluster node, and each on a different cluster node (every
# signal then crosses Redis once), at RATES (default 5000) for SECS seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-19000}
PAIRS=${PAIRS:-250}
RATES=${RATES:-5000,20000}
SECS=${SECS:-10}
BASE=${BASE_PORT:-$((20000 + RANDOM % 20000))}
SB_PORT=$BASE
TURN_PORT=$((BASE + 1))
PJ_PORT=$((BASE + 2))
# The `peer` package pinned in tests/peerjs/package-lock.json (scripts/install-test-deps.sh).
PEERJS_DIR=${PEERJS_DIR:-tests/peerjs}
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)"

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
cargo build --release --bin switchboard
cargo bench --bench sigload --no-run

sb() { # port turn_port [VAR=value…]: a switchboard with the load-test limits, in the background
  local port=$1 turn=$2
  shift 2
  env SWITCHBOARD_HTTP__LISTEN="127.0.0.1:$port" \
    SWITCHBOARD_TURN__LISTEN="[\"127.0.0.1:$turn\"]" \
    SWITCHBOARD_HTTP__DEMO=false \
    SWITCHBOARD_LOG__LEVEL=warn \
    SWITCHBOARD_SIGNALING__MAX_CONNECTIONS_PER_IP=100000 \
    SWITCHBOARD_SIGNALING__MAX_ROOMS=100000 \
    SWITCHBOARD_AUTH__LOGIN_RATE_PER_MINUTE=100000000 \
    "$@" "$CARGO_TARGET_DIR/release/switchboard" &
}
wait_live() {
  for _ in $(seq 100); do
    if curl -sf "http://127.0.0.1:$1/$2" >/dev/null; then return 0; fi
    sleep 0.2
  done
  echo "no answer on port $1" >&2
  return 1
}

if [ "${MODE:-}" = cluster ]; then
  RATES=${RATES_CLUSTER:-5000}
  REDIS_PORT=$((BASE + 3))
  REDIS_DIR=$(mktemp -d)
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
    --dir "$REDIS_DIR" >/dev/null &
  PIDS+=("$!")
  echo "$(redis-server --version)"
  sb "$SB_PORT" "$TURN_PORT"
  SINGLE_PID=$!
  PIDS+=("$SINGLE_PID")
  NODE_PIDS=()
  for i in 1 2; do
    port=$((BASE + 2 + 2 * i))
    sb "$port" $((port + 1)) \
      SWITCHBOARD_CLUSTER__REDIS_URL="redis://127.0.0.1:$REDIS_PORT" \
      SWITCHBOARD_CLUSTER__NODE_ID="n$i" \
      SWITCHBOARD_AUTH__SESSION_KEYS='["bench-session-key-0123456789abcdef"]' \
      SWITCHBOARD_AUTH__TURN_SECRETS='["bench-turn-secret"]'
    NODE_PIDS+=("$!")
    PIDS+=("$!")
  done
  wait_live "$SB_PORT" livez
  for i in 1 2; do
    # Ready (not degraded) once the node's Redis link is up.
    for _ in $(seq 100); do
      [ "$(curl -s "http://127.0.0.1:$((BASE + 2 + 2 * i))/readyz")" = ready ] && break
      sleep 0.2
    done
  done
  cargo bench --bench sigload -- cluster \
    --single "127.0.0.1:$SB_PORT/$SINGLE_PID" \
    --nodes "127.0.0.1:$((BASE + 4))/${NODE_PIDS[0]},127.0.0.1:$((BASE + 6))/${NODE_PIDS[1]}" \
    --pairs "$PAIRS" --rate "$RATES" --secs "$SECS"
  exit 0
fi

if [ ! -f "$PEERJS_DIR/node_modules/peer/dist/bin/peerjs.js" ]; then
  (cd "$PEERJS_DIR" && npm ci --no-audit --no-fund >/dev/null)
fi
echo "PeerJS server $(node -p "require(require('path').resolve('$PEERJS_DIR/node_modules/peer/package.json')).version"), node $(node --version)"

# Defaults except what a load test from one address needs: connections and logins per IP,
# rooms, and the per-user room quota (every tool user creates one room).
SWITCHBOARD_HTTP__LISTEN=127.0.0.1:$SB_PORT \
SWITCHBOARD_TURN__LISTEN="[\"127.0.0.1:$TURN_PORT\"]" \
SWITCHBOARD_HTTP__DEMO=false \
SWITCHBOARD_LOG__LEVEL=warn \
SWITCHBOARD_SIGNALING__MAX_CONNECTIONS_PER_IP=100000 \
SWITCHBOARD_SIGNALING__MAX_ROOMS=100000 \
SWITCHBOARD_AUTH__LOGIN_RATE_PER_MINUTE=100000000 \
  "$CARGO_TARGET_DIR/release/switchboard" &
SB_PID=$!
PIDS+=("$SB_PID")
# switchboard's PeerJS protocol on its own process, so its RSS is measured from a fresh start;
# open auth, as the PeerJS server.
SBPJ_PORT=$((BASE + 3))
sb "$SBPJ_PORT" $((BASE + 4)) SWITCHBOARD_PEERJS__ENABLED=true SWITCHBOARD_PEERJS__AUTH=open
SBPJ_PID=$!
PIDS+=("$SBPJ_PID")
node "$PEERJS_DIR/node_modules/peer/dist/bin/peerjs.js" --port "$PJ_PORT" --host 127.0.0.1 \
  --concurrent_limit 100000 --alive_timeout 600000 >/dev/null &
PJ_PID=$!
PIDS+=("$PJ_PID")
for _ in $(seq 50); do
  if curl -sf "http://127.0.0.1:$SB_PORT/livez" >/dev/null && curl -sf "http://127.0.0.1:$SBPJ_PORT/livez" >/dev/null && curl -s "http://127.0.0.1:$PJ_PORT/" >/dev/null; then break; fi
  sleep 0.2
done

cargo bench --bench sigload -- compare \
  --sb "127.0.0.1:$SB_PORT/$SB_PID" --sb-peerjs "127.0.0.1:$SBPJ_PORT/$SBPJ_PID" \
  --peerjs "127.0.0.1:$PJ_PORT/$PJ_PID" \
  --n "$N" --pairs "$PAIRS" --rate "$RATES" --secs "$SECS"
