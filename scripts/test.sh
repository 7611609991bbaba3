#!/usr/bin/env bash
# The whole test suite, on a fresh Debian 12 machine as root:
#   installs what the tiers need (idempotent), builds once, runs every test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
echo "==> build"
cargo build --workspace --all-targets --locked
echo "==> test"
cargo test --workspace --locked --no-fail-fast -- --test-threads="${SYMBIONT_TEST_THREADS:-4}"
echo "==> leak check"
bash scripts/leak-check.sh
echo "==> all tests passed"
