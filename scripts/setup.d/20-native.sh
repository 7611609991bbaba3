#!/usr/bin/env bash
# The native sandbox tier: kernel features it relies on, and the tools it uses for network
# plumbing (iproute2's `tc`, `iptables`). Checks first, changes only what is missing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
apt_install iproute2 iptables python3 coreutils
for ns in user pid mnt net ipc uts cgroup; do
  if [ ! -e "/proc/self/ns/$ns" ]; then
    echo "    the kernel lacks $ns namespaces: the native tier cannot run" >&2
    exit 1
  fi
done
max=$(cat /proc/sys/user/max_user_namespaces 2>/dev/null || echo 0)
if [ "$max" -eq 0 ]; then
  echo "    sysctl user.max_user_namespaces=15000 (was 0)"
  sysctl -qw user.max_user_namespaces=15000
else
  echo "    user namespaces enabled (max $max)"
fi
if [ -e /sys/fs/cgroup/cgroup.controllers ]; then
  echo "    cgroup v2 at /sys/fs/cgroup"
else
  for c in memory cpu cpuacct pids blkio freezer; do
    if [ ! -d "/sys/fs/cgroup/$c" ]; then
      echo "    mount cgroup v1 controller $c"
      mkdir -p "/sys/fs/cgroup/$c"
      mount -t cgroup -o "$c" cgroup "/sys/fs/cgroup/$c"
    fi
  done
  echo "    cgroup v1 controllers present (memory cpu cpuacct pids blkio freezer)"
fi
python3 - <<'PY'
import ctypes
abi = ctypes.CDLL(None, use_errno=True).syscall(444, None, 0, 1)  # landlock_create_ruleset
print(f"    landlock ABI {abi}" if abi > 0 else "    landlock unavailable (writes are then limited by the read-only root only)")
PY
