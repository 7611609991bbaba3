#!/usr/bin/env bash
# The runtime's main job on the embedded default (native sandbox, embedded storage), on a
# fresh Debian 12 machine as root: installs what the native tier needs (idempotent), builds
# the `symbiont` binary, and runs `symbiont demo`, which starts the daemon with the example
# agents (collector -> summarizer -> reporter) and shows them working: messages flowing over
# the signed and encrypted bus, a task scheduled, the audit trail verified.
# Extra arguments go to `symbiont demo` (e.g. --data-dir DIR).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "demo: must run as root (the native sandbox uses namespaces and cgroups)" >&2
  exit 1
fi
echo "==> setup (base packages, Rust, native tier)"
bash scripts/setup.d/00-base.sh
bash scripts/setup.d/20-native.sh
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
echo "==> build (release)"
cargo build --release --locked -p symbiont
exec target/release/symbiont demo "$@"
