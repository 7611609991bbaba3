#!/usr/bin/env bash
# Static example agents for the container and microVM tiers: their images (busybox; the
# microVM guest) have no Python and no shared libraries, so an agent program running there
# must be a static binary. Builds agent-sdk's `echo_agent` example with crt-static (glibc),
# in the separate --target dir 30-microvm.sh uses for the guest init, and installs it to
# /var/lib/symbiont/agents/echo_agent (what runtime/tests/cross_tier.rs and the per-tier
# chaos tests run). Idempotent; prints each step.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
repo="${SYMBIONT_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
agents_dir="${SYMBIONT_STATIC_AGENTS_DIR:-/var/lib/symbiont/agents}"

ensure_rust
echo "    cargo build -p symbiont-agent --example echo_agent (static) -> $agents_dir/echo_agent"
(cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" CARGO_PROFILE_RELEASE_DEBUG=0 \
  CARGO_PROFILE_RELEASE_STRIP=symbols \
  cargo build -q -p symbiont-agent --example echo_agent --release --target x86_64-unknown-linux-gnu)
built="${CARGO_TARGET_DIR:-$repo/target}/x86_64-unknown-linux-gnu/release/examples/echo_agent"
if ! file "$built" 2>/dev/null | grep -q "static"; then
  ldd "$built" 2>&1 | grep -q "not a dynamic executable" || { echo "setup: $built is not static" >&2; exit 1; }
fi
mkdir -p "$agents_dir"
if cmp -s "$built" "$agents_dir/echo_agent"; then
  echo "    echo_agent up to date"
else
  install -m 0755 "$built" "$agents_dir/echo_agent.tmp" && mv "$agents_dir/echo_agent.tmp" "$agents_dir/echo_agent"
  echo "    installed $agents_dir/echo_agent"
fi
