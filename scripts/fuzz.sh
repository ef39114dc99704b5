#!/usr/bin/env bash
# Run every cargo-fuzz target (or the ones named) for a given time each, with the corpus kept
# under fuzz/corpus/<target>, and print one summary line per target: wall and CPU seconds,
# executions, coverage, corpus size and crashes. Stable toolchain: RUSTC_BOOTSTRAP=1 enables
# the -Z flags cargo-fuzz uses.
#
#   scripts/fuzz.sh 3600                      # every target, one hour each, one after another
#   scripts/fuzz.sh 120 signaling_frames      # one target, two minutes
#   PARALLEL=2 scripts/fuzz.sh 3600           # two targets at a time (one per core)
#   IDLE=1 scripts/fuzz.sh 3600               # only on CPU time nothing else wants (SCHED_IDLE)
#   JOBS=2 scripts/fuzz.sh 600                # libFuzzer workers per target
#   MINIMIZE=1 scripts/fuzz.sh 0              # no fuzzing: shrink each corpus to what adds coverage
#
# Wall time is the `-max_total_time` given; CPU seconds (user + system, from the shell's `time`)
# say how much of it the target actually ran, which is what to report on a shared machine.
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
triple=$(rustc -vV | sed -n 's/^host: //p')
bindir="fuzz/target/$triple/release"
logs=target/fuzz-logs
mkdir -p "$logs"
prefix=()
if [ "${IDLE:-0}" = 1 ]; then
    prefix=(chrt --idle 0)
fi

run_one() {
    local t=$1 log="$logs/$1.log" cpu="$logs/$1.cpu"
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    if [ "${MINIMIZE:-0}" = 1 ]; then
        # Merge into a fresh directory: only inputs that add coverage survive.
        rm -rf "fuzz/corpus/$t.min"
        mkdir -p "fuzz/corpus/$t.min"
        "$bindir/$t" -merge=1 -rss_limit_mb=4096 -timeout=30 "fuzz/corpus/$t.min" "fuzz/corpus/$t" >"$log" 2>&1
        rm -rf "fuzz/corpus/$t"
        mv "fuzz/corpus/$t.min" "fuzz/corpus/$t"
        return
    fi
    local jobs=()
    if [ "${JOBS:-1}" -gt 1 ]; then
        jobs=(-jobs="$JOBS" -workers="$JOBS")
    fi
    local TIMEFORMAT='%R %U %S'
    set +e
    { time "${prefix[@]}" "$bindir/$t" "fuzz/corpus/$t" -artifact_prefix="fuzz/artifacts/$t/" \
        -max_total_time="$secs" "${jobs[@]}" -max_len="${MAX_LEN:-4096}" -print_final_stats=1 \
        -rss_limit_mb=4096 -timeout="${TIMEOUT:-10}" >"$log" 2>&1; } 2>"$cpu"
    echo "rc $?" >>"$cpu"
    set -e
}

summary() {
    # Counting is best effort: a missing log or no match is a blank field, not an exit.
    set +e +o pipefail
    local t=$1 log="$logs/$1.log" cpu="$logs/$1.cpu"
    local wall user sys rc
    read -r wall user sys <"$cpu" || true
    rc=$(sed -n 's/^rc //p' "$cpu")
    local execs cov ft corpus crashes
    execs=$(cat "$log" "$logs"/fuzz-*.log 2>/dev/null | grep -o 'stat::number_of_executed_units: *[0-9]*' | awk '{s+=$2} END {print s+0}')
    cov=$(grep -oE '#[0-9]+.*cov: [0-9]+' "$log" | tail -1 | sed 's/.*cov: //')
    ft=$(grep -oE 'ft: [0-9]+' "$log" | tail -1 | sed 's/ft: //')
    corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
    # Slow units are reported, not counted: a run paused by the scheduler produces them.
    crashes=$(find "fuzz/artifacts/$t" -type f \( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' -o -name 'oom-*' \) | wc -l)
    printf '%-18s %8.0f %8.0f %12s %8s %8s %8s %s\n' "$t" "${wall:-0}" \
        "$(echo "${user:-0} ${sys:-0}" | awk '{print $1 + $2}')" "$execs" "${cov:-?}" "${ft:-?}" \
        "$corpus" "$crashes (rc ${rc:-?})"
}

if [ "${MINIMIZE:-0}" = 1 ]; then
    for t in "${targets[@]}"; do
        before=$(find "fuzz/corpus/$t" -type f 2>/dev/null | wc -l)
        run_one "$t"
        echo "$t: corpus $before -> $(find "fuzz/corpus/$t" -type f | wc -l) inputs"
    done
    exit 0
fi

# Run the targets PARALLEL at a time.
running=0
for t in "${targets[@]}"; do
    run_one "$t" &
    running=$((running + 1))
    if [ "$running" -ge "${PARALLEL:-1}" ]; then
        wait -n || true
        running=$((running - 1))
    fi
done
wait || true
printf '%-18s %8s %8s %12s %8s %8s %8s %s\n' target wall_s cpu_s executions cov ft corpus crashes
for t in "${targets[@]}"; do
    summary "$t"
done
