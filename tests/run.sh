#!/usr/bin/env bash
# The test command (README): builds the binaries, then runs every test of the workspace: unit
# and property tests, the crates' loopback tests, and the end-to-end scenarios in tests/e2e,
# which start the real fleetvault-coordinator and fleetvault-agent binaries.
# Extra arguments go to the test runner, e.g. `bash tests/run.sh -E 'test(crash)'` (nextest).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --workspace --bins
# The e2e harness would otherwise check the binaries are up to date once per test process.
export FLEETVAULT_TEST_NO_BUILD=1

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast "$@"
    # nextest does not run doctests.
    cargo test --workspace --doc
else
    cargo test --workspace --no-fail-fast "$@"
fi
