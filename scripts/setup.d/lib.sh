#!/usr/bin/env bash
# Helpers shared by setup steps (sourced, not run).
apt_updated=0
# apt_install PKG...: installs the packages that are missing, prints what it does.
apt_install() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ "${#missing[@]}" -eq 0 ]; then
    echo "    packages present: $*"
    return 0
  fi
  if [ "$apt_updated" -eq 0 ]; then
    echo "    apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_updated=1
  fi
  echo "    apt-get install ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# ensure_rust: cargo on PATH, or a stable toolchain installed with rustup (minimal profile).
ensure_rust() {
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
  if command -v cargo >/dev/null 2>&1; then
    echo "    $(cargo --version)"
    return 0
  fi
  echo "    installing Rust (stable, minimal profile) with rustup"
  if ! curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
      | sh -s -- -y --profile minimal --default-toolchain stable -c rustfmt -c clippy >/dev/null; then
    echo "    could not install Rust: install it from https://rustup.rs and run this again" >&2
    exit 1
  fi
  export PATH="$HOME/.cargo/bin:$PATH"
  echo "    $(cargo --version)"
}

# wait_until TRIES PAUSE CMD...: runs CMD until it succeeds, at most TRIES times PAUSE seconds
# apart; returns CMD's last status.
wait_until() {
  local tries=$1 pause=$2
  shift 2
  for _ in $(seq 1 "$tries"); do
    "$@" && return 0
    sleep "$pause"
  done
  "$@"
}
