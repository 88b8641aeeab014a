#!/usr/bin/env bash
# The test command (README): builds the binaries, then runs every test of the workspace: unit
# and property tests, the crates' loopback tests, and the end-to-end scenarios in tests/e2e,
# which start the real fleetvault-coordinator and fleetvault-agent binaries.
# Extra arguments go to the test runner, e.g. `bash tests/run.sh -E 'test(crash)'` (nextest).
set -euo pipefail
cd "$(dirname "$0")/.."

# What the end-to-end tests need besides the binaries: PostgreSQL and MariaDB servers (the
# tests start their own throwaway ones), the sqlite3 shell, python3 (test data generators).
need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql postgresql-client)
command -v mariadbd >/dev/null 2>&1 || need+=(mariadb-server)
command -v mariadb >/dev/null 2>&1 || need+=(mariadb-client)
command -v sqlite3 >/dev/null 2>&1 || need+=(sqlite3)
command -v python3 >/dev/null 2>&1 || need+=(python3)
if ((${#need[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "tests/run.sh: missing ${need[*]}; run as root (or install them) first" >&2
        exit 1
    fi
    echo "installing: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

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
