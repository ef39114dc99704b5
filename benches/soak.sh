#!/usr/bin/env bash
# Soak the release server under mixed TURN and signaling load, then plot the samples.
# Not part of the test suite (see docs/performance.md for a recorded run).
#
#   benches/soak.sh                       # 30 minutes, one sample a minute, the defaults below
#   MINUTES=15 RATE=20000 WS=2000 benches/soak.sh
#   OUT=docs/soak benches/soak.sh          # writes docs/soak.csv and docs/soak.png
#
# The load is described in benches/soak.rs. RATE is ChannelData packets per second each way;
# pick one the machine sustains with the server, the load generator and the echo peer all on
# it (a rate past saturation measures the machine, not leaks).
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${MINUTES:-30}
SAMPLE=${SAMPLE:-60}
RATE=${RATE:-20000}
ALLOCS=${ALLOCS:-50}
CHURN=${CHURN:-20}
WS=${WS:-2000}
OUT=${OUT:-target/soak}
mkdir -p "$(dirname "$OUT")"
cargo build --release --manifest-path benches/soak-plot/Cargo.toml
cargo bench --bench soak -- --minutes "$MINUTES" --sample "$SAMPLE" --rate "$RATE" \
    --allocs "$ALLOCS" --churn "$CHURN" --ws "$WS" --csv "$OUT.csv" | tee "$OUT.txt"
benches/soak-plot/target/release/soak-plot "$OUT.csv" "$OUT.png"
echo "plot: $OUT.png"
