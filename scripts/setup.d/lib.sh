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
