#!/usr/bin/env bash
# Installs and starts everything the test suite needs, idempotently, printing each step.
# Runs every scripts/setup.d/*.sh in name order. Safe to run again: each step checks first.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export SYMBIONT_REPO="$(cd "$here/.." && pwd)"
if [ "$(id -u)" -ne 0 ]; then
  echo "setup: must run as root (sandboxes need namespaces, cgroups, Docker and QEMU)" >&2
  exit 1
fi
for step in "$here"/setup.d/[0-9]*.sh; do
  [ -e "$step" ] || continue
  echo "==> setup: $(basename "$step")"
  bash "$step"
done
echo "==> setup: done"
