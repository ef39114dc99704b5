#!/usr/bin/env bash
# Run every cargo-fuzz target (or the ones named) for a given time each, with the corpus kept
# under fuzz/corpus/<target>, and print one summary line per target: executions, coverage,
# corpus size and crashes. Stable toolchain: RUSTC_BOOTSTRAP=1 enables -Z flags cargo-fuzz uses.
#
#   scripts/fuzz.sh 3600                      # every target, one hour each
#   scripts/fuzz.sh 120 signaling_frames      # one target, two minutes
#   JOBS=2 scripts/fuzz.sh 600                # libFuzzer workers per target
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^switchboard-fuzz$')
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
cargo fuzz build
mkdir -p target/fuzz-logs
printf '%-18s %8s %12s %8s %8s %8s %s\n' target seconds executions cov ft corpus crashes
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    log="target/fuzz-logs/$t.log"
    set +e
    cargo fuzz run "$t" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -jobs="${JOBS:-1}" -workers="${JOBS:-1}" \
        -max_len="${MAX_LEN:-4096}" -print_final_stats=1 -rss_limit_mb=4096 -timeout=10 >"$log" 2>&1
    rc=$?
    set -e
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | awk '{s+=$2} END {print s+0}')
    cov=$(grep -oE '#[0-9]+.*cov: [0-9]+' "$log" | tail -1 | sed 's/.*cov: //')
    ft=$(grep -oE 'ft: [0-9]+' "$log" | tail -1 | sed 's/ft: //')
    corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
    crashes=$(find "fuzz/artifacts/$t" -type f | wc -l)
    printf '%-18s %8s %12s %8s %8s %8s %s\n' "$t" "$secs" "$execs" "${cov:-?}" "${ft:-?}" "$corpus" "$crashes (rc $rc)"
done
