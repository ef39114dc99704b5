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
cargo test --all-targets --locked
# The JS client package (clients/js): tsc, its generated types, Node.js tests against the
# server binary the step above built, and an installable `npm pack`.
bash clients/js/check.sh
# The kernel offload's eBPF half is built only with its feature: lint that code and run its
# lab tests (the verifier on this kernel, relaying in the kernel, fallback) with it.
cargo clippy --lib --test lab_offload --test lab_browser --features kernel-offload --locked -- -D warnings
cargo test --features kernel-offload --locked --test lab_offload
cargo test --features kernel-offload --locked --test lab_browser chromium_call_through_the_kernel_offload
