#!/usr/bin/env bash
# Relay efficiency benchmark: relayed packets per server CPU-second, switchboard vs coturn,
# side by side in one run. Not part of the test suite (it takes minutes and needs quiet CPUs).
#
#   benches/relay_bench.sh            # 200 clients x 1000 messages x 120 B, -z 1
#   CLIENTS=50 MESSAGES=200 benches/relay_bench.sh   # quicker smoke run
#   EXTRA="-t" benches/relay_bench.sh # same over TURN/TCP, once supported
#
# Both servers listen on loopback only, use the same REST secret, and relay to the same
# turnutils_peer echo peer. CPU time is utime+stime of the server process from /proc.
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS=${CLIENTS:-200}
MESSAGES=${MESSAGES:-1000}
SIZE=${SIZE:-120}
INTERVAL=${INTERVAL:-1}
EXTRA=${EXTRA:-}
SECRET=bench-secret
REALM=switchboard
BASE=${BASE_PORT:-$((20000 + RANDOM % 20000))}
PEER_PORT=$BASE
SB_PORT=$((BASE + 10))
CT_PORT=$((BASE + 20))
HTTP_PORT=$((BASE + 30))
TICK=$(getconf CLK_TCK)
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

cargo build --release --quiet
BIN=target/release/switchboard

turnutils_peer -L 127.0.0.1 -p "$PEER_PORT" >"$WORK/peer.log" 2>&1 &
PIDS+=($!)

cat >"$WORK/sb.toml" <<TOML
[turn]
listen = ["127.0.0.1:$SB_PORT"]
realm = "$REALM"
max_allocations_per_user = 100000
max_allocations = 100000
[http]
listen = "127.0.0.1:$HTTP_PORT"
[log]
level = "warn"
[auth]
turn_secrets = ["$SECRET"]
TOML
"$BIN" --config "$WORK/sb.toml" >"$WORK/sb.log" 2>&1 &
SB_PID=$!
PIDS+=($SB_PID)

turnserver -n --no-tls --no-dtls --no-cli --listening-ip 127.0.0.1 --relay-ip 127.0.0.1 \
  -p "$CT_PORT" --use-auth-secret --static-auth-secret="$SECRET" -r "$REALM" \
  --allow-loopback-peers --no-stdout-log --log-file="$WORK/coturn.log" --simple-log \
  --pidfile="$WORK/coturn.pid" >"$WORK/coturn.out" 2>&1 &
CT_PID=$!
PIDS+=($CT_PID)
sleep 2

run() { # name pid port
  local name=$1 pid=$2 port=$3 before after out sent recv lost pkts cpu
  before=$(cpu_ticks "$pid")
  out=$(turnutils_uclient $EXTRA -W "$SECRET" -m "$CLIENTS" -n "$MESSAGES" -l "$SIZE" \
    -z "$INTERVAL" -e 127.0.0.1 -r "$PEER_PORT" -p "$port" 127.0.0.1 2>&1 | tail -12)
  after=$(cpu_ticks "$pid")
  sent=$(grep -o 'tot_send_msgs=[0-9]*' <<<"$out" | tail -1 | cut -d= -f2)
  recv=$(grep -o 'tot_recv_msgs=[0-9]*' <<<"$out" | tail -1 | cut -d= -f2)
  lost=$(grep -o 'Total lost packets [0-9]*' <<<"$out" | awk '{print $4}')
  pkts=$((sent + recv))
  cpu=$(awk -v t=$((after - before)) -v hz="$TICK" 'BEGIN{printf "%.2f", t/hz}')
  printf '%-12s sent=%s recv=%s lost=%s relayed=%s cpu=%ss pkts/cpu-s=%s\n' "$name" "$sent" \
    "$recv" "$lost" "$pkts" "$cpu" \
    "$(awk -v p="$pkts" -v c="$cpu" 'BEGIN{ if (c > 0) printf "%.0f", p/c; else print "inf" }')"
  eval "${name}_RATE=$(awk -v p="$pkts" -v c="$cpu" 'BEGIN{ if (c > 0) printf "%.0f", p/c; else print 0 }')"
}

echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo "load: $CLIENTS clients x $MESSAGES messages x $SIZE B, -z $INTERVAL $EXTRA"
run switchboard "$SB_PID" "$SB_PORT"
run coturn "$CT_PID" "$CT_PORT"
awk -v a="$switchboard_RATE" -v b="$coturn_RATE" \
  'BEGIN{ if (b > 0) printf "ratio switchboard/coturn = %.2f\n", a/b }'
