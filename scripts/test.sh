#!/usr/bin/env bash
# The whole test suite: install test dependencies, then format, lint and every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-test-deps.sh
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
# In CI the network lab must build (the lab tests fail instead of skipping); locally they skip
# with a message when not run as root. SWITCHBOARD_LAB=require forces the CI behaviour.
if [ "${CI:-}" = "true" ]; then export SWITCHBOARD_LAB=require; fi
cargo test --all-targets --locked
