#!/usr/bin/env bash
# The whole test suite: install test dependencies, then format, lint and every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-test-deps.sh
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
# In CI (CI=true) the network lab must build: the lab tests fail instead of skipping. Locally
# they skip with a message when not run as root; SWITCHBOARD_LAB=require forces the CI
# behaviour. It is not exported here: the server refuses unknown SWITCHBOARD_* variables, and
# tests that start the binary would inherit it.
#
# The integration tests are one binary, tests/it (tests/README.md); a filter is a substring
# of `module::test`. Its browser modules (`browser::` also matches lab_browser, peerjs_browser
# and lab_cluster_browser) run apart from the rest, so that a call never shares the two cores
# with the CPU-heavy loopback tests; within them one browser pair runs at a time
# (support::browser_slot). ALONE runs one test at a time with nothing beside it: coturn's
# client over TLS loses packets when it shares the cores with twenty other clients.
BROWSERS=(browser:: lab_port443::)
ALONE=(turn_tls::)
skips=()
for m in "${BROWSERS[@]}" "${ALONE[@]}"; do skips+=(--skip "$m"); done
cargo test --all-targets --locked --no-run
# The unit tests and every test binary (those modules left out), then those modules, then
# the benches as smoke runs.
cargo test --tests --locked -- "${skips[@]}"
cargo test --test it --locked -- "${BROWSERS[@]}"
# turn_tls's uclient run over TLS has lost echoes now and then (1 of 60 in one clean suite
# run of three after the TCP/TLS relays moved onto the shards; before the move, under load
# beside other tests); its cause is not found yet: it gets one more try here, and a second
# loss fails the suite.
cargo test --test it --locked -- --test-threads 1 "${ALONE[@]}" ||
    cargo test --test it --locked -- --test-threads 1 "${ALONE[@]}"
cargo test --benches --locked
# The JS client package (clients/js): tsc, its generated types, Node.js tests against the
# server binary the step above built, and an installable `npm pack`.
bash clients/js/check.sh
# The kernel offload's eBPF half is built only with its feature: lint that code and run its
# lab tests (the verifier on this kernel, relaying in the kernel, fallback) with it.
cargo clippy --lib --test it --features kernel-offload --locked -- -D warnings
cargo test --features kernel-offload --locked --test it -- lab_offload:: \
    lab_browser::chromium_call_through_the_kernel_offload
