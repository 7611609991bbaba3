#!/usr/bin/env bash
# Tier3 (microVM): QEMU, cpio, mkfs.ext4, Debian's cloud guest kernel and the static guest init.
# Idempotent; prints each step. Paths match the defaults of [sandbox.microvm].
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
repo="${SYMBIONT_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
kernel_dir="${SYMBIONT_GUEST_KERNEL_DIR:-/var/lib/symbiont/guest-kernel}"
guest_init="${SYMBIONT_GUEST_INIT:-/var/lib/symbiont/guest/symbiont-guest}"

apt_install qemu-system-x86 cpio busybox-static e2fsprogs

# Guest kernel: the package linux-image-cloud-amd64 currently depends on, from Debian's
# archive via apt (never from elsewhere), unpacked with dpkg -x.
if ls "$kernel_dir"/boot/vmlinuz-* >/dev/null 2>&1 && ls -d "$kernel_dir"/lib/modules/*/kernel >/dev/null 2>&1; then
  echo "    guest kernel present: $(basename "$(ls "$kernel_dir"/boot/vmlinuz-* | tail -n1)")"
else
  pkg="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9].*-cloud-amd64$/ {print $2; exit}')"
  if [ -z "$pkg" ]; then
    echo "    apt-get update (to find linux-image-cloud-amd64)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    pkg="$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9].*-cloud-amd64$/ {print $2; exit}')"
  fi
  [ -n "$pkg" ] || { echo "setup: cannot find the linux-image-*-cloud-amd64 package" >&2; exit 1; }
  tmp="$(mktemp -d)"
  echo "    apt-get download $pkg"
  (cd "$tmp" && apt-get download -q "$pkg" >/dev/null 2>&1)
  echo "    dpkg -x $pkg -> $kernel_dir"
  mkdir -p "$kernel_dir"
  dpkg -x "$tmp"/"$pkg"_*.deb "$kernel_dir"
  rm -rf "$tmp"
fi

# Static guest init (glibc, crt-static; a separate --target dir keeps these RUSTFLAGS away
# from the normal build's artifacts).
echo "    cargo build -p symbiont-guest (static) -> $guest_init"
(cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" CARGO_PROFILE_RELEASE_DEBUG=0 \
  CARGO_PROFILE_RELEASE_STRIP=symbols \
  cargo build -q -p symbiont-guest --release --target x86_64-unknown-linux-gnu)
built="${CARGO_TARGET_DIR:-$repo/target}/x86_64-unknown-linux-gnu/release/symbiont-guest"
if ! file "$built" 2>/dev/null | grep -q "static"; then
  ldd "$built" 2>&1 | grep -q "not a dynamic executable" || { echo "setup: $built is not static" >&2; exit 1; }
fi
mkdir -p "$(dirname "$guest_init")"
if cmp -s "$built" "$guest_init"; then
  echo "    guest init up to date"
else
  install -m 0755 "$built" "$guest_init.tmp" && mv "$guest_init.tmp" "$guest_init"
  echo "    installed $guest_init"
fi
