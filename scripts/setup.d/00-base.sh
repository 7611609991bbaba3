#!/usr/bin/env bash
# Base packages every tier's tests use.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
apt_install ca-certificates iproute2 iptables busybox-static python3 pkg-config
