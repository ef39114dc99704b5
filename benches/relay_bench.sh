#!/usr/bin/env bash
# TURN relay benchmark: a bare recvmmsg/sendmmsg forwarder (no TURN, the physical reference),
# coturn (`turnserver` from Debian, static-auth-secret) and switchboard, side by side in one
# run (benches/relay_load.rs). Needs quiet CPUs; takes about two minutes.
#
#   benches/relay_bench.sh                              # 50k, 100k, 200k pkt/s each way
#   benches/relay_bench.sh --rates 50000 --secs 10      # longer, one rate
#   benches/relay_bench.sh --shards 1                   # switchboard with one UDP shard
#
# Options are those of relay_load (see the top of benches/relay_load.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v turnserver >/dev/null || { echo "turnserver missing: scripts/install-test-deps.sh" >&2; exit 1; }
cargo build --release --quiet --bin switchboard
TARGET=${CARGO_TARGET_DIR:-target}
# A private copy, so a build in a shared target directory cannot swap the binary mid-run.
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cp "$TARGET/release/switchboard" "$WORK/switchboard"
cargo bench --quiet --bench relay_load -- --bin "$WORK/switchboard" "$@"
