#!/usr/bin/env bash
# Base packages every tier's tests use, and the Rust toolchain that builds the project.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
apt_install ca-certificates curl gcc libc6-dev iproute2 iptables busybox-static python3 pkg-config
ensure_rust
